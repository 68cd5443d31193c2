//go:build linux

package daemon

import (
	"time"

	"github.com/faultline-go/faultline/engine"
)

func (r Report) logAttrs() []any {
	a := []any{"vm", r.VM, "pid", r.Pid, "cause", r.Cause, "version", r.Version, "regions", r.Regions,
		"duration", r.Duration.Round(time.Millisecond), "faults", r.Faults, "pages", r.Pages,
		"zero_pages", r.ZeroPages, "bytes", r.Bytes, "first_fault", r.FirstFault, "p50", r.P50, "p99", r.P99}
	if r.Failure != "" {
		a = append(a, "failure", r.Failure)
	}
	if r.Origin != "" {
		a = append(a, "origin", r.Origin)
	}
	if r.Prefetched > 0 {
		a = append(a, "prefetched", r.Prefetched, "prefetch_time", r.PrefetchTime.Round(time.Microsecond))
	}
	if r.Retries > 0 || r.Errors > 0 {
		a = append(a, "retries", r.Retries, "errors", r.Errors)
	}
	return a
}

// totals aggregates engine stats over VMs, for metrics.
type totals struct {
	vms                                              uint64
	faults, pagesFault, pagesAround, pagesZero       uint64
	pagesPrefetched                                  uint64
	pagesRemoved, bytes, retries, errors, duplicates uint64
	latency                                          engine.Histogram
}

// pages is every page installed: the causes partition it.
func (t *totals) pages() uint64 {
	return t.pagesFault + t.pagesAround + t.pagesZero + t.pagesPrefetched
}

func (t *totals) addStats(s engine.Stats) {
	t.faults += s.Faults
	t.pagesFault += s.PagesFault
	t.pagesAround += s.PagesAround
	t.pagesZero += s.PagesZero
	t.pagesPrefetched += s.PagesPrefetched
	t.pagesRemoved += s.PagesRemoved
	t.bytes += s.Bytes
	t.retries += s.Retries
	t.errors += s.Errors
	t.duplicates += s.Duplicates
	t.latency = mergeHist(t.latency, s.Latency)
}

func (t *totals) add(o totals) {
	t.vms += o.vms
	t.faults += o.faults
	t.pagesFault += o.pagesFault
	t.pagesAround += o.pagesAround
	t.pagesZero += o.pagesZero
	t.pagesPrefetched += o.pagesPrefetched
	t.pagesRemoved += o.pagesRemoved
	t.bytes += o.bytes
	t.retries += o.retries
	t.errors += o.errors
	t.duplicates += o.duplicates
	t.latency = mergeHist(t.latency, o.latency)
}

func mergeHist(a, b engine.Histogram) engine.Histogram {
	if a.Counts == nil {
		a.Bounds = b.Bounds
		a.Counts = append([]uint64(nil), b.Counts...)
		a.Count, a.Sum = b.Count, b.Sum
		return a
	}
	for i := range a.Counts {
		if i < len(b.Counts) {
			a.Counts[i] += b.Counts[i]
		}
	}
	a.Count += b.Count
	a.Sum += b.Sum
	return a
}

// totals sums the VM's engines' stats (live or final).
func (v *vm) totals() totals {
	v.mu.Lock()
	es := append([]*engine.Engine(nil), v.engines...)
	v.mu.Unlock()
	t := totals{vms: 1}
	for _, e := range es {
		for _, s := range e.Stats() {
			t.addStats(s)
		}
	}
	return t
}

func (v *vm) report() Report {
	t := v.totals()
	v.mu.Lock()
	defer v.mu.Unlock()
	r := Report{VM: v.id, Pid: v.pid, Regions: v.regions, Cause: v.endCause, Duration: time.Since(v.started),
		Faults: t.faults, Pages: t.pages(), ZeroPages: t.pagesZero, Bytes: t.bytes,
		Retries: t.retries, Errors: t.errors, P50: t.latency.Quantile(0.5), P99: t.latency.Quantile(0.99)}
	if v.version != 0 {
		r.Version = v.version.String()
	}
	r.Origin = v.origin
	r.Prefetched = t.pagesPrefetched
	for _, e := range v.engines {
		r.PrefetchTime = max(r.PrefetchTime, e.PrefetchTotals().Duration)
	}
	if v.failure != nil {
		r.Failure = v.failure.Error()
	}
	var first time.Time
	for _, e := range v.engines {
		for _, s := range e.Stats() {
			if !s.FirstInstall.IsZero() && (first.IsZero() || s.FirstInstall.Before(first)) {
				first = s.FirstInstall
			}
		}
	}
	if !first.IsZero() {
		r.FirstFault = first.Sub(v.started)
	}
	return r
}

// Summary returns the running totals (live VMs read now).
func (d *Daemon) Summary() Summary {
	t, live := d.allTotals()
	return Summary{Live: live, VMs: int(t.vms), Faults: t.faults, Pages: t.pages(),
		ZeroPages: t.pagesZero, Removed: t.pagesRemoved, Bytes: t.bytes, Prefetched: t.pagesPrefetched,
		P50: t.latency.Quantile(0.5), P99: t.latency.Quantile(0.99)}
}

// allTotals sums the ended VMs and the live ones (read now), and counts the live ones.
func (d *Daemon) allTotals() (totals, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.finished
	// A fresh histogram: adding the live VMs must not write into d.finished's counts.
	t.latency = mergeHist(engine.EmptyHistogram(), t.latency)
	for v := range d.vms {
		t.add(v.totals())
	}
	return t, len(d.vms)
}
