//go:build linux

package engine_test

import (
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// TestRemoveStorm is a balloon storm in the spirit of uffd-stress: in the child, touching threads
// read random pages and verify every byte while a balloon thread keeps releasing random runs
// (MADV_DONTNEED, MADV_REMOVE on shared memory) and chasing threads read the very run being
// released, so faults and REMOVE events for the same pages race. The engine runs two workers with
// adaptive fault-around. No read may see source data once a release of its page has finished
// (stale fill), none may see zeros before one began, and torn reads may mix only the pattern and
// zeros; after the storm every released page reads zeros and every other page the pattern.
// Nothing may hang: faults deferred by EAGAIN after an event read (the kernel keeps failing
// resolving ioctls with EAGAIN for a while after the event was read) must be retried.
func TestRemoveStorm(t *testing.T) {
	cases := []struct {
		kind    memory.Kind
		fetched bool
	}{
		{memory.Anon, false}, {memory.Anon, true},
		{memory.Shmem, false}, {memory.Shmem, true},
		{memory.ShmemPrivate, false},
		{memory.Hugetlb, false}, {memory.HugetlbPrivate, false},
	}
	for _, c := range cases {
		name := c.kind.String()
		if c.fetched {
			name += "/fetched"
		}
		t.Run(name, func(t *testing.T) {
			const seed = 31
			size, maxRun, chunk := 8<<20, 16, 64 // 2048 pages, balloon chunks of 64
			if c.kind.Huge() {
				size, maxRun, chunk = 32<<20, 2, 2 // 16 huge pages
			}
			v := newVM(t, c.kind, size, uffd.FeatureEventRemove, uffd.ModeMissing)
			var src source.Source = patternSource(t, v.size, seed)
			if c.fetched {
				src = fetched{src.(*source.Memory)}
			}
			e, stop := serveLogged(t, v, []engine.Region{v.region(src)},
				engine.Options{Workers: 2, FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})

			const touchers, chasers, stormMs = 3, 2, 500
			rep, _, err := v.start(puppet.Request{Op: "eng-balloon", Seed: seed,
				Ints: []int64{touchers, chasers, stormMs, int64(maxRun), int64(chunk)}}).Wait(60 * time.Second)
			if err != nil {
				t.Fatalf("storm: %v", err)
			}
			reads, racy, madvises, released, finalZero, finalPattern := rep.Ints[0], rep.Ints[1], rep.Ints[2], rep.Ints[3], rep.Ints[4], rep.Ints[5]
			t.Logf("%d reads (%d overlapping a release), %d releases of %d pages; after: %d pages zero, %d pattern",
				reads, racy, madvises, released, finalZero, finalPattern)
			if rep.Mismatch != 0 {
				t.Errorf("%d wrong reads; first: %s", rep.Mismatch, rep.Str)
			}
			if finalZero == 0 || finalPattern == 0 || reads == 0 {
				t.Errorf("the storm proved nothing: %d reads, %d pages released at the end, %d never", reads, finalZero, finalPattern)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			st := e.Stats()[0]
			t.Logf("engine: %s", statsLine(st))
			if st.PagesRemoved != uint64(released) {
				t.Errorf("PagesRemoved = %d, want %d: one REMOVE per madvise, each counted", st.PagesRemoved, released)
			}
			if st.PagesZero == 0 || st.Errors != 0 {
				t.Errorf("PagesZero = %d, Errors = %d", st.PagesZero, st.Errors)
			}
		})
	}
}
