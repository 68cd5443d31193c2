//go:build linux

package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Collector exports the daemon's counters to Prometheus: totals over every VM served since
// start (live ones read at scrape time), the number of live VMs, and the fault latency
// histogram. Register it with a prometheus.Registry.
func (d *Daemon) Collector() prometheus.Collector { return (*collector)(d) }

type collector Daemon

var (
	descLive    = prometheus.NewDesc("faultline_vms_live", "VMs being served.", nil, nil)
	descVMs     = prometheus.NewDesc("faultline_vms_total", "VMs served since start (ended and live).", nil, nil)
	descFaults  = prometheus.NewDesc("faultline_faults_total", "Page-fault messages read.", nil, nil)
	descPages   = prometheus.NewDesc("faultline_pages_installed_total", "Pages installed, by cause: fault (source data for the faulting page), fault_around (source data ahead of it), zero (zero pages), prefetch (the working set, before any fault); the causes partition the pages installed.", []string{"cause"}, nil)
	descRemoved = prometheus.NewDesc("faultline_pages_removed_total", "Pages dropped by REMOVE events (balloon).", nil, nil)
	descBytes   = prometheus.NewDesc("faultline_bytes_copied_total", "Bytes copied from the memory file.", nil, nil)
	descRetries = prometheus.NewDesc("faultline_retries_total", "Installs retried because events were pending.", nil, nil)
	descErrors  = prometheus.NewDesc("faultline_errors_total", "Faults that could not be served.", nil, nil)
	descDup     = prometheus.NewDesc("faultline_duplicate_faults_total", "Faults on pages already installed.", nil, nil)
	descLatency = prometheus.NewDesc("faultline_fault_latency_seconds", "From reading a fault to its page installed.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLive, descVMs, descFaults, descPages, descRemoved, descBytes, descRetries, descErrors, descDup, descLatency} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	d := (*Daemon)(c)
	t, live := d.allTotals()
	counter := func(desc *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), labels...)
	}
	ch <- prometheus.MustNewConstMetric(descLive, prometheus.GaugeValue, float64(live))
	counter(descVMs, t.vms)
	counter(descFaults, t.faults)
	counter(descPages, t.pagesFault, "fault")
	counter(descPages, t.pagesAround, "fault_around")
	counter(descPages, t.pagesZero, "zero")
	counter(descPages, t.pagesPrefetched, "prefetch")
	counter(descRemoved, t.pagesRemoved)
	counter(descBytes, t.bytes)
	counter(descRetries, t.retries)
	counter(descErrors, t.errors)
	counter(descDup, t.duplicates)
	buckets := map[float64]uint64{}
	var cum uint64
	for i, b := range t.latency.Bounds {
		cum += t.latency.Counts[i]
		buckets[b.Seconds()] = cum
	}
	ch <- prometheus.MustNewConstHistogram(descLatency, t.latency.Count, t.latency.Sum.Seconds(), buckets)
}
