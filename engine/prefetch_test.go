//go:build linux

package engine_test

import (
	"context"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// runsOf turns image pages (in order) into runs of contiguous pages with their bytes from src.
func runsOf(src *source.Memory, pages []uint64, ps int) func() (engine.PageRun, error) {
	i := 0
	return func() (engine.PageRun, error) {
		if i >= len(pages) {
			return engine.PageRun{}, io.EOF
		}
		j := i + 1
		for j < len(pages) && pages[j] == pages[j-1]+1 {
			j++
		}
		off, n := int64(pages[i])*int64(ps), int64(j-i)*int64(ps)
		i = j
		return engine.PageRun{Off: off, Len: n, Data: src.Bytes(off, n)}, nil
	}
}

// Record the pages a workload touches first, then prefetch them into a fresh VM before the same
// workload runs: it takes (almost) no faults, and every byte is right. Pages the VM released
// before the prefetch are left alone (they read zero), and pages installed by fault-around are
// not recorded as touched.
func TestRecordThenPrefetch(t *testing.T) {
	for _, k := range []memory.Kind{memory.Anon, memory.Shmem, memory.Hugetlb} {
		t.Run(k.String(), func(t *testing.T) {
			const seed = 41
			size := 4 << 20
			if k.Huge() {
				size = 64 << 20
			}
			// Run 1: record. Every 4th page of the first half, in random order, from one
			// thread; fault-around of 2 installs a neighbour that is not touched.
			v1 := newVM(t, k, size, 0, uffd.ModeMissing)
			ps := v1.pageSize
			n := size / ps
			src := patternSource(t, size, seed)
			e1, stop1 := serveLogged(t, v1, []engine.Region{v1.region(src)}, engine.Options{Record: true, FaultAround: engine.FaultAround{Min: 2, Max: 2}})
			rep := v1.do(puppet.Request{Op: "touch", Order: "rand", Len: n / 2 * ps, Stride: 4 * ps, Seed: seed})
			if rep.Sigbus != 0 {
				t.Fatalf("run 1: %d signals", rep.Sigbus)
			}
			var rec []uint64 // in the region's pages
			for _, tc := range e1.Recorded() {
				if tc.Len != int64(ps) || tc.Off%tc.Len != 0 {
					t.Fatalf("recorded touch %+v, want whole pages of %d bytes", tc, ps)
				}
				rec = append(rec, uint64(tc.Off/tc.Len))
			}
			if err := stop1(); err != nil {
				t.Fatalf("run 1: %v", err)
			}
			want := n / 2 / 4
			sorted := slices.Clone(rec)
			slices.Sort(sorted)
			if len(rec) != want || len(slices.Compact(sorted)) != want {
				t.Fatalf("recorded %d pages (%d distinct), want %d", len(rec), len(slices.Compact(slices.Clone(sorted))), want)
			}
			for _, p := range rec {
				if p%4 != 0 || p >= uint64(n/2) {
					t.Fatalf("recorded page %d, which the workload did not touch first (only fault-around put it in)", p)
				}
			}
			faults1 := e1.Stats()[0].Missing

			// Run 2: a fresh VM releases a few of the pages, then gets the recording
			// prefetched before the same workload runs.
			v2 := newVM(t, k, size, uffd.FeatureEventRemove, uffd.ModeMissing)
			e2, stop2 := serveLogged(t, v2, []engine.Region{v2.region(src)}, engine.Options{FaultAround: engine.FaultAround{Min: 2, Max: 2}})
			released := 8
			if k.Huge() {
				released = 2
			}
			var zero pageSet
			zero.add(0, released)
			v2.do(puppet.Request{Op: "release", Off: 0, Len: released * ps})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			pst, err := e2.Prefetch(ctx, runsOf(src, rec, ps))
			if err != nil {
				t.Fatalf("Prefetch: %v", err)
			}
			removed := 0
			for _, p := range rec {
				if p < uint64(released) {
					removed++
				}
			}
			if pst.Pages != uint64(want-removed) || pst.Skipped != uint64(removed) {
				t.Errorf("prefetched %d pages, skipped %d; want %d and %d", pst.Pages, pst.Skipped, want-removed, removed)
			}
			rep = v2.do(puppet.Request{Op: "touch", Order: "rand", Len: n / 2 * ps, Stride: 4 * ps, Seed: seed})
			faults2 := e2.Stats()[0].Missing
			// Every byte: the released pages read zero, the rest the pattern.
			v2.touch(0, n, seed, zero, 0)
			if err := stop2(); err != nil {
				t.Fatalf("run 2: %v", err)
			}
			t.Logf("faults: %d recording, %d after prefetching %d pages (%d skipped) in %v", faults1, faults2, pst.Pages, pst.Skipped, pst.Duration)
			// The released pages the workload touches fault (for zeros); the rest must not.
			if faults2 > uint64(removed)+faults1/10 {
				t.Errorf("%d faults after the prefetch, want at most %d (released) + a tenth of the %d without", faults2, removed, faults1)
			}
			if st := e2.Stats()[0]; st.PagesPrefetched != pst.Pages {
				t.Errorf("Stats.PagesPrefetched = %d, want %d", st.PagesPrefetched, pst.Pages)
			}
		})
	}
}

// A REMOVE while a prefetch runs: pages released before the prefetch reaches them are left
// alone, and every released page reads zero afterwards — never the source bytes the prefetch
// carried — whether the prefetch installed it before the release (the madvise then zaps it) or
// not.
func TestRemoveDuringPrefetch(t *testing.T) {
	const seed = 42
	v := newVM(t, memory.Anon, 4<<20, uffd.FeatureEventRemove, uffd.ModeMissing)
	ps := v.pageSize
	n := v.size / ps
	src := patternSource(t, v.size, seed)
	e, stop := serveLogged(t, v, []engine.Region{v.region(src)}, engine.Options{})
	// The working set: every page, in 64 runs of 16; after the first run, half the image
	// (pages [n/4, 3n/4)) is released by the VM.
	var zero pageSet
	zero.add(n/4, 3*n/4)
	next, runs := 0, 0
	pst, err := e.Prefetch(context.Background(), func() (engine.PageRun, error) {
		if next >= n {
			return engine.PageRun{}, io.EOF
		}
		if runs == 1 {
			v.do(puppet.Request{Op: "release", Off: n / 4 * ps, Len: n / 2 * ps})
		}
		runs++
		off, l := int64(next*ps), int64(16*ps)
		next += 16
		return engine.PageRun{Off: off, Len: l, Data: src.Bytes(off, l)}, nil
	})
	if err != nil {
		t.Fatalf("Prefetch: %v", err)
	}
	if pst.Skipped < uint64(n/2-16) {
		t.Errorf("prefetch skipped %d pages, want the %d released before it reached them", pst.Skipped, n/2-16)
	}
	v.touch(0, n, seed, zero, 0)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	t.Logf("prefetched %d, skipped %d; %s", pst.Pages, pst.Skipped, statsLine(e.Stats()[0]))
}

// A run shorter than the region's page (4 KiB of a 2 MiB hugetlb page) installs nothing there:
// the huge page is served by its fault, from the source — never filled from past the run's
// data. Found in review: the prefetch copied a whole huge page from a 4 KiB slice.
func TestPrefetchPartialHugePage(t *testing.T) {
	const seed = 43
	v := newVM(t, memory.Hugetlb, 4<<20, 0, uffd.ModeMissing)
	src := patternSource(t, v.size, seed)
	e, stop := serveLogged(t, v, []engine.Region{v.region(src)}, engine.Options{})
	buf := make([]byte, 8192)
	copy(buf, src.Bytes(0, 4096))
	for i := 4096; i < len(buf); i++ {
		buf[i] = 0xaa // what a copy past the run would install
	}
	runs := []engine.PageRun{{Off: 0, Len: 4096, Data: buf[:4096]}, {Off: 2 << 20, Len: 2 << 20, Data: src.Bytes(2<<20, 2<<20)}}
	i := 0
	pst, err := e.Prefetch(context.Background(), func() (engine.PageRun, error) {
		if i == len(runs) {
			return engine.PageRun{}, io.EOF
		}
		i++
		return runs[i-1], nil
	})
	if err != nil || pst.Pages != 1 {
		t.Fatalf("Prefetch = %+v, %v; want the second huge page only", pst, err)
	}
	v.touch(0, 2, seed, nil, 0)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st := e.Stats()[0]; st.PagesPrefetched != 1 || st.Missing != 1 {
		t.Errorf("%d prefetched, %d faults; want 1 and 1 (%s)", st.PagesPrefetched, st.Missing, statsLine(st))
	}
}
