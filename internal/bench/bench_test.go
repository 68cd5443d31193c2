//go:build linux

package bench

import (
	"os"
	"testing"

	"github.com/faultline-go/faultline/internal/puppet"
)

func TestMain(m *testing.M) {
	puppet.Main()
	os.Exit(m.Run())
}

// The benchmarks measure the engine end to end with a child faulting on 32 MiB per iteration;
// ns/page is the child's wall time per page, the number to compare with the C handler's
// (BenchmarkServeC) from the same run.
func benchCase(b *testing.B, c Case) {
	env, err := NewEnv(c.Size)
	if err != nil {
		b.Fatal(err)
	}
	defer env.Close()
	if c.Handler == "c" && !env.HasC() {
		b.Skip("C reference unavailable:", env.CrefErr)
	}
	b.ReportAllocs()
	var ns float64
	var allocs float64
	n := 0
	for b.Loop() {
		r, err := env.Run(c)
		if err != nil {
			b.Fatal(err)
		}
		if r.Wrong != 0 {
			b.Fatalf("%d wrong pages", r.Wrong)
		}
		ns += r.NsPerPage
		allocs += r.AllocsPerFault
		n++
	}
	b.ReportMetric(ns/float64(n), "ns/page")
	if c.Handler == "go" {
		b.ReportMetric(allocs/float64(n), "allocs/fault")
	}
}

func BenchmarkServe(b *testing.B) {
	for _, k := range []int{1, 64} {
		for _, h := range []string{"c", "go"} {
			b.Run(h+"/seq/k"+itoa(k), func(b *testing.B) {
				benchCase(b, Case{Handler: h, Size: 32 << 20, Pattern: "seq", Threads: 1, FaultAround: k, Source: "file"})
			})
		}
	}
	b.Run("go/seq/adaptive", func(b *testing.B) {
		benchCase(b, Case{Handler: "go", Size: 32 << 20, Pattern: "seq", Threads: 1, MaxAround: 256, Source: "file"})
	})
	b.Run("bulk/seq", func(b *testing.B) {
		benchCase(b, Case{Handler: "bulk", Size: 32 << 20, Pattern: "seq", Threads: 1, Source: "file"})
	})
	for _, th := range []int{1, 8} {
		b.Run("go/rand/threads"+itoa(th), func(b *testing.B) {
			benchCase(b, Case{Handler: "go", Size: 32 << 20, Pattern: "rand", Threads: th, FaultAround: 1, Source: "file"})
		})
	}
}

func itoa(n int) string {
	s := ""
	for ; n > 0; n /= 10 {
		s = string(rune('0'+n%10)) + s
	}
	return s
}

// TestSuiteRuns checks that every standard case runs and serves the right bytes (a small size;
// the numbers are not looked at).
func TestSuiteRuns(t *testing.T) {
	env, err := NewEnv(8 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	if !env.HasC() && os.Getenv("FAULTLINE_REQUIRE_KERNEL") == "1" {
		t.Fatalf("C reference unavailable: %v", env.CrefErr)
	}
	for _, c := range Suite(Case{Size: 8 << 20, Source: "file", MaxAround: 64}) {
		if c.Handler == "c" && !env.HasC() {
			continue
		}
		r, err := env.Run(c)
		if err != nil {
			t.Fatalf("%s: %v", r.Label(), err)
		}
		if r.Wrong != 0 || r.Pages != 2048 {
			t.Fatalf("%s: %d wrong of %d pages", c.Handler, r.Wrong, r.Pages)
		}
	}
}
