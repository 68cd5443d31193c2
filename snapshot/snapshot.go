package snapshot

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"

	"github.com/faultline-go/faultline/source"
)

// DefaultCacheSize is the bound of the decompressed-frame cache when Options leaves it 0.
const DefaultCacheSize = 256 << 20

// Options tune Open.
type Options struct {
	// CacheSize bounds the bytes of decompressed frames kept in memory (DefaultCacheSize when
	// 0). Frames being read are held past the bound until their readers are done. The working
	// set, once streamed whole, is kept decoded within the same bound when it takes at most
	// half of it (see OpenWorkingSet).
	CacheSize int64
}

// A Snapshot is an open snapshot. It is a source.Source: ReadAt serves the image through a
// bounded cache of decompressed, verified frames, and zero pages without reading. Its methods
// are safe for concurrent use.
type Snapshot struct {
	dir    string // the directory, or what the Files came from, for messages
	files  Files
	m      *Manifest
	frames [][]frameLoc  // per chunk, per frame (nil for an all-zero chunk)
	names  []string      // per chunk, its file name (Manifest.chunkFileNames; "" if all zero)
	raw    []byte        // manifest.json as read
	dec    *zstd.Decoder // the chunks' frames (with the dictionary)
	wsDec  *zstd.Decoder // the working set's frames: written without one, and a decoder with a
	// dictionary is some 40% slower on them
	decMu  sync.RWMutex // held shared by a decompression, exclusively by Close (which frees both)
	cache  cache
	comp   sync.Pool // *[]byte buffers for compressed frame bytes
	closed atomic.Bool

	// held is the working set's frames decoded and verified, kept by the first reader that
	// streamed it whole (nil until then, and when it would not fit): later readers hand out
	// runs from it without reading the extent.
	heldMu  sync.Mutex
	held    [][]byte
	keeping bool // a reader is keeping what it decodes, for held
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
	files := dirFilesKept(dir)
	s, err := openFiles(context.Background(), dir, files, o, true)
	if err != nil {
		files.open.close() // what the open read (the dictionary) is kept open in it
		return nil, fmt.Errorf("snapshot %s: %w", dir, err)
	}
	if w := s.m.WorkingSet; w != nil {
		if err := checkFileSize(filepath.Join(dir, w.Extent), w.ExtentSize); err != nil {
			s.Close()
			return nil, fmt.Errorf("snapshot %s: working set extent: %w", dir, err)
		}
	}
	return s, nil
}

// OpenFiles opens the snapshot whose files f gives; name is what errors call it (a directory,
// a URL). Where f is a Checker, every chunk file is checked first.
func OpenFiles(ctx context.Context, name string, f Files, o Options) (*Snapshot, error) {
	s, err := openFiles(ctx, name, f, o, true)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	return s, nil
}

func openFiles(ctx context.Context, name string, f Files, o Options, check bool) (*Snapshot, error) {
	b, err := f.Manifest(ctx)
	if err != nil {
		return nil, err
	}
	m, err := DecodeManifest(b)
	if err != nil {
		return nil, err
	}
	if o.CacheSize <= 0 {
		o.CacheSize = DefaultCacheSize
	}
	s := &Snapshot{dir: name, files: f, m: m, raw: b, names: m.chunkFileNames()}
	if check {
		if c, ok := f.(Checker); ok {
			seen := make(map[string]bool)
			for i, e := range m.Chunks {
				name := s.names[i]
				if e.Enc == EncZero || seen[name] {
					continue
				}
				seen[name] = true
				if err := c.Check(ctx, name, e.Stored); err != nil {
					return nil, s.chunkError(i, ioError(err))
				}
			}
			if d := m.Dict; d != nil {
				if err := c.Check(ctx, d.fileName(), d.Size); err != nil {
					return nil, fmt.Errorf("dictionary %s: %w", d.fileName(), ioError(err))
				}
			}
		}
	}
	dopts := []zstd.DOption{
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(uint64(max(m.FrameSize, frameTarget)) + 1<<20),
		zstd.WithDecodeAllCapLimit(true), // never grow dst: a frame decodes into its own buffer or fails
	}
	if s.wsDec, err = zstd.NewReader(nil, dopts...); err != nil {
		return nil, err
	}
	if m.Dict != nil {
		dict, err := s.readDict(ctx)
		if err != nil {
			s.wsDec.Close()
			return nil, err
		}
		dopts = append(dopts, zstd.WithDecoderDictRaw(m.Dict.id(), dict))
	}
	if s.dec, err = zstd.NewReader(nil, dopts...); err != nil {
		s.wsDec.Close()
		return nil, err
	}
	s.frames = make([][]frameLoc, len(m.Chunks))
	for i, c := range m.Chunks {
		if c.Enc == EncZero {
			continue
		}
		recs, _ := m.parseFrames(i, c.Frames) // validated by DecodeManifest
		locs := make([]frameLoc, len(recs))
		off := headerLen(c.Frames)
		for k, r := range recs {
			locs[k] = frameLoc{stored: int32(r.stored), off: off, hash: r.hash}
			off += r.stored
		}
		s.frames[i] = locs
	}
	s.cache.init(o.CacheSize, m.FrameSize)
	return s, nil
}

// readDict reads and verifies the dictionary; one that fails its hash is reported to the Files
// (a cache drops its copy) and read once more.
func (s *Snapshot) readDict(ctx context.Context) ([]byte, error) {
	b, err := s.readDictOnce(ctx)
	if errors.Is(err, ErrCorrupt) {
		s.files.Corrupt(s.m.Dict.fileName())
		b, err = s.readDictOnce(ctx)
	}
	return b, err
}

func (s *Snapshot) readDictOnce(ctx context.Context) ([]byte, error) {
	d := s.m.Dict
	f, err := s.files.Chunk(ctx, d.fileName(), d.Size)
	if err != nil {
		return nil, fmt.Errorf("dictionary %s: %w", d.fileName(), ioError(err))
	}
	defer f.Close()
	b := make([]byte, d.Size)
	if err := readAtExact(f, b, 0); err != nil {
		return nil, fmt.Errorf("dictionary %s: %w", d.fileName(), err)
	}
	if hashHex(b) != d.Hash {
		return nil, fmt.Errorf("dictionary %s: %w", d.fileName(), corruptf("content hash does not match its name"))
	}
	return b, nil
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

// Dir is the snapshot's directory (or the name OpenFiles was given).
func (s *Snapshot) Dir() string { return s.dir }

// Manifest returns the snapshot's manifest. The caller must not change it.
func (s *Snapshot) Manifest() *Manifest { return s.m }

// ManifestBytes is manifest.json as it was read when the snapshot opened (the bytes Manifest
// decodes): what a copy of this snapshot elsewhere must hold. The caller must not change it.
func (s *Snapshot) ManifestBytes() []byte { return s.raw }

// Size is the image's length in bytes.
func (s *Snapshot) Size() int64 { return s.m.Size }

// PageSize is the unit of the zero map.
func (s *Snapshot) PageSize() int64 { return s.m.PageSize }

// ChunkSize is the image bytes of every chunk but the last.
func (s *Snapshot) ChunkSize() int64 { return s.m.ChunkSize }

// FrameSize is the image bytes of every frame but the last: the unit of a read.
func (s *Snapshot) FrameSize() int64 { return s.m.FrameSize }

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

// chunkError wraps err as the error of chunk i.
func (s *Snapshot) chunkError(i int, err error) error {
	path := s.m.ChunkFileName(i)
	if d, ok := s.files.(*dirFiles); ok && path != "" {
		path = d.path(path)
	}
	return &ChunkError{Chunk: i, Offset: int64(i) * s.m.ChunkSize, Path: path, Err: err}
}

// readFrame reads frame g into dst[:frameLen(g)]: one read of its stored bytes, decompressed,
// verified against its hash, its pages spread over dst with the zero pages zeroed. A frame that
// fails verification is read once more after telling the Files (a cache fetches it anew). The
// error is a *ChunkError.
func (s *Snapshot) readFrame(ctx context.Context, g int, dst []byte) error {
	m := s.m
	per := int(m.ChunkSize / m.FrameSize)
	ci := g / per
	dst = dst[:m.frameLen(g)]
	locs := s.frames[ci]
	if locs == nil || locs[g-ci*per].stored == 0 {
		clear(dst)
		return nil
	}
	loc := &locs[g-ci*per]
	c := m.Chunks[ci]
	name := s.names[ci]
	err := s.readFrameOnce(ctx, g, loc, c, name, dst)
	if errors.Is(err, ErrCorrupt) {
		s.files.Corrupt(name)
		err = s.readFrameOnce(ctx, g, loc, c, name, dst)
	}
	if err != nil {
		return s.chunkError(ci, fmt.Errorf("frame at image offset %#x: %w", int64(g)*m.FrameSize, err))
	}
	return nil
}

func (s *Snapshot) readFrameOnce(ctx context.Context, g int, loc *frameLoc, c ChunkEntry, name string, dst []byte) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrTransient, err)
	}
	f, err := s.files.Chunk(ctx, name, c.Stored)
	if err != nil {
		return ioError(err)
	}
	defer f.Close()
	bp := s.compBuf(loc)
	defer s.comp.Put(bp)
	comp := (*bp)[:loc.stored]
	if err := readAtExact(f, comp, loc.off); err != nil {
		return err
	}
	return s.decodeFrame(g, loc, comp, dst)
}

// compBuf returns a pooled buffer for loc's stored bytes.
func (s *Snapshot) compBuf(loc *frameLoc) *[]byte {
	bp, _ := s.comp.Get().(*[]byte)
	if bp == nil || cap(*bp) < int(loc.stored) {
		b := make([]byte, s.m.FrameSize)
		bp = &b
	}
	return bp
}

// decodeFrame decompresses frame g's stored bytes comp into dst, verifies them against the
// frame's hash and spreads its pages over dst, zeroing the zero ones.
func (s *Snapshot) decodeFrame(g int, loc *frameLoc, comp, dst []byte) error {
	payload := s.m.framePayload(g)
	if int64(loc.stored) == payload {
		copy(dst, comp)
	} else {
		out, err := s.decodeAll(comp, dst[:0:payload])
		if err != nil {
			return err
		}
		if int64(len(out)) != payload {
			return corruptf("decompressed to %d bytes, want %d", len(out), payload)
		}
	}
	if sum := sha256.Sum256(dst[:payload]); sum != loc.hash {
		return corruptf("content hash is %x, want %x", sum[:8], loc.hash[:8])
	}
	s.m.expand(int64(g)*s.m.FrameSize, dst, payload)
	return nil
}

// checkHeader checks that chunk i's file has the size and the frame table the manifest says.
func (s *Snapshot) checkHeader(ctx context.Context, i int) error {
	c := s.m.Chunks[i]
	if c.Enc == EncZero {
		return nil
	}
	f, err := s.files.Chunk(ctx, s.names[i], c.Stored)
	if err != nil {
		return s.chunkError(i, ioError(err))
	}
	defer f.Close()
	hdr := make([]byte, headerLen(c.Frames))
	if err := readAtExact(f, hdr, 0); err != nil {
		return s.chunkError(i, err)
	}
	t, err := readHeader(hdr)
	if err == nil && !bytes.Equal(t, c.Frames) {
		err = errors.New("its frame table is not the manifest's")
	}
	if err == nil {
		var one [1]byte
		if n, _ := f.ReadAt(one[:], c.Stored); n > 0 {
			err = fmt.Errorf("longer than the %d bytes the manifest says", c.Stored)
		}
	}
	if err != nil {
		return s.chunkError(i, corruptf("%v", err))
	}
	return nil
}

// localChunkPath is the path of a chunk-directory file of a snapshot opened from a directory
// ("" for other Files).
func (s *Snapshot) localChunkPath(name string) string {
	if d, ok := s.files.(*dirFiles); ok {
		return d.path(name)
	}
	return ""
}

// readAtExact reads len(b) bytes at off of f; a file that ends sooner is truncated.
func readAtExact(f io.ReaderAt, b []byte, off int64) error {
	n, err := f.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF || err == io.ErrUnexpectedEOF {
		return corruptf("truncated: %d of %d bytes at offset %d", n, len(b), off)
	}
	return ioError(err)
}

// ReadChunk reads chunk idx into dst[:ChunkLen(idx)], frame by frame, verifying each frame's
// hash and then that the frames and the zero map make the chunk's hash. On error dst's contents are undefined; the error is a *ChunkError
// matching ErrCorrupt, ErrMissing or ErrTransient (a done ctx is transient).
func (s *Snapshot) ReadChunk(ctx context.Context, idx int, dst []byte) error {
	if idx < 0 || idx >= len(s.m.Chunks) {
		return fmt.Errorf("snapshot: chunk %d out of range [0, %d)", idx, len(s.m.Chunks))
	}
	clen := s.m.chunkLen(idx)
	if int64(len(dst)) < clen {
		return fmt.Errorf("snapshot: chunk %d needs a buffer of %d bytes, got %d", idx, clen, len(dst))
	}
	dst = dst[:clen]
	c := s.m.Chunks[idx]
	if c.Enc == EncZero {
		clear(dst)
		return nil
	}
	g0 := idx * int(s.m.ChunkSize/s.m.FrameSize)
	for k := range s.m.framesIn(idx) {
		at := int64(k) * s.m.FrameSize
		if err := s.readFrame(ctx, g0+k, dst[at:]); err != nil {
			return err
		}
	}
	// The frames are verified; the chunk's name must be what they and the zero map make.
	recs, _ := s.m.parseFrames(idx, c.Frames)
	if s.m.hashOf(idx, recs) != c.Hash {
		return s.chunkError(idx, corruptf("the chunk's frames and zero map do not make its name"))
	}
	return nil
}

// expand spreads the payload of the image range at off (its non-zero pages, packed at the
// start of dst) to the pages' places and zeroes the zero pages, in place: from the last page
// down, a page's payload never lies past its place.
func (m *Manifest) expand(off int64, dst []byte, payload int64) {
	ps := m.PageSize
	first := off / ps
	n := ceilDiv(int64(len(dst)), ps)
	src := payload
	for i := n - 1; i >= 0; i-- {
		at := i * ps
		l := min(ps, int64(len(dst))-at)
		if m.isZero(first + i) {
			clear(dst[at : at+l])
			continue
		}
		src -= l
		if src != at {
			copy(dst[at:at+l], dst[src:src+l])
		}
	}
}

// ReadAt reads len(p) bytes of the image at off. Zero pages are served without reading; other
// bytes come from the frame cache, each frame decompressed once however many readers want it.
func (s *Snapshot) ReadAt(p []byte, off int64) (int, error) {
	return s.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt whose wait for a frame ends when ctx is done.
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
		idx := int(off / s.m.FrameSize)
		in := off - int64(idx)*s.m.FrameSize
		n := int(min(int64(len(p)), s.m.frameLen(idx)-in))
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
	s.decMu.Lock() // after the decompressions running now: the decoders' state goes with them
	s.dec.Close()
	s.wsDec.Close()
	s.decMu.Unlock()
	s.cache.drop()
	s.heldMu.Lock()
	s.held = nil
	s.heldMu.Unlock()
	if d, ok := s.files.(*dirFiles); ok && d.keep {
		d.open.close() // reads still running keep their file until they are done
	}
	return nil
}

// decodeAll decompresses one zstd frame of a chunk into dst, unless the snapshot is closed.
func (s *Snapshot) decodeAll(src, dst []byte) ([]byte, error) { return s.decodeWith(s.dec, src, dst) }

func (s *Snapshot) decodeWith(dec *zstd.Decoder, src, dst []byte) ([]byte, error) {
	s.decMu.RLock()
	defer s.decMu.RUnlock()
	if s.closed.Load() {
		return nil, errClosed
	}
	out, err := dec.DecodeAll(src, dst)
	if err != nil {
		return nil, corruptf("zstd: %v", err)
	}
	return out, nil
}

// CacheStats counts the cache's work since Open.
type CacheStats struct {
	Loads     int64 // frames read and decompressed
	Hits      int64 // reads served by a frame already cached or being loaded
	Evictions int64
	Bytes     int64 // decompressed bytes held now
	// WorkingSet is the bytes of the decoded working set held (0 if it is not).
	WorkingSet int64
}

// CacheStats returns the cache's counters.
func (s *Snapshot) CacheStats() CacheStats {
	st := s.cache.stats()
	s.heldMu.Lock()
	for _, f := range s.held {
		st.WorkingSet += int64(len(f))
	}
	s.heldMu.Unlock()
	return st
}

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
