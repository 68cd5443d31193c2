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

	"github.com/klauspost/compress/zstd"
)

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
			sum := sha256.Sum256(payload)
			fr.Hash = hex.EncodeToString(sum[:])
			comp = enc.EncodeAll(payload, comp[:0])
			data := comp
			fr.Enc = EncZstd
			if len(comp) >= len(payload) {
				data, fr.Enc = payload, EncRaw
			}
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
	err = bw.Flush()
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
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

// A WorkingSetReader streams a snapshot's working set in recorded order, with one sequential
// read of its extent file, verifying each frame's hash before yielding any of its pages.
type WorkingSetReader struct {
	s      *Snapshot
	f      io.ReadCloser
	r      *bufio.Reader
	order  []uint64
	frames []Frame
	fi     int    // next frame
	pos    int    // next order index
	end    int    // order index where the current frame ends
	data   []byte // current frame's payload
	comp   []byte
	off    int64 // extent offset of the next frame
}

// OpenWorkingSet opens the snapshot's working set for streaming (ErrNoWorkingSet if none).
func (s *Snapshot) OpenWorkingSet() (*WorkingSetReader, error) {
	w := s.m.WorkingSet
	if w == nil {
		return nil, fmt.Errorf("snapshot %s: %w", s.dir, ErrNoWorkingSet)
	}
	order, err := w.order(s.m.Pages())
	if err != nil {
		return nil, err
	}
	f, err := s.files.Extent(context.Background(), w.Extent, w.ExtentSize)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: working set extent: %w", s.dir, ioError(err))
	}
	return &WorkingSetReader{s: s, f: f, r: bufio.NewReaderSize(f, 1<<20), order: order, frames: w.Frames}, nil
}

// Pages is the working set's page order.
func (r *WorkingSetReader) Pages() []uint64 { return r.order }

// Next returns the next run, or io.EOF after the last. A frame that fails its hash is an error
// matching ErrCorrupt, naming the frame and its offset in the extent.
func (r *WorkingSetReader) Next() (Run, error) {
	for r.pos == r.end {
		if r.fi == len(r.frames) {
			return Run{}, io.EOF
		}
		if err := r.loadFrame(); err != nil {
			return Run{}, err
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

func (r *WorkingSetReader) loadFrame() error {
	fr := r.frames[r.fi]
	at := r.off
	fail := func(err error) error {
		return fmt.Errorf("snapshot %s: working set frame %d at extent offset %d: %w", r.s.dir, r.fi, at, err)
	}
	if cap(r.comp) < int(fr.Stored) {
		r.comp = make([]byte, fr.Stored)
	}
	comp := r.comp[:fr.Stored]
	if n, err := io.ReadFull(r.r, comp); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			return fail(corruptf("truncated: %d of %d bytes", n, fr.Stored))
		}
		return fail(ioError(err))
	}
	var data []byte
	switch fr.Enc {
	case EncZero:
	case EncRaw:
		data = comp
	case EncZstd:
		out, err := r.s.dec.DecodeAll(comp, make([]byte, 0, fr.Raw))
		if err != nil {
			return fail(corruptf("zstd: %v", err))
		}
		data = out
	}
	if int64(len(data)) != fr.Raw {
		return fail(corruptf("%d payload bytes, want %d", len(data), fr.Raw))
	}
	if fr.Raw > 0 {
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != fr.Hash {
			return fail(corruptf("content hash is %x, want %s", sum[:8], fr.Hash))
		}
	}
	r.data = data
	r.end = r.pos + fr.Entries
	r.off += fr.Stored
	r.fi++
	return nil
}

// Close closes the extent file.
func (r *WorkingSetReader) Close() error { return r.f.Close() }

// ReadWorkingSet is for callers that need the whole working set with a context (a VM going away
// stops it): it streams every run to fn.
func (s *Snapshot) ReadWorkingSet(ctx context.Context, fn func(Run) error) error {
	r, err := s.OpenWorkingSet()
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
