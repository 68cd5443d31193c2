package snapshot

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkPack packs a 64 MiB SampleImage and reads it back whole through ReadAt (a cold
// cache each time), for each candidate chunk size. It reports MB/s of raw image for pack
// and read, and the compression ratio.
func BenchmarkPack(b *testing.B) {
	const size = 64 << 20
	img := sample(b, size, 1)
	mem := writeImage(b, img)
	for _, cs := range []int64{512 << 10, 1 << 20, 2 << 20, 4 << 20} {
		b.Run(fmt.Sprintf("chunk=%dK", cs>>10), func(b *testing.B) {
			var st *PackStats
			var dir string
			for i := range b.N {
				dir = filepath.Join(b.TempDir(), fmt.Sprint("s", i))
				var err error
				if st, err = Pack(ctx, mem, dir, PackOptions{ChunkSize: cs}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(size)*float64(b.N)/1e6/b.Elapsed().Seconds(), "MB/s")
			b.ReportMetric(st.Ratio(), "ratio")
			b.SetBytes(size)
		})
	}
}

// BenchmarkRead reads a packed 64 MiB SampleImage: "seq" whole through ReadAt with a cold cache,
// "page" one 4 KiB page per chunk (a fault's worth: the cost of decompressing a chunk for it).
func BenchmarkRead(b *testing.B) {
	const size = 64 << 20
	mem := writeImage(b, sample(b, size, 1))
	for _, cs := range []int64{512 << 10, 1 << 20, 2 << 20, 4 << 20} {
		dir := filepath.Join(b.TempDir(), "s")
		if _, err := Pack(ctx, mem, dir, PackOptions{ChunkSize: cs}); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("seq/chunk=%dK", cs>>10), func(b *testing.B) {
			p := make([]byte, 1<<20)
			for range b.N {
				s, err := Open(dir)
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < size; off += int64(len(p)) {
					if _, err := s.ReadAt(p, off); err != nil {
						b.Fatal(err)
					}
				}
				s.Close()
			}
			b.SetBytes(size)
		})
		b.Run(fmt.Sprintf("page/chunk=%dK", cs>>10), func(b *testing.B) {
			s, err := Open(dir)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			buf := make([]byte, cs)
			var n int
			for i := range b.N {
				c := i % s.NumChunks()
				if s.Manifest().Chunks[c].Enc == EncZero {
					continue
				}
				if err := s.ReadChunk(ctx, c, buf[:s.ChunkLen(c)]); err != nil {
					b.Fatal(err)
				}
				n++
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(max(n, 1)), "µs/chunk")
		})
	}
	_ = os.Remove
}
