//go:build linux

package bench

import (
	"fmt"
	"slices"
)

// Suite is the standard set of cases: each target of the engine, named, against its named
// baseline of the same run.
func Suite(base Case) []Case {
	var cs []Case
	add := func(name, baseline string, target float64, h, pattern string, threads, around int, edit func(*Case)) {
		c := base
		c.Name, c.Baseline, c.Target = name, baseline, target
		c.Handler, c.Pattern, c.Threads, c.FaultAround = h, pattern, threads, around
		if edit != nil {
			edit(&c)
		}
		cs = append(cs, c)
	}
	pin := func(c *Case) { c.Pin = true }
	nospin := func(c *Case) { c.Spin = -1 }
	workers := func(n int) func(*Case) { return func(c *Case) { c.Workers = n } }

	// 1 page per fault, sequential: on a quiet machine within 5% of the C handler; pinned, the
	// handler and the faulting process on one CPU (the CPU cost of a fault alone, without the
	// host's cost of waking an idle vCPU), within 10%.
	add("c-seq-k1", "", 0, "c", "seq", 1, 1, nil)
	add("go-seq-k1", "c-seq-k1", 1.05, "go", "seq", 1, 1, nil)
	add("c-seq-k1-pinned", "", 0, "c", "seq", 1, 1, pin)
	add("go-seq-k1-pinned", "c-seq-k1-pinned", 1.10, "go", "seq", 1, 1, pin)
	// The engine without read spinning: the netpoller path alone against the C handler.
	add("go-nospin-seq-k1", "c-seq-k1", 0, "go", "seq", 1, 1, nospin)
	add("go-nospin-seq-k1-pinned", "c-seq-k1-pinned", 0, "go", "seq", 1, 1, func(c *Case) { pin(c); nospin(c) })
	add("c-seq-k64", "", 0, "c", "seq", 1, 64, nil)
	add("go-seq-k64", "c-seq-k64", 1.10, "go", "seq", 1, 64, nil)
	// Adaptive fault-around on a sequential walk against installing everything up front.
	add("bulk-seq", "", 0, "bulk", "seq", 1, 1, nil)
	add("go-seq-adaptive", "bulk-seq", 1.25, "go", "seq", 1, 0, nil)
	// Random access: 8 touching threads no slower per page than 1 (faults batch into one
	// read), and two workers no slower than one on this many threads.
	add("c-rand-x1-k1", "", 0, "c", "rand", 1, 1, nil)
	add("go-rand-x1-k1", "c-rand-x1-k1", 0, "go", "rand", 1, 1, nil)
	add("go-rand-x8-w1", "go-rand-x1-k1", 1.2, "go", "rand", 8, 1, workers(1))
	add("go-rand-x8-w2", "go-rand-x8-w1", 1.0, "go", "rand", 8, 1, workers(2))
	add("c-rand-x8-k1", "c-rand-x1-k1", 0, "c", "rand", 8, 1, nil)
	// Adaptive fault-around must not cost anything on random access (the window stays at 1).
	add("go-rand-x2-k1", "", 0, "go", "rand", 2, 1, nil)
	add("go-rand-x2-adaptive", "go-rand-x2-k1", 1.0, "go", "rand", 2, 0, nil)
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
	}
	for i := range out {
		if ref, ok := Reference(out, out[i]); ok {
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
	return median(rs), nil
}

// Reference returns the result r is judged against: the one its Baseline names; for a case
// without one (a single case from the command line), the C handler with the same workload, or
// bulk COPY for adaptive fault-around, or the 1-thread run for a multi-thread run.
func Reference(done []Result, r Result) (Result, bool) {
	if r.Name != "" {
		for _, o := range done {
			if r.Baseline != "" && o.Name == r.Baseline {
				return o, true
			}
		}
		return Result{}, false
	}
	for _, o := range done {
		switch {
		case o.Name != "" || o.Pin != r.Pin:
			// Not comparable: a suite's case, or pinned against unpinned.
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
