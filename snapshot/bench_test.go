package snapshot

import (
	"fmt"
	"path/filepath"
	"testing"
)

// frameSizes are the candidate frame sizes the benchmarks compare (2 MiB: a whole chunk, one
// frame, no dictionary).
var frameSizes = []int64{16 << 10, 32 << 10, 64 << 10, 128 << 10, 2 << 20}

// BenchmarkPack packs a 64 MiB SampleImage for each candidate frame size (chunks of 2 MiB). It
// reports MB/s of raw image and the compression ratio.
func BenchmarkPack(b *testing.B) {
	const size = 64 << 20
	img := sample(b, size, 1)
	mem := writeImage(b, img)
	for _, fs := range frameSizes {
		b.Run(fmt.Sprintf("frame=%dK", fs>>10), func(b *testing.B) {
			var st *PackStats
			for i := range b.N {
				dir := filepath.Join(b.TempDir(), fmt.Sprint("s", i))
				var err error
				if st, err = Pack(ctx, mem, dir, PackOptions{FrameSize: fs}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(size)*float64(b.N)/1e6/b.Elapsed().Seconds(), "MB/s")
			b.ReportMetric(st.Ratio(), "ratio")
			b.SetBytes(size)
		})
	}
}

// BenchmarkRead reads a packed 64 MiB SampleImage: "seq" whole through ReadAt with a cold
// cache, "page" one 4 KiB page of a frame not in the cache (what a fault no working set
// predicted costs the daemon: the frame's read, decompression and check).
func BenchmarkRead(b *testing.B) {
	const size = 64 << 20
	mem := writeImage(b, sample(b, size, 1))
	for _, fs := range frameSizes {
		dir := filepath.Join(b.TempDir(), fmt.Sprint("s", fs))
		if _, err := Pack(ctx, mem, dir, PackOptions{FrameSize: fs}); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("seq/frame=%dK", fs>>10), func(b *testing.B) {
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
		b.Run(fmt.Sprintf("page/frame=%dK", fs>>10), func(b *testing.B) {
			s, err := OpenWith(dir, Options{CacheSize: 1})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			p := make([]byte, 4096)
			var n int
			for i := range b.N {
				// A page of the next frame whose first page is stored: a frame read each time.
				off := int64(i) * fs % size
				if s.IsZero(off / 4096) {
					continue
				}
				if _, err := s.ReadAt(p, off); err != nil {
					b.Fatal(err)
				}
				n++
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(max(n, 1)), "µs/frame")
		})
	}
}
