package engine

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Stats are a region's counters since the engine started serving it. Counters only grow, so they
// export as Prometheus counters; Latency exports as a histogram.
type Stats struct {
	Region string

	Faults     uint64 // page-fault messages read (duplicates included)
	Missing    uint64 // MISSING faults
	WP         uint64 // write-protect faults (unprotected and marked dirty)
	Minor      uint64 // MINOR faults (resolved with CONTINUE)
	Duplicates uint64 // faults on pages already installed (each faulting thread reports its own)

	PagesFault      uint64 // source pages installed for the faulting page itself
	PagesAround     uint64 // source pages installed ahead of faults (fault-around)
	PagesZero       uint64 // zero pages installed (removed ranges, known-zero source runs), faulting or ahead
	PagesPrefetched uint64 // pages installed by Prefetch (source data or zero), before any fault
	PagesRemoved    uint64 // pages dropped by REMOVE events
	Bytes           uint64 // bytes copied from the source

	Retries uint64 // ioctls retried because events were pending (EAGAIN)
	Errors  uint64 // faults that failed (source errors, unexpected errnos)

	Latency Histogram // from reading the fault to the page installed

	// FirstInstall is when the first page was installed (zero if none yet).
	FirstInstall time.Time
}

// Pages is the number of pages installed: PagesFault, PagesAround, PagesZero and PagesPrefetched
// partition it.
func (s Stats) Pages() uint64 { return s.PagesFault + s.PagesAround + s.PagesZero + s.PagesPrefetched }

type counters struct {
	faults, missing, wp, minor, duplicates           atomic.Uint64
	pagesFault, pagesAround, pagesZero, pagesRemoved atomic.Uint64
	pagesPrefetched                                  atomic.Uint64
	bytes, retries, errors                           atomic.Uint64
	latency                                          histogram
	first                                            atomic.Int64 // unix ns of the first install
}

// observeInstall records a fault's install latency, and the time of the first install.
func (c *counters) observeInstall(d time.Duration) {
	c.latency.observe(d)
	if c.first.Load() == 0 {
		c.first.CompareAndSwap(0, time.Now().UnixNano())
	}
}

func (c *counters) snapshot(name string) Stats {
	s := Stats{
		Region: name, Faults: c.faults.Load(), Missing: c.missing.Load(), WP: c.wp.Load(),
		Minor: c.minor.Load(), Duplicates: c.duplicates.Load(), PagesFault: c.pagesFault.Load(),
		PagesAround: c.pagesAround.Load(), PagesZero: c.pagesZero.Load(),
		PagesRemoved: c.pagesRemoved.Load(), PagesPrefetched: c.pagesPrefetched.Load(), Bytes: c.bytes.Load(), Retries: c.retries.Load(),
		Errors: c.errors.Load(), Latency: c.latency.snapshot(),
	}
	if f := c.first.Load(); f != 0 {
		s.FirstInstall = time.Unix(0, f)
	}
	return s
}

// latencyBuckets is the number of histogram buckets: powers of two from 256 ns to ~34 s, plus
// one for everything above.
const latencyBuckets = 28

// Histogram is a latency distribution with power-of-two bucket bounds.
type Histogram struct {
	// Bounds[i] is the inclusive upper bound of bucket i; the last bucket has no bound.
	Bounds []time.Duration
	// Counts[i] is the number of observations in bucket i (not cumulative).
	Counts []uint64
	Count  uint64
	Sum    time.Duration
}

type histogram struct {
	counts [latencyBuckets]atomic.Uint64
	count  atomic.Uint64
	sum    atomic.Int64
}

func (h *histogram) observe(d time.Duration) {
	ns := uint64(max(d, 0))
	i := 0
	if ns > 256 {
		i = min(bits.Len64((ns-1)>>8), latencyBuckets-1)
	}
	h.counts[i].Add(1)
	h.count.Add(1)
	h.sum.Add(int64(d))
}

func (h *histogram) snapshot() Histogram {
	s := Histogram{Bounds: make([]time.Duration, latencyBuckets-1), Counts: make([]uint64, latencyBuckets)}
	for i := range s.Bounds {
		s.Bounds[i] = time.Duration(256 << i)
	}
	for i := range s.Counts {
		s.Counts[i] = h.counts[i].Load()
	}
	s.Count, s.Sum = h.count.Load(), time.Duration(h.sum.Load())
	return s
}

// Quantile estimates the q-quantile (q in [0, 1]) by linear interpolation within the bucket it
// falls in, assuming the observations spread evenly over the bucket (as Prometheus's
// histogram_quantile does): with power-of-two buckets the answer can be off by up to half the
// bucket's width, so treat it as an estimate. The first bucket spans [0, Bounds[0]]; a quantile
// in the last, unbounded bucket is reported as its lower bound (the largest bound). It returns 0
// for an empty histogram.
func (h Histogram) Quantile(q float64) time.Duration {
	// The total from the buckets, not Count: a snapshot taken while faults are served may read
	// Count a little ahead of the buckets.
	var total uint64
	for _, c := range h.Counts {
		total += c
	}
	if total == 0 || len(h.Bounds) == 0 {
		return 0
	}
	q = min(max(q, 0), 1)
	rank := q * float64(total)
	var below uint64
	for i, c := range h.Counts {
		if c == 0 || float64(below+c) < rank {
			below += c
			continue
		}
		if i >= len(h.Bounds) {
			break // the unbounded bucket
		}
		var lo time.Duration
		if i > 0 {
			lo = h.Bounds[i-1]
		}
		frac := (rank - float64(below)) / float64(c)
		return lo + time.Duration(frac*float64(h.Bounds[i]-lo))
	}
	return h.Bounds[len(h.Bounds)-1]
}

// EmptyHistogram returns a histogram with the engine's bounds and no observations, to merge
// others into.
func EmptyHistogram() Histogram {
	var h histogram
	return h.snapshot()
}
