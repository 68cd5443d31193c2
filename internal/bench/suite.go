//go:build linux

package bench

import (
	"slices"
)

// Suite is the standard set of cases: each target of the engine against its reference.
func Suite(base Case) []Case {
	var cs []Case
	add := func(h, pattern string, threads, around int) {
		c := base
		c.Handler, c.Pattern, c.Threads, c.FaultAround = h, pattern, threads, around
		cs = append(cs, c)
	}
	for _, k := range []int{1, 64} {
		add("c", "seq", 1, k)
		add("go", "seq", 1, k)
	}
	add("bulk", "seq", 1, 1)
	add("go", "seq", 1, 0) // adaptive fault-around vs bulk
	add("go", "rand", 1, 1)
	add("go", "rand", 8, 1) // no collapse with 8 touching threads
	add("c", "rand", 1, 1)
	add("c", "rand", 8, 1)
	return cs
}

// Median runs c reps times and returns the run with the median ns/page.
func Median(e *Env, c Case, reps int) (Result, error) {
	var rs []Result
	for i := 0; i < max(reps, 1); i++ {
		r, err := e.Run(c)
		if err != nil {
			return Result{}, err
		}
		rs = append(rs, r)
	}
	slices.SortFunc(rs, func(a, b Result) int {
		switch {
		case a.NsPerPage < b.NsPerPage:
			return -1
		case a.NsPerPage > b.NsPerPage:
			return 1
		}
		return 0
	})
	return rs[len(rs)/2], nil
}

// Reference returns the result r is judged against: the C handler with the same workload, or
// bulk COPY for adaptive fault-around, or the 1-thread run for a multi-thread run.
func Reference(done []Result, r Result) (Result, bool) {
	for _, o := range done {
		switch {
		case r.Handler == "go" && r.FaultAround > 0 && o.Handler == "c" && o.Pattern == r.Pattern &&
			o.Threads == r.Threads && o.FaultAround == r.FaultAround:
			return o, true
		case r.Handler == "go" && r.FaultAround == 0 && o.Handler == "bulk":
			return o, true
		case r.Threads > 1 && o.Handler == r.Handler && o.Pattern == r.Pattern && o.Threads == 1 &&
			o.FaultAround == r.FaultAround:
			return o, true
		}
	}
	return Result{}, false
}
