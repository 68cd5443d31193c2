package engine

import (
	"math/bits"
	"sync/atomic"
)

// recording is the order in which the pages of an engine's source image are first touched: the
// page of each MISSING fault, the first time it faults. Pages installed ahead of a fault
// (fault-around, prefetch) are not touched. One slot per page is allocated up front, so recording
// allocates nothing per fault.
type recording struct {
	on    atomic.Bool
	n     atomic.Int64
	pages []atomic.Uint64 // (page's image offset / its region's page size) + 1; 0: not yet written
	sizes []uint8         // log2 of the region's page size, per slot
}

func newRecording(pages int) *recording {
	r := &recording{pages: make([]atomic.Uint64, pages), sizes: make([]uint8, pages)}
	r.on.Store(true)
	return r
}

// touch records page idx of st if recording is on and it was not touched before.
func (r *recording) touch(st *pageState, idx int) {
	if !r.on.Load() || !st.touched.testAndSet(idx) {
		return
	}
	if i := r.n.Add(1) - 1; i < int64(len(r.pages)) {
		r.sizes[i] = uint8(bits.TrailingZeros64(uint64(st.spec.PageSize)))
		r.pages[i].Store(uint64(st.spec.Offset/int64(st.spec.PageSize)) + uint64(idx) + 1) // publishes sizes[i]
	}
}

// Touch is a page of the source image that a fault touched: its offset and its size (the
// region's page size: 2 MiB on hugetlb).
type Touch struct {
	Off int64
	Len int64
}

// order returns the pages touched so far, in the order of their first touch.
func (r *recording) order() []Touch {
	n := min(r.n.Load(), int64(len(r.pages)))
	out := make([]Touch, 0, n)
	for i := range n {
		if v := r.pages[i].Load(); v != 0 {
			size := int64(1) << r.sizes[i]
			out = append(out, Touch{Off: int64(v-1) * size, Len: size})
		}
	}
	return out
}
