package engine_test

import (
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
)

// histogramWith returns the engine's empty histogram with counts[i] observations in bucket i.
func histogramWith(counts map[int]uint64) engine.Histogram {
	h := engine.EmptyHistogram()
	for i, c := range counts {
		h.Counts[i] = c
		h.Count += c
	}
	return h
}

func TestHistogramQuantile(t *testing.T) {
	for _, tc := range []struct {
		name   string
		counts map[int]uint64
		q      float64
		want   time.Duration
	}{
		{"empty", nil, 0.5, 0},
		{"empty p99", nil, 0.99, 0},
		// All in (8.192µs, 16.384µs]: the quantiles spread linearly over the bucket.
		{"one bucket p0", map[int]uint64{6: 100}, 0, 8192},
		{"one bucket p50", map[int]uint64{6: 100}, 0.5, 12288},
		{"one bucket p99", map[int]uint64{6: 100}, 0.99, 8192 + 8192*99/100},
		{"one bucket max", map[int]uint64{6: 100}, 1, 16384},
		// The first bucket starts at 0.
		{"first bucket p50", map[int]uint64{0: 10}, 0.5, 128},
		// 90 in (1.024µs, 2.048µs], 9 in (8.192µs, 16.384µs], 1 in (524.288µs, 1.048576ms].
		{"spread p50", map[int]uint64{3: 90, 6: 9, 12: 1}, 0.5, 1024 + 1024*50/90},
		{"spread p90", map[int]uint64{3: 90, 6: 9, 12: 1}, 0.9, 2048},
		{"spread p95", map[int]uint64{3: 90, 6: 9, 12: 1}, 0.95, 8192 + 8192*5/9},
		{"spread p99", map[int]uint64{3: 90, 6: 9, 12: 1}, 0.99, 16384},
		{"spread max", map[int]uint64{3: 90, 6: 9, 12: 1}, 1, 1048576},
		// Beyond the last bound nothing is known but the bound.
		{"unbounded", map[int]uint64{27: 4}, 0.5, 256 << 26},
		{"q clamped", map[int]uint64{6: 100}, 2, 16384},
	} {
		h := histogramWith(tc.counts)
		got := h.Quantile(tc.q)
		// Within a nanosecond: the interpolation is done in floating point.
		if d := got - tc.want; d < -1 || d > 1 {
			t.Errorf("%s: Quantile(%v) = %v, want %v", tc.name, tc.q, got, tc.want)
		}
	}
}

// A snapshot read while faults are served can see Count ahead of the buckets; the quantiles
// must still come from the buckets, not run past them.
func TestHistogramQuantileCountAhead(t *testing.T) {
	h := histogramWith(map[int]uint64{6: 100})
	h.Count += 3
	if got := h.Quantile(1); got != 16384 {
		t.Errorf("Quantile(1) = %v with Count ahead of the buckets, want 16.384µs", got)
	}
}
