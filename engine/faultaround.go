package engine

import "sync/atomic"

// FaultAround sets how many pages one fault installs. With Adaptive, the window doubles on each
// fault that continues the previous one (sequential access) up to Max, and halves on a jump
// down to Min; otherwise it stays at Max.
type FaultAround struct {
	Min, Max int
	Adaptive bool
}

func (f FaultAround) normalized() FaultAround {
	f.Min = max(f.Min, 1)
	f.Max = max(f.Max, f.Min)
	return f
}

// faultAround is the per-region window state. Races between workers only blur the heuristic.
type faultAround struct {
	cfg    FaultAround
	window atomic.Int64
	next   atomic.Int64 // page index a sequential stream would fault on next
}

func (f *faultAround) init(c FaultAround) {
	f.cfg = c.normalized()
	if f.cfg.Adaptive {
		f.window.Store(int64(f.cfg.Min))
	} else {
		f.window.Store(int64(f.cfg.Max))
	}
	f.next.Store(-1)
}

// pages returns the window for a fault on page i and records where it ends. A fault counts as
// sequential when it lands within one window of where the last one ended: several threads
// walking one region in interleaved order still form a stream.
func (f *faultAround) pages(i int) int {
	w := int(f.window.Load())
	if f.cfg.Adaptive {
		next := int(f.next.Load())
		if i >= next-w && i <= next+w {
			w = min(w*2, f.cfg.Max)
		} else {
			w = max(w/2, f.cfg.Min)
		}
		f.window.Store(int64(w))
	}
	f.next.Store(int64(i + w))
	return w
}
