//go:build linux

package engine

import (
	"errors"
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// fetchJob is a run of pages to read from a non-resident source and install.
type fetchJob struct {
	st    *pageState
	addr  uintptr // address of page idx in the faulting process
	idx   int
	pages int
	at    time.Time
}

// fetcher reads runs from slow sources off the fault path, then installs them under the shared
// lock, re-checking removals that happened while the read was in flight.
func (e *Engine) fetcher() {
	defer e.wg.Done()
	var buf []byte
	defer func() {
		if buf != nil {
			unix.Munmap(buf)
		}
	}()
	for j := range e.fetchq {
		ps := j.st.spec.PageSize
		need := j.pages * int(ps)
		if len(buf) < need {
			if buf != nil {
				unix.Munmap(buf)
			}
			var err error
			// Outside the Go heap: the kernel reads it during COPY and nothing may move it.
			buf, err = unix.Mmap(-1, 0, need, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				e.fail(fmt.Errorf("engine: fetch buffer: %w", err))
				j.st.fetching.clearRange(j.idx, j.idx+j.pages)
				continue
			}
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
	n, err := st.spec.Source.ReadAt(buf, off)
	if n < len(buf) {
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
		// Pages removed while the read was in flight get zeros, not what we read.
		pages := st.removed.nextSet(j.idx, j.idx+j.pages) - j.idx
		var done uintptr
		err = nil
		if pages > 0 {
			done, err = e.fd.Copy(j.addr, uintptr(unsafe.Pointer(&buf[0])), uintptr(pages)*ps, 0)
		}
		d := int(done / ps)
		if d > 0 {
			st.recordInstall(j.idx, d, uint64(done), j.at)
		}
		if errors.Is(err, uffd.ErrExist) {
			// The page where the COPY stopped is mapped — or so the kernel says: an empty
			// hugetlb pool answers EEXIST too. Mark it as the fault path does, so faults that
			// keep coming for it count as duplicates and that livelock is caught (pitfall 3).
			st.installed.setRange(j.idx+d, j.idx+d+1)
		}
		e.mu.RUnlock()
		if errors.Is(err, uffd.ErrEventsPending) {
			st.stats.retries.Add(1)
			time.Sleep(20 * time.Microsecond) // the workers read the events; then retry
			continue
		}
		// Faults on pages of this run were dropped while it was in flight; those not installed
		// now must fault again and be served afresh: clear the mark, then wake them.
		st.fetching.clearRange(j.idx, j.idx+j.pages)
		if d < j.pages {
			if werr := e.fd.Wake(j.addr+uintptr(d)*ps, uintptr(j.pages-d)*ps); werr != nil && !errors.Is(werr, uffd.ErrProcessGone) {
				return werr
			}
		}
		switch {
		case err == nil, errors.Is(err, uffd.ErrPartial), errors.Is(err, uffd.ErrExist), errors.Is(err, uffd.ErrNotRegistered):
			return nil
		case errors.Is(err, uffd.ErrProcessGone):
			e.fail(ErrProcessGone)
			return nil
		}
		return fmt.Errorf("engine: region %q: install fetched page %#x: %w", st.spec.Name, j.addr, err)
	}
}
