//go:build linux

package engine

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"
	"unsafe"

	"github.com/faultline-go/faultline/source"

	"github.com/faultline-go/faultline/uffd"
)

// fetchJob is a run of pages to read from a non-resident source and install.
type fetchJob struct {
	st    *pageState
	addr  uintptr // address of page idx when the fault was read (it may move: REMAP)
	idx   int
	pages int
	at    time.Time
}

// startFetchers starts the fetcher goroutines and their queue, once: an engine whose sources
// are all resident never has them.
func (e *Engine) startFetchers() {
	e.fetchOnce.Do(func() {
		e.fetchq = make(chan fetchJob, 1024)
		for i := 0; i < e.opts.Fetchers; i++ {
			e.fetchers.Add(1)
			go e.fetcher()
		}
	})
}

// fetcher reads runs from slow sources off the fault path, then installs them under the shared
// lock, re-checking removals that happened while the read was in flight.
func (e *Engine) fetcher() {
	defer e.fetchers.Done()
	// The kernel copies from buf during UFFDIO_COPY, a synchronous call: an ordinary slice
	// serves (the Go heap does not move objects), reused across jobs.
	var buf []byte
	for j := range e.fetchq {
		if e.stopping.Load() {
			continue // drain
		}
		need := j.pages * int(j.st.spec.PageSize)
		if cap(buf) < need {
			buf = make([]byte, need)
		}
		if err := e.fetch(j, buf[:need]); err != nil {
			j.st.stats.errors.Add(1)
			e.fail(err)
		}
	}
}

func (e *Engine) fetch(j fetchJob, buf []byte) error {
	st := j.st
	ps := st.spec.PageSize
	off := st.spec.Offset + int64(j.idx)*int64(ps)
	n, err := e.read(st, buf, off)
	if n < len(buf) {
		if e.stopping.Load() {
			return nil // cancelled: the engine is going
		}
		if err == nil {
			err = errors.New("short read")
		}
		// Never install a partial page: the faulting thread stays blocked, Run reports why.
		return fmt.Errorf("engine: region %q: source read [%d, %d): %w", st.spec.Name, off, off+int64(len(buf)), err)
	}
	for {
		if e.stopping.Load() {
			return nil
		}
		e.mu.RLock()
		// Where the pages are now: a REMAP read while the read was in flight moved them, and
		// an UNMAP dropped them. Each piece is installed up to its first page removed
		// meanwhile (those get zeros when they fault again, never what we read).
		var ierr error
		var installed int
		e.tab.Load().each(st, j.idx, j.pages, func(addr uintptr, idx, n int) {
			if ierr != nil {
				return
			}
			pages := st.removed.nextSet(idx, idx+n) - idx
			if pages == 0 {
				return
			}
			src := buf[(idx-j.idx)*int(ps):]
			done, err := e.fd.Copy(addr, uintptr(unsafe.Pointer(&src[0])), uintptr(pages)*ps, 0)
			if d := int(done / ps); d > 0 {
				st.recordInstall(idx, d, uint64(done), false, j.at)
				installed += d
			} else if errors.Is(err, uffd.ErrExist) {
				// The first page is mapped — or so the kernel says: an empty hugetlb pool
				// answers EEXIST too. Mark it as the fault path does, so faults that keep
				// coming for it count as duplicates and that livelock is caught. (A COPY that
				// stops part-way answers ErrPartial; the pages after it fault again.)
				st.installed.setRange(idx, idx+1)
			}
			switch {
			case err == nil, errors.Is(err, uffd.ErrPartial), errors.Is(err, uffd.ErrExist), errors.Is(err, uffd.ErrNotRegistered):
			default:
				ierr = err
			}
		})
		e.mu.RUnlock()
		if errors.Is(ierr, uffd.ErrEventsPending) {
			st.stats.retries.Add(1)
			time.Sleep(20 * time.Microsecond) // the reader reads the events; then retry
			continue
		}
		runtime.KeepAlive(buf)
		// Faults on pages of this run were dropped while it was in flight; those not installed
		// now must fault again and be served afresh: clear the mark, then wake them — where the
		// pages are now, and where they were when the fault was queued (a thread that faulted
		// there before an mremap sleeps on that address).
		st.fetching.clearRange(j.idx, j.idx+j.pages)
		if installed < j.pages {
			if werr := e.wakeRun(st, j); werr != nil {
				return werr
			}
		}
		switch {
		case ierr == nil:
			return nil
		case errors.Is(ierr, uffd.ErrProcessGone):
			e.fail(ErrProcessGone)
			return nil
		}
		return fmt.Errorf("engine: region %q: install fetched pages at %#x: %w", st.spec.Name, j.addr, ierr)
	}
}

// read reads the source for a fetch, retrying transient errors (source.ErrTransient) with
// exponential backoff and jitter — up to 7 tries over about 1.3 s — while the engine runs.
// A ContextReader's read is cancelled when the engine stops.
func (e *Engine) read(st *pageState, buf []byte, off int64) (int, error) {
	backoff := 10 * time.Millisecond
	for try := 1; ; try++ {
		var n int
		var err error
		if st.ctxReader != nil {
			n, err = st.ctxReader.ReadAtContext(e.ctx, buf, off)
		} else {
			n, err = st.spec.Source.ReadAt(buf, off)
		}
		if n == len(buf) || !errors.Is(err, source.ErrTransient) || try == 7 || e.stopping.Load() {
			return n, err
		}
		st.stats.retries.Add(1)
		t := time.NewTimer(backoff/2 + time.Duration(rand.Int64N(int64(backoff))))
		select {
		case <-t.C:
		case <-e.ctx.Done():
			t.Stop()
			return n, err
		}
		backoff *= 2
	}
}

// wakeRun wakes the threads that may sleep on pages of a fetch job.
func (e *Engine) wakeRun(st *pageState, j fetchJob) error {
	ps := st.spec.PageSize
	var werr error
	wake := func(addr uintptr, n int) {
		if err := e.fd.Wake(addr, uintptr(n)*ps); err != nil && !errors.Is(err, uffd.ErrProcessGone) && werr == nil {
			werr = err
		}
	}
	e.tab.Load().each(st, j.idx, j.pages, func(addr uintptr, _, n int) { wake(addr, n) })
	wake(j.addr, j.pages)
	return werr
}
