package snapshot

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"

	"github.com/faultline-go/faultline/source"
)

// DefaultCacheSize is the bound of the decompressed-chunk cache when Options leaves it 0.
const DefaultCacheSize = 256 << 20

// Options tune Open.
type Options struct {
	// CacheSize bounds the bytes of decompressed chunks kept in memory (DefaultCacheSize when
	// 0). Chunks being read are held past the bound until their readers are done.
	CacheSize int64
}

// A Snapshot is an open snapshot directory. It is a source.Source: ReadAt serves the image
// through a bounded cache of decompressed, verified chunks, and zero pages without reading.
// Its methods are safe for concurrent use.
type Snapshot struct {
	dir      string
	m        *Manifest
	chunkDir string
	dec      *zstd.Decoder
	cache    cache
	comp     sync.Pool // *[]byte buffers for compressed chunk bytes
	closed   atomic.Bool
}

var (
	_ source.Source = (*Snapshot)(nil)
	_ source.Zeros  = (*Snapshot)(nil)
)

// Open opens the snapshot in dir with default options.
func Open(dir string) (*Snapshot, error) { return OpenWith(dir, Options{}) }

// OpenWith opens the snapshot in dir. It validates the manifest and checks that every chunk
// file it refers to is there with the size it records; the error names what is missing.
func OpenWith(dir string, o Options) (*Snapshot, error) {
	s, err := open(dir, o)
	if err != nil {
		return nil, err
	}
	for i, c := range s.m.Chunks {
		if err := s.checkChunkFile(i, c); err != nil {
			s.Close()
			return nil, err
		}
	}
	if w := s.m.WorkingSet; w != nil {
		if err := checkFileSize(filepath.Join(dir, w.Extent), w.ExtentSize); err != nil {
			s.Close()
			return nil, fmt.Errorf("snapshot %s: working set extent: %w", dir, err)
		}
	}
	return s, nil
}

// open opens dir without looking at the chunk files.
func open(dir string, o Options) (*Snapshot, error) {
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, err
	}
	if o.CacheSize <= 0 {
		o.CacheSize = DefaultCacheSize
	}
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(uint64(m.ChunkSize)+1<<20),
		zstd.WithDecodeAllCapLimit(true)) // never grow dst: a chunk decodes into its own buffer or fails
	if err != nil {
		return nil, err
	}
	s := &Snapshot{dir: dir, m: m, chunkDir: m.chunkDir(dir), dec: dec}
	s.cache.init(o.CacheSize, m.ChunkSize)
	return s, nil
}

func (s *Snapshot) checkChunkFile(i int, c ChunkEntry) error {
	if c.Enc == EncZero {
		return nil
	}
	path := filepath.Join(s.chunkDir, chunkFile(c.Hash, c.Enc))
	if err := checkFileSize(path, c.Stored); err != nil {
		return &ChunkError{Chunk: i, Offset: int64(i) * s.m.ChunkSize, Path: path, Err: err}
	}
	return nil
}

func checkFileSize(path string, want int64) error {
	fi, err := os.Stat(path)
	if err != nil {
		return ioError(err)
	}
	if fi.Size() != want {
		return corruptf("file has %d bytes, the manifest says %d", fi.Size(), want)
	}
	return nil
}

// Dir is the snapshot's directory.
func (s *Snapshot) Dir() string { return s.dir }

// Manifest returns the snapshot's manifest. The caller must not change it.
func (s *Snapshot) Manifest() *Manifest { return s.m }

// Size is the image's length in bytes.
func (s *Snapshot) Size() int64 { return s.m.Size }

// PageSize is the unit of the zero map.
func (s *Snapshot) PageSize() int64 { return s.m.PageSize }

// ChunkSize is the image bytes of every chunk but the last: the natural extent of a read.
func (s *Snapshot) ChunkSize() int64 { return s.m.ChunkSize }

// NumChunks is the number of chunks.
func (s *Snapshot) NumChunks() int { return len(s.m.Chunks) }

// ChunkLen is the number of image bytes in chunk i (ChunkSize but for the last chunk).
func (s *Snapshot) ChunkLen(i int) int64 { return s.m.chunkLen(i) }

// IsZero reports whether page is all zero (known from the zero map, without reading). A page
// outside the image is not.
func (s *Snapshot) IsZero(page int64) bool {
	return page >= 0 && page < s.m.Pages() && s.m.isZero(page)
}

// ZeroRun returns how many bytes from off, up to n, are known to be zero: the zero pages from
// off's page on (0 if off's page is not zero or off is outside the image).
func (s *Snapshot) ZeroRun(off, n int64) int64 {
	if off < 0 || off >= s.m.Size || n <= 0 {
		return 0
	}
	ps := s.m.PageSize
	end := min(off+n, s.m.Size)
	p := off / ps
	pages := s.m.Pages()
	for p < pages && p*ps < end && s.m.isZero(p) {
		// Whole bytes of the map at once where they are aligned.
		if p&7 == 0 && p+8 <= pages && s.m.ZeroMap[p>>3] == 0xff {
			p += 8
			continue
		}
		p++
	}
	return max(0, min(p*ps, end)-off)
}

// ReadChunk reads chunk idx into dst[:ChunkLen(idx)], decompressing it and verifying its
// hash. On error dst's contents are undefined; the error is a *ChunkError matching ErrCorrupt,
// ErrMissing or ErrTransient (a done ctx is transient).
func (s *Snapshot) ReadChunk(ctx context.Context, idx int, dst []byte) error {
	if idx < 0 || idx >= len(s.m.Chunks) {
		return fmt.Errorf("snapshot: chunk %d out of range [0, %d)", idx, len(s.m.Chunks))
	}
	clen := s.m.chunkLen(idx)
	if int64(len(dst)) < clen {
		return fmt.Errorf("snapshot: chunk %d needs a buffer of %d bytes, got %d", idx, clen, len(dst))
	}
	c := s.m.Chunks[idx]
	if c.Enc == EncZero {
		clear(dst[:clen])
		return nil
	}
	path := filepath.Join(s.chunkDir, chunkFile(c.Hash, c.Enc))
	if err := s.readChunk(ctx, idx, c, path, dst[:clen]); err != nil {
		return &ChunkError{Chunk: idx, Offset: int64(idx) * s.m.ChunkSize, Path: path, Err: err}
	}
	return nil
}

func (s *Snapshot) readChunk(ctx context.Context, idx int, c ChunkEntry, path string, dst []byte) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrTransient, err)
	}
	payload := s.m.payloadLen(idx)
	switch c.Enc {
	case EncRaw:
		if err := readFileExact(path, dst[:payload]); err != nil {
			return err
		}
	case EncZstd:
		bp, _ := s.comp.Get().(*[]byte)
		if bp == nil || int64(cap(*bp)) < c.Stored {
			b := make([]byte, c.Stored)
			bp = &b
		}
		defer s.comp.Put(bp)
		comp := (*bp)[:c.Stored]
		if err := readFileExact(path, comp); err != nil {
			return err
		}
		out, err := s.dec.DecodeAll(comp, dst[:0:payload])
		if err != nil {
			return corruptf("zstd: %v", err)
		}
		if int64(len(out)) != payload {
			return corruptf("decompressed to %d bytes, want %d", len(out), payload)
		}
	}
	s.expand(idx, dst, payload)
	if sum := sha256.Sum256(dst); hex.EncodeToString(sum[:]) != c.Hash {
		return corruptf("content hash is %x, want %s", sum[:8], c.Hash)
	}
	return nil
}

// expand spreads a chunk's payload (its non-zero pages, packed at the start of dst) to the
// pages' places and zeroes the zero pages, in place: from the last page down, a page's
// payload never lies past its place.
func (s *Snapshot) expand(idx int, dst []byte, payload int64) {
	ps := s.m.PageSize
	first := int64(idx) * (s.m.ChunkSize / ps)
	n := ceilDiv(int64(len(dst)), ps)
	src := payload
	for i := n - 1; i >= 0; i-- {
		at := i * ps
		l := min(ps, int64(len(dst))-at)
		if s.m.isZero(first + i) {
			clear(dst[at : at+l])
			continue
		}
		src -= l
		if src != at {
			copy(dst[at:at+l], dst[src:src+l])
		}
	}
}

// readFileExact reads the file at path into b, which must be exactly the file's length.
func readFileExact(path string, b []byte) error {
	f, err := os.Open(path)
	if err != nil {
		return ioError(err)
	}
	defer f.Close()
	n, err := io.ReadFull(f, b)
	switch {
	case err == io.ErrUnexpectedEOF || err == io.EOF:
		return corruptf("truncated: %d of %d bytes", n, len(b))
	case err != nil:
		return ioError(err)
	}
	var one [1]byte
	if m, _ := f.Read(one[:]); m > 0 {
		return corruptf("longer than the %d bytes the manifest says", len(b))
	}
	return nil
}

// ReadAt reads len(p) bytes of the image at off. Zero pages are served without reading; other
// bytes come from the chunk cache, each chunk decompressed once however many readers want it.
func (s *Snapshot) ReadAt(p []byte, off int64) (int, error) {
	return s.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt whose wait for a chunk ends when ctx is done.
func (s *Snapshot) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off > s.m.Size {
		return 0, fmt.Errorf("snapshot: read at %d outside image of %d bytes", off, s.m.Size)
	}
	want := len(p)
	if rest := s.m.Size - off; int64(len(p)) > rest {
		p = p[:rest]
	}
	done := 0
	for len(p) > 0 {
		idx := int(off / s.m.ChunkSize)
		in := off - int64(idx)*s.m.ChunkSize
		n := int(min(int64(len(p)), s.m.chunkLen(idx)-in))
		if z := s.ZeroRun(off, int64(n)); z > 0 {
			clear(p[:z])
			n = int(z)
		} else {
			e, err := s.cache.get(ctx, s, idx)
			if err != nil {
				return done, err
			}
			copy(p[:n], e.buf[in:])
			s.cache.release(e)
		}
		p, off, done = p[n:], off+int64(n), done+n
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// Close releases the decoder and the cache. Reads after Close fail.
func (s *Snapshot) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.dec.Close()
	s.cache.drop()
	return nil
}

// CacheStats counts the cache's work since Open.
type CacheStats struct {
	Loads     int64 // chunks read and decompressed
	Hits      int64 // reads served by a chunk already cached or being loaded
	Evictions int64
	Bytes     int64 // decompressed bytes held now
}

// CacheStats returns the cache's counters.
func (s *Snapshot) CacheStats() CacheStats { return s.cache.stats() }

// zeroPage reports whether b is all zero.
func zeroPage(b []byte) bool {
	for len(b) >= len(zeros) {
		if !bytes.Equal(b[:len(zeros)], zeros[:]) {
			return false
		}
		b = b[len(zeros):]
	}
	return bytes.Equal(b, zeros[:len(b)])
}

var zeros [64 << 10]byte
