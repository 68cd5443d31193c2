package snapshot

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/faultline-go/faultline/internal/atomicfile"
)

// orderWindow is how many pages of a recorded order WriteWorkingSet sorts by address together:
// enough for a few vCPUs' interleaved runs, few enough that the pages the VM wants first still
// go in first (with 256, a small working set was reordered whole and a demo VM outran it).
const orderWindow = 16

// frameTarget is the payload bytes WriteWorkingSet puts in one frame: large enough that zstd
// compresses well and a read is sequential, small enough that the first pages are ready soon.
const frameTarget = 1 << 20

// WriteWorkingSet records pages (page indexes in access order; repeats after the first are
// dropped) as the working set of the snapshot in dir: it writes their bytes contiguously in
// that order as zstd frames in a new extent file, then replaces the manifest atomically, then
// removes the previous extent. A crash leaves the old manifest, or the new one, whole.
func WriteWorkingSet(dir string, pages []uint64) error {
	s, err := Open(dir)
	if err != nil {
		return err
	}
	defer s.Close()
	m := *s.m
	np := uint64(m.Pages())
	order := make([]uint64, 0, len(pages))
	seen := make([]byte, ceilDiv(int64(np), 8))
	for _, p := range pages {
		if p >= np {
			return fmt.Errorf("snapshot: working set page %d outside the image's %d pages", p, np)
		}
		if seen[p>>3]&(1<<(p&7)) == 0 {
			seen[p>>3] |= 1 << (p & 7)
			order = append(order, p)
		}
	}
	// Within each window of the order, pages by address: vCPUs touching at once interleave
	// their pages in the recording (p, q, p+1, q+1), which would make every page a copy of its
	// own; sorted, neighbours are one UFFDIO_COPY. A window is installed in microseconds, so the
	// order across windows — what the recording is for — stands.
	for w := 0; w < len(order); w += orderWindow {
		slices.Sort(order[w:min(w+orderWindow, len(order))])
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderCRC(false))
	if err != nil {
		return err
	}
	defer enc.Close()
	f, err := createTemp(dir, "workingset")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after the rename, a no-op
	ws := &WorkingSet{Pages: len(order), Order: encodeOrder(order)}
	hash := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(f, hash), 1<<20)
	payload := make([]byte, 0, frameTarget+m.PageSize)
	var comp []byte
	var entries int
	flush := func() error {
		fr := Frame{Entries: entries, Raw: int64(len(payload)), Enc: EncZero}
		if len(payload) > 0 {
			comp = enc.EncodeAll(payload, comp[:0])
			data := comp
			fr.Enc = EncZstd
			if len(comp) >= len(payload) {
				data, fr.Enc = payload, EncRaw
			}
			// The hash of the stored bytes: checked before they are decompressed, and half
			// the hashing of the payload's on the prefetch's path.
			sum := sha256.Sum256(data)
			fr.Hash = hex.EncodeToString(sum[:])
			fr.Stored = int64(len(data))
			if _, err := bw.Write(data); err != nil {
				return err
			}
		}
		ws.Frames = append(ws.Frames, fr)
		ws.ExtentSize += fr.Stored
		payload, entries = payload[:0], 0
		return nil
	}
	for _, p := range order {
		if !m.isZero(int64(p)) {
			l := m.pageLen(int64(p))
			at := len(payload)
			payload = payload[:at+int(l)]
			if _, err := s.ReadAt(payload[at:], int64(p)*m.PageSize); err != nil {
				f.Close()
				return err
			}
		}
		entries++
		if len(payload) >= frameTarget {
			if err := flush(); err != nil {
				f.Close()
				return err
			}
		}
	}
	if entries > 0 {
		if err := flush(); err != nil {
			f.Close()
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := atomicfile.SyncClose(f); err != nil {
		return err
	}
	ws.Extent = "workingset-" + hex.EncodeToString(hash.Sum(nil)) + ".fws"
	if err := os.Rename(tmp, filepath.Join(dir, ws.Extent)); err != nil {
		return err
	}
	old := m.WorkingSet
	m.WorkingSet = ws
	if err := writeManifest(dir, &m); err != nil {
		return err
	}
	if old != nil && old.Extent != ws.Extent {
		os.Remove(filepath.Join(dir, old.Extent))
	}
	return nil
}

// releaseKeeper gives up the keeper's role, if this reader has it: the next reader opened may
// keep what it decodes.
func (r *WorkingSetReader) releaseKeeper() {
	r.s.heldMu.Lock()
	defer r.s.heldMu.Unlock()
	if r.keeper {
		r.s.keeping, r.keeper = false, false
	}
}

// hold keeps frames, the whole working set decoded, for the readers after this one, if none is
// held yet and the cache gives up their bytes.
func (s *Snapshot) hold(frames [][]byte) {
	var n int64
	for _, f := range frames {
		n += int64(len(f))
	}
	s.heldMu.Lock()
	defer s.heldMu.Unlock()
	if s.held != nil || s.closed.Load() || !s.cache.reserve(n) {
		return
	}
	s.held = frames
}

// Intersect returns the pages of a that are also in b, in a's order: the working set to keep
// from two recordings (pages touched in only one run are likely input-specific).
func Intersect(a, b []uint64) []uint64 {
	in := make(map[uint64]struct{}, len(b))
	for _, p := range b {
		in[p] = struct{}{}
	}
	out := make([]uint64, 0, min(len(a), len(b)))
	for _, p := range a {
		if _, ok := in[p]; ok {
			out = append(out, p)
			delete(in, p) // once
		}
	}
	return out
}

// A Run is consecutive pages of the working set, in recorded order, that are also consecutive
// in the image: Page, Page+1, ..., Page+Count-1.
type Run struct {
	Page  uint64
	Count int
	Zero  bool   // all zero: Data is nil (install with ZEROPAGE)
	Data  []byte // the pages' bytes; valid until the next call of Next
}

// A WorkingSetReader streams a snapshot's working set in recorded order: one goroutine reads
// the extent sequentially while two decompress and verify the frames it read, so that reading,
// decompressing and installing overlap; Next hands out runs in order, each frame verified
// before any of its pages. A reader of a snapshot whose working set is held decoded (see
// OpenWorkingSet) hands out runs from memory instead.
type WorkingSetReader struct {
	s       *Snapshot
	f       io.ReadCloser
	order   []uint64
	frames  []Frame
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	inOrder chan *wsFrame // frames as the reader read them
	free    chan *wsFrame // slots for the reader
	cur     *wsFrame      // the frame Next takes runs from
	pos     int           // next order index
	end     int           // order index where cur ends
	data    []byte        // cur's payload not handed out yet
	err     error         // the first error Next returned: every later call returns it

	// held: the frames decoded, from the snapshot (nothing is read); heldNext is the next one.
	held     [][]byte
	heldNext int
	// keep: this reader is the snapshot's one keeper (Snapshot.keeping): it keeps every frame
	// it decodes (kept), for the snapshot to hold once all are in. keeper is whether it still
	// has that role.
	keep, keeper bool
	kept         [][]byte

	closeOnce sync.Once
	closeErr  error
}

// wsFrames is how many frames are read ahead of the one being installed.
const wsFrames = 4

// A wsFrame is one frame in the pipeline: read by the reader, decoded by a decoder.
type wsFrame struct {
	idx   int
	first int   // its first order index
	at    int64 // its offset in the extent
	comp  []byte
	data  []byte
	err   error
	done  chan struct{} // closed when decoded (or failed)
}

// OpenWorkingSet opens the snapshot's working set for streaming (ErrNoWorkingSet if none).
//
// The first reader that streams all of it, every frame verified, leaves it decoded in the
// snapshot when it takes at most half of the cache's bound (Options.CacheSize, or what
// SetCacheSize made it; the frame cache gives up that much): a daemon serving many VMs of one
// snapshot decompresses and verifies it once, and the readers after that hand out runs from
// memory without reading the extent. Of readers streaming at once, one keeps what it decodes.
func (s *Snapshot) OpenWorkingSet() (*WorkingSetReader, error) {
	return s.OpenWorkingSetContext(context.Background())
}

// OpenWorkingSetContext is OpenWorkingSet whose reading stops when ctx ends.
func (s *Snapshot) OpenWorkingSetContext(ctx context.Context) (*WorkingSetReader, error) {
	w := s.m.WorkingSet
	if w == nil {
		return nil, fmt.Errorf("snapshot %s: %w", s.dir, ErrNoWorkingSet)
	}
	order, err := w.order(s.m.Pages())
	if err != nil {
		return nil, err
	}
	r := &WorkingSetReader{s: s, order: order, frames: w.Frames,
		inOrder: make(chan *wsFrame, wsFrames), free: make(chan *wsFrame, wsFrames)}
	r.ctx, r.cancel = context.WithCancel(ctx)
	var raw int64
	for _, fr := range w.Frames {
		raw += fr.Raw
	}
	s.heldMu.Lock()
	r.held = s.held
	// One reader at a time keeps what it decodes: VMs starting at once would each keep a copy.
	if r.held == nil && !s.keeping && raw <= s.cache.boundNow()/2 {
		r.keep, r.keeper, s.keeping = true, true, true
	}
	s.heldMu.Unlock()
	if r.held != nil {
		return r, nil
	}
	f, err := s.files.Extent(r.ctx, w.Extent, w.ExtentSize)
	if err != nil {
		r.releaseKeeper()
		r.cancel()
		return nil, fmt.Errorf("snapshot %s: working set extent: %w", s.dir, ioError(err))
	}
	r.f = f
	for range wsFrames {
		r.free <- &wsFrame{}
	}
	work := make(chan *wsFrame, wsFrames)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer close(work)
		defer close(r.inOrder)
		r.read(work)
	}()
	for range 2 {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			for fr := range work {
				fr.err = r.decode(fr)
				close(fr.done)
			}
		}()
	}
	return r, nil
}

// read reads the frames in order into free slots, handing each to the decoders and to Next.
func (r *WorkingSetReader) read(work chan<- *wsFrame) {
	br := bufio.NewReaderSize(r.f, 1<<20)
	var at int64
	first := 0
	for i, fr := range r.frames {
		var slot *wsFrame
		select {
		case slot = <-r.free:
		case <-r.ctx.Done():
			return
		}
		slot.idx, slot.first, slot.at, slot.err, slot.done = i, first, at, nil, make(chan struct{})
		first += fr.Entries
		if cap(slot.comp) < int(fr.Stored) {
			slot.comp = make([]byte, fr.Stored)
		}
		slot.comp = slot.comp[:fr.Stored]
		if n, err := io.ReadFull(br, slot.comp); err != nil {
			if err == io.ErrUnexpectedEOF || err == io.EOF {
				err = corruptf("truncated: %d of %d bytes", n, fr.Stored)
			}
			slot.err = r.frameError(i, at, ioError(err))
			close(slot.done)
			r.inOrder <- slot
			return
		}
		at += fr.Stored
		r.inOrder <- slot // capacity wsFrames: never blocks while the slot is ours
		select {
		case work <- slot:
		case <-r.ctx.Done():
			return
		}
	}
}

func (r *WorkingSetReader) frameError(i int, at int64, err error) error {
	return fmt.Errorf("snapshot %s: working set frame %d at extent offset %d: %w", r.s.dir, i, at, err)
}

// decode verifies and decompresses a frame read.
func (r *WorkingSetReader) decode(slot *wsFrame) error {
	fr := r.frames[slot.idx]
	at := slot.at
	if fr.Raw == 0 {
		slot.data = slot.data[:0]
		return nil
	}
	if sum := sha256.Sum256(slot.comp); hex.EncodeToString(sum[:]) != fr.Hash {
		return r.frameError(slot.idx, at, corruptf("content hash is %x, want %s", sum[:8], fr.Hash))
	}
	if fr.Enc == EncRaw {
		if r.keep { // comp is the reader's buffer, read into again
			slot.data = slices.Clone(slot.comp)
		} else {
			slot.data = slot.comp
		}
		return nil
	}
	switch {
	case r.keep: // Next took the last one: each frame its own buffer, its exact size
		slot.data = make([]byte, 0, fr.Raw)
	case cap(slot.data) < int(fr.Raw) || &slot.data[:1][0] == &slot.comp[:1][0]:
		slot.data = make([]byte, 0, max(fr.Raw, frameTarget+r.s.m.PageSize))
	}
	out, err := r.s.decodeWith(r.s.wsDec, slot.comp, slot.data[:0:fr.Raw])
	if err != nil {
		return r.frameError(slot.idx, at, err)
	}
	if int64(len(out)) != fr.Raw {
		return r.frameError(slot.idx, at, corruptf("%d payload bytes, want %d", len(out), fr.Raw))
	}
	slot.data = out
	return nil
}

// Pages is the working set's page order.
func (r *WorkingSetReader) Pages() []uint64 { return r.order }

// Next returns the next run, or io.EOF after the last. Its Data is valid until the next call.
// A frame that fails its hash is an error matching ErrCorrupt, naming the frame and its offset
// in the extent.
func (r *WorkingSetReader) Next() (Run, error) {
	if r.err != nil {
		return Run{}, r.err // once failed, always: the pages after a bad frame are not its
	}
	run, err := r.next()
	if err != nil && err != io.EOF {
		r.err = err
	}
	return run, err
}

func (r *WorkingSetReader) next() (Run, error) {
	for r.pos == r.end {
		if r.cur != nil {
			r.free <- r.cur // its pages are handed out: the reader may refill it
			r.cur = nil
		}
		if r.pos == len(r.order) {
			if r.keep && r.kept != nil && len(r.kept) == len(r.frames) {
				r.s.hold(r.kept)
				r.kept = nil
				r.releaseKeeper()
			}
			return Run{}, io.EOF
		}
		if r.held != nil {
			if err := r.ctx.Err(); err != nil {
				return Run{}, fmt.Errorf("%w: %w", ErrTransient, err)
			}
			if r.heldNext == len(r.held) {
				return Run{}, fmt.Errorf("snapshot %s: %w", r.s.dir, corruptf("working set ended at page %d of %d", r.pos, len(r.order)))
			}
			r.data = r.held[r.heldNext]
			r.end += r.frames[r.heldNext].Entries
			r.heldNext++
			continue
		}
		var slot *wsFrame
		var ok bool
		select {
		case slot, ok = <-r.inOrder:
		case <-r.ctx.Done():
			return Run{}, fmt.Errorf("%w: %w", ErrTransient, r.ctx.Err())
		}
		if !ok {
			if err := r.ctx.Err(); err != nil {
				return Run{}, fmt.Errorf("%w: %w", ErrTransient, err)
			}
			return Run{}, fmt.Errorf("snapshot %s: %w", r.s.dir, corruptf("working set extent ended at page %d of %d", r.pos, len(r.order)))
		}
		select {
		case <-slot.done:
		case <-r.ctx.Done():
			return Run{}, fmt.Errorf("%w: %w", ErrTransient, r.ctx.Err())
		}
		if slot.err != nil {
			return Run{}, slot.err
		}
		r.cur, r.data = slot, slot.data
		r.end = slot.first + r.frames[slot.idx].Entries
		if r.keep {
			r.kept = append(r.kept, slot.data)
			slot.data = nil // the decoder allocates the next frame's anew
		}
	}
	m := r.s.m
	first := r.order[r.pos]
	zero := m.isZero(int64(first))
	n := 1
	for r.pos+n < r.end && r.order[r.pos+n] == first+uint64(n) && m.isZero(int64(first)+int64(n)) == zero {
		n++
	}
	run := Run{Page: first, Count: n, Zero: zero}
	if !zero {
		var l int64
		for k := range n {
			l += m.pageLen(int64(first) + int64(k))
		}
		run.Data, r.data = r.data[:l], r.data[l:]
	}
	r.pos += n
	return run, nil
}

// Close stops the reading and closes the extent file.
func (r *WorkingSetReader) Close() error {
	r.closeOnce.Do(func() {
		r.cancel()
		if r.f == nil { // from memory: nothing was started
			return
		}
		defer r.releaseKeeper() // after the decoders stopped: none keeps a frame any more
		// Closing the extent ends a read that waits for a bucket; then the reader and decoders
		// finish (what they still send is drained).
		r.closeErr = r.f.Close()
		go func() {
			for range r.inOrder {
			}
		}()
		r.wg.Wait()
	})
	return r.closeErr
}

// ReadWorkingSet is for callers that need the whole working set with a context (a VM going away
// stops it): it streams every run to fn.
func (s *Snapshot) ReadWorkingSet(ctx context.Context, fn func(Run) error) error {
	r, err := s.OpenWorkingSetContext(ctx)
	if err != nil {
		return err
	}
	defer r.Close()
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%w: %w", ErrTransient, err)
		}
		run, err := r.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := fn(run); err != nil {
			return err
		}
	}
}
