//go:build linux

package engine_test

import (
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

func TestServeEveryKind(t *testing.T) {
	for _, k := range memory.Kinds {
		t.Run(k.String(), func(t *testing.T) {
			v := newVM(t, k, 16<<20, 0, uffd.ModeMissing)
			src := patternSource(t, v.size, 3)
			e, stop := serve(t, v, []engine.Region{v.region(src)}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 16, Adaptive: true}})
			rep, _, err := v.start(puppet.Request{Op: "touch", Threads: 2, Verify: "pattern", Seed: 3}).Wait(60 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Mismatch != 0 {
				t.Fatalf("%d pages wrong, first bad byte %d", rep.Mismatch, rep.FirstBad)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			st := e.Stats()[0]
			if got := int(st.Pages()); got != v.size/v.pageSize {
				t.Errorf("installed %d pages, want %d (stats %+v)", got, v.size/v.pageSize, st)
			}
			t.Logf("%v: faults %d, around %d, dup %d, p50 %v", k, st.Faults, st.PagesAround, st.Duplicates, st.Latency.Quantile(0.5))
		})
	}
}
