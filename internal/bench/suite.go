//go:build linux

package bench

import (
	"fmt"
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
	// The engine without read spinning: the netpoller path alone against the C handler.
	add("go", "seq", 1, 1)
	cs[len(cs)-1].Spin = -1
	add("bulk", "seq", 1, 1)
	add("go", "seq", 1, 0) // adaptive fault-around vs bulk
	add("go", "rand", 1, 1)
	add("go", "rand", 8, 1) // no collapse with 8 touching threads
	add("c", "rand", 1, 1)
	add("c", "rand", 8, 1)
	return cs
}

// RunAll measures every case reps times, round-robin (rep 1 of every case, then rep 2, ...) so
// that drift of the machine — this VM's host backs guest memory lazily, the page cache warms —
// spreads over all cases instead of landing on whichever runs first, after one untimed warm-up
// pass over all of them. It returns each case's median run, in the cases' order. done, if not
// nil, is called after each run.
func RunAll(e *Env, cases []Case, reps int, done func(i, rep int, r Result)) ([]Result, error) {
	runs := make([][]Result, len(cases))
	for rep := -1; rep < max(reps, 1); rep++ {
		for i, c := range cases {
			r, err := e.Run(c)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", Result{Case: c}.Label(), err)
			}
			if r.Wrong != 0 {
				return nil, fmt.Errorf("%s: %d wrong pages", r.Label(), r.Wrong)
			}
			if rep < 0 {
				continue // warm-up
			}
			runs[i] = append(runs[i], r)
			if done != nil {
				done(i, rep, r)
			}
		}
	}
	out := make([]Result, len(cases))
	for i, rs := range runs {
		out[i] = median(rs)
		if ref, ok := Reference(out[:i], out[i]); ok {
			out[i].Ratio = out[i].NsPerPage / ref.NsPerPage
			out[i].RatioTo = ref.Label()
		}
	}
	return out, nil
}

func median(rs []Result) Result {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b Result) int {
		switch {
		case a.NsPerPage < b.NsPerPage:
			return -1
		case a.NsPerPage > b.NsPerPage:
			return 1
		}
		return 0
	})
	return rs[len(rs)/2]
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
