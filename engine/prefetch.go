//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

type prefetchCounters struct {
	pages, skipped atomic.Uint64
	doneNs         atomic.Int64 // duration of the last Prefetch that finished
	running        atomic.Int32 // Prefetch calls in progress: the reader does not spin meanwhile
}

// Prefetch installs the runs next yields, in that order, until next returns io.EOF, ctx ends or
// the engine stops — concurrently with faults, which are served as they come (a fault on a page
// not prefetched yet does not wait for the prefetch). Pages already installed, removed (they read
// zero now) or being fetched are skipped; the rest of a run is installed with one UFFDIO_COPY
// (UFFDIO_ZEROPAGE for zero runs) per contiguous piece of up to 2 MiB, where the pages are now.
// While it runs the reader parks instead of spinning for faults: the CPU a spin would take is
// the prefetch's (and its decompression's). It returns nil at io.EOF or when the engine
// stopped, ctx's error when ctx ended first, and next's or the kernel's error otherwise; the
// engine keeps serving faults either way.
func (e *Engine) Prefetch(ctx context.Context, next func() (PageRun, error)) (PrefetchStats, error) {
	start := time.Now()
	var ps PrefetchStats
	e.prefetch.running.Add(1)
	defer func() {
		e.prefetch.running.Add(-1)
		ps.Duration = time.Since(start)
		e.prefetch.doneNs.Store(int64(ps.Duration))
	}()
	for {
		if e.stopping.Load() {
			return ps, nil
		}
		if err := ctx.Err(); err != nil {
			return ps, err
		}
		run, err := next()
		if errors.Is(err, io.EOF) {
			return ps, nil
		}
		if err != nil {
			return ps, err
		}
		if err := e.prefetchRun(run, &ps); err != nil {
			if errors.Is(err, ErrProcessGone) {
				return ps, nil // the engine learns it from the next fault or event
			}
			return ps, err
		}
	}
}

// PrefetchTotals returns the pages every Prefetch installed and skipped so far, and how long
// the last one that returned took (0 if none has).
func (e *Engine) PrefetchTotals() PrefetchStats {
	return PrefetchStats{Pages: e.prefetch.pages.Load(), Skipped: e.prefetch.skipped.Load(),
		Duration: time.Duration(e.prefetch.doneNs.Load())}
}

// prefetchRun installs one run into every region that maps its image range: the region's whole
// pages within the run (a run shorter than a huge page installs nothing into a hugetlb region).
func (e *Engine) prefetchRun(run PageRun, ps *PrefetchStats) error {
	if run.Data != nil && int64(len(run.Data)) < run.Len {
		return fmt.Errorf("engine: prefetch run at %d: %d bytes of data for %d", run.Off, len(run.Data), run.Len)
	}
	for _, st := range e.states {
		psz := int64(st.spec.PageSize)
		lo, hi := max(run.Off, st.spec.Offset), min(run.Off+run.Len, st.spec.Offset+int64(st.spec.Size))
		a := int((lo - st.spec.Offset + psz - 1) / psz) // first whole page in the run
		b := int((hi - st.spec.Offset) / psz)           // end of the last whole one
		if a >= b {
			continue
		}
		var data []byte
		if run.Data != nil {
			data = run.Data[st.spec.Offset+int64(a)*psz-run.Off:]
		}
		if err := e.prefetchPages(st, a, b, data, ps); err != nil {
			return err
		}
	}
	return nil
}

// maxPrefetchCopy bounds one prefetch ioctl, so the reader never waits long for the lock.
const maxPrefetchCopy = 2 << 20

// prefetchPages installs pages [a, b) of st from data (the bytes of page a on; nil: zeros).
func (e *Engine) prefetchPages(st *pageState, a, b int, data []byte, ps *PrefetchStats) error {
	psz := st.spec.PageSize
	maxPages := max(int(maxPrefetchCopy/psz), 1)
	for i := a; i < b; {
		e.mu.RLock()
		if e.stopping.Load() {
			// Checked under the lock: release, which frees the zero buffer, takes it
			// exclusively once stopping is set.
			e.mu.RUnlock()
			return nil
		}
		// The next piece: pages neither installed, removed nor being fetched.
		j := i
		for j < b && (st.installed.get(j) || st.removed.get(j) || st.fetching.get(j)) {
			j++
		}
		skipped := j - i
		end := min(j+maxPages, b)
		end = st.installed.nextSet(j, end)
		end = st.removed.nextSet(j, end)
		end = st.fetching.nextSet(j, end)
		var done int
		var err error
		if j < end {
			done, err = e.prefetchPiece(st, j, end-j, data, a)
		}
		if errors.Is(err, uffd.ErrExist) && !errors.Is(err, uffd.ErrPartial) {
			st.installed.setRange(j+done, j+done+1) // mapped by a fault meanwhile
		}
		e.mu.RUnlock()
		ps.Skipped += uint64(skipped)
		e.prefetch.skipped.Add(uint64(skipped))
		if done > 0 {
			ps.Pages += uint64(done)
			e.prefetch.pages.Add(uint64(done))
		}
		switch {
		case err == nil:
			i = max(end, j+1)
		case errors.Is(err, uffd.ErrEventsPending):
			st.stats.retries.Add(1)
			time.Sleep(20 * time.Microsecond) // the reader reads the events; then the rest of it
			i = j + done
		case errors.Is(err, uffd.ErrPartial):
			i = j + max(done, 1) // stopped part-way: the rest again (a mapped page answers EEXIST then)
		case errors.Is(err, uffd.ErrExist):
			i = j + done + 1 // a fault installed that page meanwhile: go on after it
		case errors.Is(err, uffd.ErrNotRegistered):
			i = end // unmapped or unregistered meanwhile: nothing to install there
		case errors.Is(err, uffd.ErrProcessGone):
			return ErrProcessGone
		default:
			return fmt.Errorf("engine: region %q: prefetch at page %d: %w", st.spec.Name, j, err)
		}
	}
	return nil
}

// prefetchPiece installs n pages of st from page idx, where they are mapped now; data holds the
// bytes from page first on (nil: zeros). It returns how many pages, from idx on, went in. The
// caller holds e.mu shared.
func (e *Engine) prefetchPiece(st *pageState, idx, n int, data []byte, first int) (int, error) {
	psz := st.spec.PageSize
	var done int
	var err error
	e.tab.Load().each(st, idx, n, func(addr uintptr, k, m int) {
		if err != nil || k != idx+done {
			return // an earlier piece failed, or a gap (unmapped pages): stop at it
		}
		var got uintptr
		switch {
		case data != nil:
			src := data[(k-first)*int(psz):]
			got, err = e.fd.Copy(addr, uintptr(unsafe.Pointer(&src[0])), uintptr(m)*psz, 0)
		case psz > uintptr(unix.Getpagesize()):
			for p := 0; p < m && err == nil; p++ {
				var c uintptr
				c, err = e.fd.Copy(addr+uintptr(p)*psz, uintptr(unsafe.Pointer(&e.zeroBuf[0])), psz, 0)
				got += c
			}
		default:
			got, err = e.fd.Zeropage(addr, uintptr(m)*psz, 0)
		}
		d := int(got / psz)
		if d > 0 {
			st.installed.setRange(k, k+d)
			st.stats.pagesPrefetched.Add(uint64(d))
			if data != nil {
				st.stats.bytes.Add(uint64(got))
			}
			done += d
		}
	})
	if err == nil && done < n {
		err = uffd.ErrNotRegistered // the rest is not mapped (any more)
	}
	return done, err
}
