//go:build linux

package engine

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/faultline-go/faultline/uffd"
)

// Durable memory (Options.Durable) is where an engine keeps what a successor serving the same
// userfaultfd must know so that it never serves a wrong byte after this process dies: which
// pages were removed (REMOVE, UNMAP), and the last batch of messages read; and, so that it need
// not find them out again, which pages are installed (a prefetch resumed skips them) and dirty. The reader reads
// straight into the journal, so a REMOVE is durable the moment read(2) returns — before the
// madvise it completes can zap a page, and before this engine acts on it; a process killed
// between the read and applying it leaves the message for Resume to apply. The memory must
// outlive the process: a MAP_SHARED mapping of a file on tmpfs survives a crash without fsync.

// durableBits is one region's bitmaps in durable memory.
type durableBits struct{ removed, installed, dirty *bitmap }

// durableLayout cuts mem (DurableSize(regions) bytes, 8-byte aligned) into the journal and each
// region's bitmaps.
func durableLayout(mem []byte, regions []Region) (journal []uffd.Msg, bits []durableBits, err error) {
	if len(mem) < DurableSize(regions) {
		return nil, nil, fmt.Errorf("engine: durable memory of %d bytes, need %d (DurableSize)", len(mem), DurableSize(regions))
	}
	if uintptr(unsafe.Pointer(unsafe.SliceData(mem)))%8 != 0 {
		return nil, nil, errors.New("engine: durable memory not 8-byte aligned")
	}
	journal = unsafe.Slice((*uffd.Msg)(unsafe.Pointer(&mem[0])), JournalMsgs)
	off := JournalMsgs * uffd.MsgSize
	next := func(pages int) *bitmap {
		w := bitmapWords(pages)
		var words []atomic.Uint64
		if w > 0 {
			words = unsafe.Slice((*atomic.Uint64)(unsafe.Pointer(&mem[off])), w)
		}
		off += w * 8
		return &bitmap{w: words, n: pages}
	}
	for _, r := range regions {
		pages := int(r.Size / r.PageSize)
		bits = append(bits, durableBits{removed: next(pages), installed: next(pages), dirty: next(pages)})
	}
	return journal, bits, nil
}

// Resume prepares an engine for a userfaultfd that a previous engine served, from the durable
// memory that engine kept (opts.Durable, the same regions in the same order). As with New, the
// engine owns fd once Resume succeeds, and fd stays the caller's if it fails: a daemon
// recovering its VMs after a crash, or taking them over from its predecessor. Like New it does
// no UFFDIO_API or UFFDIO_REGISTER — the fd was initialised and its ranges registered by the
// VMM, and those survive any handler. Resume applies the events of the journal (the batch the
// predecessor read last, which it may not have applied), and wakes every region's range:
// threads that sleep on faults the predecessor read but did not serve fault again, and those
// faults come to this engine. Pages the predecessor installed are known from the durable
// bitmap; one it installed but had not marked yet (it died in between) cannot fault, and a
// copy onto it answers EEXIST, which counts as served.
func Resume(fd *uffd.FD, regions []Region, opts Options) (*Engine, error) {
	if opts.Durable == nil {
		return nil, errors.New("engine: Resume needs the predecessor's durable memory (Options.Durable)")
	}
	if err := validate(regions); err != nil {
		return nil, err
	}
	// Woken first: nothing is served before Run, so the faults they bring wait for it.
	for _, r := range regions {
		if err := fd.Wake(r.Base, r.Size); err != nil && !errors.Is(err, uffd.ErrProcessGone) {
			return nil, fmt.Errorf("engine: wake %q on resume: %w", r.Name, err)
		}
	}
	e, err := New(fd, regions, opts)
	if err != nil {
		return nil, err
	}
	for i := range e.journal {
		if ev := e.journal[i].Event(); ev == uffd.EventRemove || ev == uffd.EventUnmap {
			e.applyRemoval(&e.journal[i])
		}
	}
	clear(e.journal)
	return e, nil
}
