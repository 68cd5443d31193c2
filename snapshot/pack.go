package snapshot

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/faultline-go/faultline/internal/atomicfile"
)

// DefaultChunkSize is the chunk size Pack uses when PackOptions leaves it 0. BENCHMARKS.md
// ("Pack") and FORMAT.md say why 2 MiB.
const DefaultChunkSize = 2 << 20

// PackOptions tune Pack.
type PackOptions struct {
	ChunkSize int64 // image bytes per chunk, a multiple of PageSize (DefaultChunkSize when 0; a diff's base's)
	PageSize  int64 // the zero map's unit (4096 when 0; a diff's base's)
	// FrameSize is the image bytes per frame, the unit of a read: a multiple of PageSize that
	// divides ChunkSize (DefaultFrameSize, or PageSize if larger, when 0; a diff's base's).
	FrameSize int64
	Level     int // zstd level, as the zstd command counts (1 when 0: see BENCHMARKS.md, Pack)
	// Store, when set, is a shared chunk store: chunks go to Store/chunks, where chunks of
	// other snapshots with the same content are reused.
	Store string
	// Base, when set, is the snapshot the memory file is a diff over: only its data ranges
	// (SEEK_DATA) are new; holes are the base's bytes.
	Base    string
	Workers int // compression goroutines (GOMAXPROCS when 0)
	// Progress, when set, is called from one goroutine with the image bytes done so far.
	Progress func(done, total int64)

	// beforeManifest, when set, is called after every chunk is durable and before the
	// manifest is written; an error stops the pack there (tests simulate a crash with it).
	beforeManifest func() error
}

// PackStats reports what Pack did.
type PackStats struct {
	Size       int64 // image bytes
	Stored     int64 // bytes of the distinct chunk files the snapshot refers to
	Chunks     int
	ZeroChunks int   // chunks with no file (all zero)
	Reused     int   // chunks whose file was already there (store, base, or twice in the image)
	ZeroPages  int64 // of Pages
	Pages      int64
	Elapsed    time.Duration
}

// Ratio is the image size over the stored size.
func (s PackStats) Ratio() float64 {
	if s.Stored == 0 {
		return 0
	}
	return float64(s.Size) / float64(s.Stored)
}

type packJob struct {
	idx  int
	buf  []byte // the chunk's image bytes; nil when the chunk is the base's as is
	base ChunkEntry
}

type packResult struct {
	idx    int
	entry  ChunkEntry
	zero   []bool // per page of the chunk
	reused bool
	n      int64 // image bytes
	err    error
}

// Pack writes a snapshot of the raw memory file memFile into the directory out, which must not
// hold a snapshot yet. The manifest is written last, atomically, after every chunk is durable:
// until then out is not a snapshot.
func Pack(ctx context.Context, memFile, out string, o PackOptions) (*PackStats, error) {
	start := time.Now()
	if o.Level == 0 {
		o.Level = 1
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	var base *Snapshot
	if o.Base != "" {
		var err error
		if base, err = Open(o.Base); err != nil {
			return nil, fmt.Errorf("base: %w", err)
		}
		defer base.Close()
		bm := base.Manifest()
		if o.ChunkSize != 0 && o.ChunkSize != bm.ChunkSize || o.PageSize != 0 && o.PageSize != bm.PageSize ||
			o.FrameSize != 0 && o.FrameSize != bm.FrameSize {
			return nil, fmt.Errorf("pack: a diff keeps its base's chunk size %d, page size %d and frame size %d", bm.ChunkSize, bm.PageSize, bm.FrameSize)
		}
		o.ChunkSize, o.PageSize, o.FrameSize = bm.ChunkSize, bm.PageSize, bm.FrameSize
	}
	if o.PageSize == 0 {
		o.PageSize = 4096
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if o.FrameSize == 0 {
		o.FrameSize = min(max(DefaultFrameSize, o.PageSize), o.ChunkSize)
	}
	if o.PageSize < 512 || o.PageSize&(o.PageSize-1) != 0 || o.ChunkSize <= 0 || o.ChunkSize%o.PageSize != 0 || o.ChunkSize > maxChunkSize {
		return nil, fmt.Errorf("pack: chunk size %d must be a multiple of the page size %d (a power of two), at most 1 GiB", o.ChunkSize, o.PageSize)
	}
	if o.FrameSize <= 0 || o.FrameSize%o.PageSize != 0 || o.ChunkSize%o.FrameSize != 0 || o.ChunkSize/o.FrameSize > maxFramesPerChunk {
		return nil, fmt.Errorf("pack: frame size %d must be a multiple of the page size %d that divides the chunk size %d into at most %d frames", o.FrameSize, o.PageSize, o.ChunkSize, maxFramesPerChunk)
	}
	f, err := os.Open(memFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	m := &Manifest{Format: FormatName, Version: Version, Size: fi.Size(), PageSize: o.PageSize, ChunkSize: o.ChunkSize, FrameSize: o.FrameSize}
	var extents [][2]int64
	if base != nil {
		if m.Size != base.Size() {
			return nil, fmt.Errorf("pack: diff file of %d bytes over a base of %d", m.Size, base.Size())
		}
		if extents, err = dataExtents(f, m.Size); err != nil {
			return nil, fmt.Errorf("pack: finding the diff's data: %w", err)
		}
		abs, _ := filepath.Abs(o.Base)
		m.Base = &BaseRef{Dir: abs, Checksum: base.Manifest().Checksum}
	}
	if _, err := os.Stat(filepath.Join(out, ManifestName)); err == nil {
		return nil, fmt.Errorf("pack: %s is a snapshot already", out)
	}
	if o.Store != "" {
		if m.Store, err = filepath.Abs(o.Store); err != nil {
			return nil, err
		}
	}
	chunkDir := m.chunkDir(out)
	if err := os.MkdirAll(chunkDir, 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	dict, err := packDict(f, m, base, chunkDir)
	if err != nil {
		return nil, fmt.Errorf("pack: dictionary: %w", err)
	}

	nchunks := m.NumChunks()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan packJob)
	results := make(chan packResult, o.Workers)
	// Buffers circulate reader → worker → reader: two per worker keep both busy while the
	// reader reads ahead.
	bufs := make(chan []byte, 2*o.Workers)
	for range 2 * o.Workers {
		bufs <- make([]byte, o.ChunkSize)
	}
	var readErr error
	go func() {
		defer close(jobs)
		readErr = readChunks(ctx, f, m, base, extents, bufs, jobs)
	}()
	var wg sync.WaitGroup
	for range o.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := newPacker(m, chunkDir, base, o.Level, dict)
			if err != nil {
				for j := range jobs {
					results <- packResult{idx: j.idx, err: err}
				}
				return
			}
			defer w.enc.Close()
			defer w.dec.Close()
			for j := range jobs {
				r := w.pack(j)
				if j.buf != nil {
					bufs <- j.buf[:cap(j.buf)]
				}
				results <- r
			}
		}()
	}
	go func() { wg.Wait(); close(results) }()

	m.Chunks = make([]ChunkEntry, nchunks)
	m.ZeroMap = make([]byte, ceilDiv(m.Pages(), 8))
	st := &PackStats{Size: m.Size, Chunks: nchunks, Pages: m.Pages()}
	var firstErr error
	var done int64
	per := o.ChunkSize / o.PageSize
	for r := range results {
		if r.err != nil {
			if firstErr == nil {
				firstErr = r.err
				cancel()
			}
			continue
		}
		m.Chunks[r.idx] = r.entry
		for i, z := range r.zero {
			if z {
				p := int64(r.idx)*per + int64(i)
				m.ZeroMap[p>>3] |= 1 << (p & 7)
				st.ZeroPages++
			}
		}
		if r.reused {
			st.Reused++
		}
		done += r.n
		if o.Progress != nil {
			o.Progress(done, m.Size)
		}
	}
	if firstErr == nil {
		firstErr = readErr
	}
	if firstErr != nil {
		return nil, firstErr
	}
	if err := syncDir(chunkDir); err != nil {
		return nil, err
	}
	seen := make(map[string]bool)
	for _, c := range m.Chunks {
		if c.Enc == EncZero {
			st.ZeroChunks++
		} else if !seen[c.Hash] {
			seen[c.Hash] = true
			st.Stored += c.Stored
		}
	}
	if o.beforeManifest != nil {
		if err := o.beforeManifest(); err != nil {
			return nil, err
		}
	}
	if err := writeManifest(out, m); err != nil {
		return nil, err
	}
	if m.Store != "" {
		if err := registerInStore(m.Store, out); err != nil {
			return nil, err
		}
	}
	st.Elapsed = time.Since(start)
	return st, nil
}

// readChunks reads the image chunk by chunk, in order, and hands each to the workers. For a diff
// a chunk no data extent touches is handed over as the base's entry, unread.
func readChunks(ctx context.Context, f *os.File, m *Manifest, base *Snapshot, extents [][2]int64, bufs chan []byte, jobs chan<- packJob) error {
	for i := range m.NumChunks() {
		off := int64(i) * m.ChunkSize
		clen := m.chunkLen(i)
		var touched [][2]int64
		if base != nil {
			// extents are sorted and disjoint: find those overlapping [off, off+clen).
			k := sort.Search(len(extents), func(k int) bool { return extents[k][1] > off })
			for ; k < len(extents) && extents[k][0] < off+clen; k++ {
				touched = append(touched, extents[k])
			}
			if len(touched) == 0 {
				select {
				case jobs <- packJob{idx: i, base: base.Manifest().Chunks[i]}:
				case <-ctx.Done():
					return ctx.Err()
				}
				continue
			}
		}
		var buf []byte
		select {
		case buf = <-bufs:
		case <-ctx.Done():
			return ctx.Err()
		}
		buf = buf[:clen]
		if base != nil {
			if err := base.ReadChunk(ctx, i, buf); err != nil {
				return fmt.Errorf("base: %w", err)
			}
			ps := m.PageSize
			for _, e := range touched {
				// Whole pages: Firecracker writes a dirty page whole, and a file system may
				// report data in blocks smaller than a page.
				s := max(e[0]/ps*ps, off)
				t := min(ceilDiv(e[1], ps)*ps, off+clen)
				if err := readFull(f, buf[s-off:t-off], s); err != nil {
					return err
				}
			}
		} else if err := readFull(f, buf, off); err != nil {
			return err
		}
		select {
		case jobs <- packJob{idx: i, buf: buf}:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// A packer is one worker's state: its encoder and output buffers.
type packer struct {
	m        *Manifest
	chunkDir string
	base     *Snapshot
	enc      *zstd.Encoder
	dec      *zstd.Decoder // for checking a chunk file found already there
	out      []byte        // the chunk file being built
	comp     []byte        // one frame compressed
	table    []byte
	hdr      []byte
}

func newPacker(m *Manifest, chunkDir string, base *Snapshot, level int, dict []byte) (*packer, error) {
	opts := []zstd.EOption{zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(level)),
		zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false)}
	if dict != nil {
		opts = append(opts, zstd.WithEncoderDictRaw(m.Dict.id(), dict))
	}
	enc, err := zstd.NewWriter(nil, opts...)
	if err != nil {
		return nil, err
	}
	dopts := []zstd.DOption{zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(m.FrameSize) + 1<<20)}
	if dict != nil {
		dopts = append(dopts, zstd.WithDecoderDictRaw(m.Dict.id(), dict))
	}
	dec, err := zstd.NewReader(nil, dopts...)
	if err != nil {
		enc.Close()
		return nil, err
	}
	return &packer{m: m, chunkDir: chunkDir, base: base, enc: enc, dec: dec}, nil
}

// packDict returns the dictionary the chunks are compressed with and sets m.Dict: a diff's
// base's; else the one the chunk directory has (a store's, shared by the snapshots in it, so
// that their common chunks stay one file); else a new one of pages sampled across the image.
// Frames of a chunk's size get no dictionary: it helps small frames only.
func packDict(f *os.File, m *Manifest, base *Snapshot, chunkDir string) ([]byte, error) {
	if base != nil {
		bd := base.Manifest().Dict
		if bd == nil {
			return nil, nil
		}
		b, err := base.readDict(context.Background())
		if err != nil {
			return nil, err
		}
		m.Dict = bd
		if _, err := os.Stat(filepath.Join(chunkDir, bd.fileName())); err == nil {
			return b, nil
		}
		return b, writeFileAtomic(chunkDir, bd.fileName(), b, 0o444)
	}
	if m.FrameSize >= m.ChunkSize || m.FrameSize > 256<<10 {
		return nil, nil
	}
	if names, _ := filepath.Glob(filepath.Join(chunkDir, "*.dict")); len(names) > 0 {
		sort.Strings(names)
		b, err := os.ReadFile(names[0])
		if err != nil {
			return nil, err
		}
		h := strings.TrimSuffix(filepath.Base(names[0]), ".dict")
		if hashHex(b) != h {
			return nil, fmt.Errorf("%s: %w", names[0], corruptf("content hash does not match its name"))
		}
		m.Dict = &DictRef{Hash: h, Size: int64(len(b))}
		return b, nil
	}
	// Non-zero pages from evenly spaced places: what the image's frames have in common (page
	// tables, code, text) is likely in some of them.
	ps := m.PageSize
	pages := m.Pages()
	var dict []byte
	page := make([]byte, ps)
	const tries = 64
	for k := int64(0); k < tries && int64(len(dict)) < dictSize; k++ {
		p := (2*k + 1) * pages / (2 * tries)
		if (p+1)*ps > m.Size {
			continue
		}
		if err := readFull(f, page, p*ps); err != nil {
			return nil, err
		}
		if !zeroPage(page) {
			dict = append(dict, page...)
		}
	}
	if len(dict) < int(ps) {
		return nil, nil // (almost) all zero: nothing to learn from
	}
	m.Dict = &DictRef{Hash: hashHex(dict), Size: int64(len(dict))}
	return dict, writeFileAtomic(chunkDir, m.Dict.fileName(), dict, 0o444)
}

func (w *packer) pack(j packJob) packResult {
	m := w.m
	r := packResult{idx: j.idx, n: m.chunkLen(j.idx)}
	per := m.ChunkSize / m.PageSize
	first := int64(j.idx) * per
	npages := ceilDiv(r.n, m.PageSize)
	if j.buf == nil {
		// The base's chunk, its pages' zero bits too.
		bm := w.base.Manifest()
		r.zero = make([]bool, npages)
		for i := range r.zero {
			r.zero[i] = bm.isZero(first + int64(i))
		}
		r.entry = j.base
		r.reused = true
		if j.base.Enc != EncZero {
			r.err = w.linkFromBase(j.idx, j.base)
		}
		return r
	}
	buf := j.buf
	r.zero = make([]bool, npages)
	var payload int64
	for i := range npages {
		at := i * m.PageSize
		page := buf[at:min(at+m.PageSize, r.n)]
		if r.zero[i] = zeroPage(page); !r.zero[i] {
			payload += int64(len(page))
		}
	}
	if payload == 0 {
		r.entry = ChunkEntry{Enc: EncZero}
		return r
	}
	// Pack the non-zero pages at the start of buf: frame k's payload is then the next
	// framePayload bytes (the reader's expand undoes it).
	var to int64
	for i := range npages {
		at := i * m.PageSize
		l := min(m.PageSize, r.n-at)
		if !r.zero[i] {
			if to != at {
				copy(buf[to:to+l], buf[at:at+l])
			}
			to += l
		}
	}
	nf := m.framesIn(j.idx)
	fpp := m.FrameSize / m.PageSize
	frames := make([]packFrame, nf)
	var at int64
	for k := range nf {
		var n int64
		for i := int64(k) * fpp; i < min(int64(k+1)*fpp, npages); i++ {
			if !r.zero[i] {
				n += min(m.PageSize, r.n-i*m.PageSize)
			}
		}
		frames[k] = packFrame{at: at, n: n}
		if n > 0 {
			frames[k].hash = sha256.Sum256(buf[at : at+n])
		}
		at += n
	}
	hash := chunkHash(npages, func(i int64) bool { return r.zero[i] }, func(k int) *[32]byte {
		if frames[k].n == 0 {
			return nil
		}
		return &frames[k].hash
	}, nf)
	name := m.chunkFileName(ChunkEntry{Hash: hash})
	if t, size, err := w.existing(name, frames); err == nil {
		// The file is there (a store, a second pack into this directory, the same chunk
		// twice) and holds these bytes: its frame table is the entry's.
		r.entry = ChunkEntry{Hash: hash, Stored: size, Enc: EncFrames, Frames: t}
		r.reused = true
		return r
	} else if !errors.Is(err, os.ErrNotExist) {
		r.err = err
		return r
	}
	w.table = w.table[:0]
	w.out = w.out[:0]
	for _, f := range frames {
		if f.n == 0 {
			w.table = appendFrameRec(w.table, 0, nil)
			continue
		}
		payload := buf[f.at : f.at+f.n]
		w.comp = w.enc.EncodeAll(payload, w.comp[:0])
		data := w.comp
		// Stored raw when zstd saves less than 1/64: reading it is then a copy.
		if int64(len(data)) >= f.n-f.n/64 {
			data = payload
		}
		w.table = appendFrameRec(w.table, int64(len(data)), &f.hash)
		w.out = append(w.out, data...)
	}
	w.hdr = append(w.hdr[:0], chunkHeader(w.table)...)
	file := append(w.hdr, w.out...)
	w.hdr = file[:0]
	r.entry = ChunkEntry{Hash: hash, Stored: int64(len(file)), Enc: EncFrames, Frames: append([]byte(nil), w.table...)}
	r.err = w.writeChunk(name, file)
	if errors.Is(r.err, os.ErrExist) {
		// Another pack into the store wrote it meanwhile: use its file, never replace it
		// (its snapshot's manifest holds that file's frame table).
		t, size, err := w.existing(name, frames)
		r.entry, r.reused, r.err = ChunkEntry{Hash: hash, Stored: size, Enc: EncFrames, Frames: t}, true, err
	}
	return r
}

// A packFrame is one frame of a chunk being packed: its payload's place in the packed buffer,
// its length and its hash.
type packFrame struct {
	at, n int64
	hash  [32]byte
}

// existing checks the chunk file name already in the chunk directory and returns its frame
// table and size: its frames must be those given (payload lengths and hashes), and
// every stored frame must decompress to its hash. An error matching os.ErrNotExist means there
// is no such file; any other is a file under the chunk's name that does not hold its bytes,
// which pack never replaces (the snapshots using it hold its frame table): verify them.
func (w *packer) existing(name string, frames []packFrame) ([]byte, int64, error) {
	path := filepath.Join(w.chunkDir, name)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	bad := func(err error) ([]byte, int64, error) {
		return nil, 0, fmt.Errorf("pack: %s is there but does not hold the chunk's bytes (%v): run faultline snapshot verify on the snapshots using it", path, err)
	}
	t, err := readHeader(b)
	if err != nil {
		return bad(err)
	}
	t = append([]byte(nil), t...)
	recs, err := parseTable(len(frames), t, func(k int) int64 { return frames[k].n })
	if err != nil {
		return bad(err)
	}
	at := headerLen(t)
	var buf []byte
	for k, r := range recs {
		if r.stored == 0 {
			continue
		}
		if r.hash != frames[k].hash {
			return bad(fmt.Errorf("frame %d's hash differs", k))
		}
		if at+r.stored > int64(len(b)) {
			return bad(errors.New("truncated"))
		}
		data := b[at : at+r.stored]
		if r.stored < frames[k].n {
			if buf, err = w.dec.DecodeAll(data, buf[:0]); err != nil {
				return bad(fmt.Errorf("frame %d: zstd: %v", k, err))
			}
			data = buf
		}
		if sha256.Sum256(data) != r.hash {
			return bad(fmt.Errorf("frame %d does not match its hash", k))
		}
		at += r.stored
	}
	if at != int64(len(b)) {
		return bad(fmt.Errorf("file of %d bytes, its frames hold %d", len(b), at))
	}
	return t, int64(len(b)), nil
}

// writeChunk writes a chunk file: temp file, fsync, then a hard link to its name, so that a
// chunk's name never holds part of it and never replaces a file already there (another pack
// into the store may have written it meanwhile: os.ErrExist). The directory is synced once, by
// Pack, before the manifest.
func (w *packer) writeChunk(name string, data []byte) error {
	f, err := createTemp(w.chunkDir, name)
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := atomicfile.Finish(f, data, 0o444); err != nil {
		return err
	}
	return os.Link(tmp, filepath.Join(w.chunkDir, name))
}

// linkFromBase makes the base's chunk file part of this snapshot's chunk directory (a hard link,
// or a copy across file systems), unless it is there already (a shared store).
func (w *packer) linkFromBase(idx int, c ChunkEntry) error {
	name := w.m.chunkFileName(c)
	dst := filepath.Join(w.chunkDir, name)
	if _, err := os.Stat(dst); err == nil {
		return nil
	}
	src := w.base.localChunkPath(name)
	if err := os.Link(src, dst); err == nil || errors.Is(err, os.ErrExist) {
		return nil
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("base chunk %d: %w", idx, err)
	}
	if err := w.writeChunk(name, data); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return nil
}

// readFull reads len(b) bytes at off; a short read means the memory file shrank while packing.
func readFull(f *os.File, b []byte, off int64) error {
	n, err := f.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = fmt.Errorf("pack: %s ends at %d: it changed while being packed", f.Name(), off+int64(n))
	}
	return err
}
