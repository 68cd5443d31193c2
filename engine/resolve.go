//go:build linux

package engine

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// installer resolves faults under the engine's shared lock: the reader is one, each helper
// another. Its state is its own, allocated once.
type installer struct {
	e        *Engine
	deferred []fault // waiting on pending events (EAGAIN): retried after the next read
	retry    []fault
	dupAddr  uintptr
	dupRun   int
	job      fetchJob // a fetch to queue once the lock is released
	hasJob   bool
	poolPage uintptr    // a huge page that keeps faulting: check the pool once the lock is released
	poolSt   *pageState //
}

func (e *Engine) newInstaller() *installer {
	return &installer{e: e, deferred: make([]fault, 0, 64), retry: make([]fault, 0, 64)}
}

var (
	errStop      = errors.New("engine: stop")
	errPoolCheck = errors.New("engine: check the hugetlb pool")
)

// resolve serves one fault.
func (in *installer) resolve(f fault) error {
	e := in.e
	e.mu.RLock()
	err := in.resolveLocked(f)
	e.mu.RUnlock()
	if in.hasJob {
		// Queued outside the lock: a full queue must not block a fetcher that needs it.
		in.hasJob = false
		e.startFetchers()
		e.fetchq <- in.job
	}
	switch err {
	case errStop:
		e.fail(ErrProcessGone)
		return nil
	case errPoolCheck:
		return in.poolError()
	}
	return err
}

// retryDeferred resolves again the faults that met pending events.
func (in *installer) retryDeferred() error {
	if len(in.deferred) == 0 {
		return nil
	}
	in.retry, in.deferred = in.deferred, in.retry[:0]
	for _, f := range in.retry {
		if err := in.resolve(f); err != nil {
			return err
		}
	}
	in.retry = in.retry[:0]
	return nil
}

func (in *installer) resolveLocked(f fault) error {
	e := in.e
	pf := f.pf
	sp := e.tab.Load().lookup(pf.Address)
	if sp == nil {
		// Not ours (any more): unmapped, or moved by a REMAP read after this fault. Waking lets
		// the thread retry; if the page is registered elsewhere its fault comes back with the
		// new address.
		return in.unknown(pf.Address)
	}
	st := sp.st
	ps := st.spec.PageSize
	page := pf.Address &^ (ps - 1)
	idx := sp.first + int((page-sp.base)/ps)
	st.stats.faults.Add(1)
	switch {
	case pf.Flags&uffd.FaultWP != 0:
		st.stats.wp.Add(1)
		st.dirty.setRange(idx, idx+1)
		err := e.fd.Writeprotect(page, ps, 0)
		return in.check(err, st, f, page, ps, idx)
	case pf.Flags&uffd.FaultMinor != 0:
		st.stats.minor.Add(1)
		_, err := e.fd.Continue(page, ps, 0)
		if errors.Is(err, uffd.ErrExist) {
			err = e.fd.Wake(page, ps)
		}
		return in.check(err, st, f, page, ps, idx)
	}
	st.stats.missing.Add(1)
	if st.installed.get(idx) {
		return in.duplicate(st, f, page, ps, idx)
	}
	if page != in.dupAddr {
		// A fault on another page ends a run of duplicates. Not one on the same page: after
		// duplicate forgets the page, the run must go on counting until the page really is
		// installed, or an empty hugetlb pool (COPY says EEXIST forever) loops forever.
		in.dupRun = 0
	}
	if st.fetching.get(idx) {
		return nil // the fetch in flight installs and wakes it
	}
	// The window: fault-around pages after the faulting one, stopping before any page that is
	// installed or being fetched, at the end of the span, and where pages stop being removed
	// (zeros) or start being removed (source data).
	if st.rec != nil {
		st.rec.touch(st, idx)
	}
	win := st.fa.pages(idx)
	if st.extent > 0 {
		// Not past the end of the source's unit (a compressed frame) holding the faulting
		// page; and, adaptive, all of the rest of it: the unit is read and decompressed
		// whole anyway, and its neighbours are likely next (the kernel's fault-around and
		// readahead bet the same way).
		img := st.spec.Offset/int64(ps) + int64(idx)
		rest := int(int64(st.extent) - img%int64(st.extent))
		if win = min(win, rest); st.fa.cfg.Adaptive {
			win = min(rest, st.fa.max)
		}
	}
	limit := min(idx+win, sp.first+sp.n)
	limit = st.installed.nextSet(idx+1, limit)
	limit = st.fetching.nextSet(idx+1, limit)
	if st.removed.get(idx) {
		limit = st.removed.nextClear(idx+1, limit)
		return in.zeroRun(st, f, page, uintptr(limit-idx)*ps, ps, idx)
	}
	limit = st.removed.nextSet(idx+1, limit)
	srcOff := st.spec.Offset + int64(idx)*int64(ps)
	length := uintptr(limit-idx) * ps
	if st.zeros != nil {
		if z := uintptr(st.zeros.ZeroRun(srcOff, int64(length))) / ps * ps; z > 0 {
			return in.zeroRun(st, f, page, z, ps, idx)
		}
	}
	var src []byte
	switch {
	case st.resident != nil:
		src = st.resident.Bytes(srcOff, int64(length))
	case st.cached != nil:
		src, _ = st.cached.Cached(srcOff, int64(length))
	}
	if src == nil {
		st.fetching.setRange(idx, limit)
		in.job, in.hasJob = fetchJob{st: st, addr: page, idx: idx, pages: limit - idx, at: f.at}, true
		return nil
	}
	n, err := e.fd.Copy(page, uintptr(unsafe.Pointer(&src[0])), length, 0)
	runtime.KeepAlive(src)
	if done := int(n / ps); done > 0 {
		in.dupRun = 0
		st.recordInstall(idx, done, uint64(n), false, f.at)
		if err != nil && errors.Is(err, uffd.ErrPartial) {
			return nil // the faulting page is in; the rest stopped at a mapped page
		}
	}
	return in.check(err, st, f, page, ps, idx)
}

// check handles the errors of a resolving ioctl for the faulting page.
func (in *installer) check(err error, st *pageState, f fault, page, ps uintptr, idx int) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, uffd.ErrExist):
		// Mapped already (another thread, an earlier fault-around): done, wake the waiters.
		st.installed.setRange(idx, idx+1)
		return in.wake(page, ps)
	case errors.Is(err, uffd.ErrEventsPending):
		st.stats.retries.Add(1)
		// One deferred fault per page: a thread interrupted by signals while the events last
		// reports its fault again and again, and every copy retried would come back as a
		// duplicate once the page is in (looking like a page that keeps faulting).
		for i := range in.deferred {
			if in.deferred[i].pf.Address&^(ps-1) == page {
				return nil
			}
		}
		f.retried = true
		in.deferred = append(in.deferred, f)
		return nil
	case errors.Is(err, uffd.ErrNotRegistered):
		// Unregistered or unmapped under us: a thread can still sleep on the range, since
		// UNREGISTER wakes before it splits the area and a fault can queue in between. Wake.
		return in.wake(page, ps)
	case errors.Is(err, uffd.ErrProcessGone):
		return errStop
	}
	st.stats.errors.Add(1)
	return fmt.Errorf("engine: region %q: fault at %#x: %w", st.spec.Name, f.pf.Address, err)
}

func (in *installer) wake(page, length uintptr) error {
	err := in.e.fd.Wake(page, length)
	if errors.Is(err, uffd.ErrProcessGone) {
		return errStop
	}
	return err
}

func (in *installer) unknown(addr uintptr) error {
	ps := uintptr(unix.Getpagesize())
	if addr == in.dupAddr {
		in.dupRun++
		if in.dupRun > 1000 {
			return fmt.Errorf("engine: faults at %#x keep coming and it is in no region", addr)
		}
	} else {
		in.dupAddr, in.dupRun = addr, 1
	}
	return in.wake(addr&^(ps-1), ps)
}

// duplicate handles a fault on a page already installed: every faulting thread reports its own
// fault, and signals make threads fault again. Wake and move on — unless the same page keeps
// coming back, which is the empty-hugetlb-pool livelock: Firecracker maps hugetlb memory
// MAP_NORESERVE, and with no free huge page COPY answers EEXIST while nothing is mapped.
func (in *installer) duplicate(st *pageState, f fault, page, ps uintptr, idx int) error {
	st.stats.duplicates.Add(1)
	if f.retried {
		// A deferred fault whose page went in meanwhile (by another fault of it): not a sign
		// of a page that keeps faulting.
		return in.wake(page, ps)
	}
	if page == in.dupAddr {
		in.dupRun++
	} else {
		in.dupAddr, in.dupRun = page, 1
	}
	switch {
	case in.dupRun == 64:
		// Maybe we were wrong that it is installed: forget and install it again.
		st.installed.clearRange(idx, idx+1)
	case in.dupRun > 256:
		in.poolSt, in.poolPage = st, page
		return errPoolCheck // the /proc read happens outside the lock
	}
	if st.removed.get(idx) {
		// A released page can be gone although we installed it: the kernel zaps the range only
		// after we read its REMOVE, so zeros installed in between (for a fault queued meanwhile)
		// are zapped too and the bit lies. Waking would send the thread straight back, over and
		// over; install zeros again instead (EEXIST: it is there, wake). The bit is cleared so
		// that an EAGAIN retry comes back as a fresh fault, not as another duplicate.
		st.installed.clearRange(idx, idx+1)
		return in.zeroRun(st, f, page, ps, ps, idx)
	}
	return in.wake(page, ps)
}

// poolError is the error for a page that keeps faulting after it was installed, naming an
// exhausted hugetlb pool when that is the cause.
func (in *installer) poolError() error {
	st, page := in.poolSt, in.poolPage
	if st.spec.PageSize > uintptr(unix.Getpagesize()) {
		if h, err := memory.ReadHugePages(); err == nil && h.Free == 0 {
			return fmt.Errorf("engine: region %q: hugetlb pool exhausted (0 free of %d): page %#x cannot be installed; reserve more in /proc/sys/vm/nr_hugepages", st.spec.Name, h.Total, page)
		}
	}
	return fmt.Errorf("engine: region %q: page %#x keeps faulting after it was installed", st.spec.Name, page)
}

// zeroRun installs length bytes of zeros from page: ZEROPAGE where the memory supports it, a COPY
// of zeros on hugetlb (one huge page at a time).
func (in *installer) zeroRun(st *pageState, f fault, page, length, ps uintptr, idx int) error {
	e := in.e
	var n uintptr
	var err error
	if ps > uintptr(unix.Getpagesize()) {
		n, err = e.fd.Copy(page, uintptr(unsafe.Pointer(&e.zeroBuf[0])), ps, 0)
	} else {
		n, err = e.fd.Zeropage(page, length, 0)
	}
	if done := int(n / ps); done > 0 {
		in.dupRun = 0
		st.recordInstall(idx, done, 0, true, f.at)
		if err != nil && errors.Is(err, uffd.ErrPartial) {
			return nil
		}
	}
	return in.check(err, st, f, page, ps, idx)
}
