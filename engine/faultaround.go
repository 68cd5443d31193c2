package engine

import "sync"

// FaultAround sets how many pages one fault installs.
//
// Fixed (Adaptive false): Max pages from the faulting one on.
//
// Adaptive: the engine keeps several streams per region, as the kernel's readahead keeps state
// per open file, so that threads each walking their own part of memory in order (a VM's vCPUs)
// are told apart. A fault that lands where a stream's last window ended (or a few pages past)
// continues that stream, and doubles its window, up to Max; any other fault starts a new stream (replacing the one
// unused longest) with Min pages. A window is only ever what its stream earned: on random
// access every fault starts a stream, so it stays at Min.
//
// Either way a window is capped at MaxBytes (default 2 MiB, at least one page): on hugetlb a
// window of 64 pages would be 128 MiB in one UFFDIO_COPY, holding up the reading of events.
//
// With a source that has a natural unit of reading (source.Extent: a packed snapshot's
// compressed frame), a window never goes past the end of the faulting page's unit, and an
// adaptive one is all of the rest of it (up to Max): the unit is read and decompressed whole
// anyway.
type FaultAround struct {
	Min, Max int
	Adaptive bool
	MaxBytes int
}

// DefaultFaultAroundBytes is the default cap of a fault-around window.
const DefaultFaultAroundBytes = 2 << 20

// faultStreams is how many sequential streams adaptive fault-around tracks per region: more
// than the vCPUs of a typical microVM.
const faultStreams = 16

// streamSlack is how far past a stream's expected next page a fault may land and still continue
// it: enough for a walk shared by several threads (each taking every n-th page), small enough
// that random faults rarely continue a stream by chance (16 streams × 9 pages of 65,536).
const streamSlack = 8

func (f FaultAround) normalized() FaultAround {
	f.Min = max(f.Min, 1)
	f.Max = max(f.Max, f.Min)
	if f.MaxBytes <= 0 {
		f.MaxBytes = DefaultFaultAroundBytes
	}
	return f
}

// faultAround is the per-region window state.
type faultAround struct {
	cfg      FaultAround
	min, max int // in pages, after the byte cap

	mu      sync.Mutex
	streams [faultStreams]stream
	clock   uint64
}

// stream is one sequential walk: where its next fault is expected and the window it earned.
type stream struct {
	next   int // page index where the last window ended; -1: unused
	window int
	used   uint64 // clock of the last fault that continued or started it
}

func (f *faultAround) init(c FaultAround, pageSize uintptr) {
	f.cfg = c.normalized()
	capPages := max(int(uintptr(f.cfg.MaxBytes)/pageSize), 1)
	f.max = min(f.cfg.Max, capPages)
	f.min = min(f.cfg.Min, f.max)
	for i := range f.streams {
		f.streams[i].next = -1
	}
}

// pages returns the window for a fault on page i.
func (f *faultAround) pages(i int) int {
	if !f.cfg.Adaptive {
		return f.max
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clock++
	oldest := 0
	for k := range f.streams {
		s := &f.streams[k]
		// Continuing: inside the last window (it was cut short by a page installed already, so
		// the walk faults again before its end), at its end, or a few pages past it — threads
		// that share one walk, each taking every n-th page, fault slightly out of order.
		if s.next >= 0 && i >= s.next-s.window && i <= s.next+streamSlack {
			s.window = min(s.window*2, f.max)
			s.next = max(s.next, i+s.window)
			s.used = f.clock
			return s.window
		}
		if s.used < f.streams[oldest].used {
			oldest = k
		}
	}
	s := &f.streams[oldest]
	s.window, s.next, s.used = f.min, i+f.min, f.clock
	return s.window
}
