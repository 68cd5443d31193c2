package engine

import (
	"math/bits"
	"sync/atomic"
)

// bitmap is a fixed-size set of page indexes, safe for concurrent use: one bit per page, so a
// 1 GiB region of 4 KiB pages costs 32 KiB per bitmap.
type bitmap struct {
	w []atomic.Uint64
	n int
}

func newBitmap(n int) *bitmap { return &bitmap{w: make([]atomic.Uint64, (n+63)/64), n: n} }

func (b *bitmap) get(i int) bool { return b.w[i>>6].Load()&(1<<(i&63)) != 0 }

// testAndSet sets bit i and reports whether it was clear.
func (b *bitmap) testAndSet(i int) bool {
	m := uint64(1) << (i & 63)
	return b.w[i>>6].Or(m)&m == 0
}

// setRange sets [i, j).
func (b *bitmap) setRange(i, j int) {
	for i < j {
		w, lo := i>>6, i&63
		hi := min(64, lo+(j-i))
		b.w[w].Or(rangeMask(lo, hi))
		i += hi - lo
	}
}

// clearRange clears [i, j).
func (b *bitmap) clearRange(i, j int) {
	for i < j {
		w, lo := i>>6, i&63
		hi := min(64, lo+(j-i))
		b.w[w].And(^rangeMask(lo, hi))
		i += hi - lo
	}
}

// nextSet returns the first set index in [i, j), or j.
func (b *bitmap) nextSet(i, j int) int {
	for i < j {
		w, lo := i>>6, i&63
		v := b.w[w].Load() >> lo
		if v != 0 {
			return min(j, i+bits.TrailingZeros64(v))
		}
		i += 64 - lo
	}
	return j
}

// nextClear returns the first clear index in [i, j), or j.
func (b *bitmap) nextClear(i, j int) int {
	for i < j {
		w, lo := i>>6, i&63
		v := ^b.w[w].Load() >> lo
		if v != 0 {
			return min(j, i+bits.TrailingZeros64(v))
		}
		i += 64 - lo
	}
	return j
}

// count returns the number of set bits.
func (b *bitmap) count() int {
	c := 0
	for i := range b.w {
		c += bits.OnesCount64(b.w[i].Load())
	}
	return c
}

// copyFrom makes b's bits those of src, a bitmap of the same size.
func (b *bitmap) copyFrom(src *bitmap) {
	for i := range b.w {
		b.w[i].Store(src.w[i].Load())
	}
}

func rangeMask(lo, hi int) uint64 {
	if hi-lo == 64 {
		return ^uint64(0)
	}
	return ((1 << (hi - lo)) - 1) << lo
}
