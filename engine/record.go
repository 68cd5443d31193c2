package engine

import "sync/atomic"

// recording is the order in which the pages of an engine's source image are first touched: the
// page of each MISSING fault, the first time it faults. Pages installed ahead of a fault
// (fault-around, prefetch) are not touched. One slot per page is allocated up front, so recording
// allocates nothing per fault.
type recording struct {
	on    atomic.Bool
	n     atomic.Int64
	pages []atomic.Uint64 // image page index + 1; 0: slot taken but not yet written
}

func newRecording(pages int) *recording {
	r := &recording{pages: make([]atomic.Uint64, pages)}
	r.on.Store(true)
	return r
}

// touch records page idx of st if recording is on and it was not touched before.
func (r *recording) touch(st *pageState, idx int) {
	if !r.on.Load() || !st.touched.testAndSet(idx) {
		return
	}
	if i := r.n.Add(1) - 1; i < int64(len(r.pages)) {
		r.pages[i].Store(uint64(st.spec.Offset/int64(st.spec.PageSize)) + uint64(idx) + 1)
	}
}

// order returns the image pages touched so far, in the order of their first touch.
func (r *recording) order() []uint64 {
	n := min(r.n.Load(), int64(len(r.pages)))
	out := make([]uint64, 0, n)
	for i := range n {
		if v := r.pages[i].Load(); v != 0 {
			out = append(out, v-1)
		}
	}
	return out
}
