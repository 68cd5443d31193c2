//go:build linux

package fleet

import "github.com/prometheus/client_golang/prometheus"

// Collector exports the fleet to Prometheus: the bindings and snapshots open, and each binding's
// counters labelled with its id (a binding's series go with it).
func (s *Server) Collector() prometheus.Collector { return (*collector)(s) }

type collector Server

var (
	descBindings  = prometheus.NewDesc("faultline_fleet_bindings", "VM bindings (UFFD sockets) of the fleet daemon, draining ones included.", nil, nil)
	descSnapshots = prometheus.NewDesc("faultline_fleet_snapshots_open", "Snapshots open, each shared by the bindings that use it.", nil, nil)
	descLive      = prometheus.NewDesc("faultline_vm_live", "VMs being served on a binding.", []string{"vm_id"}, nil)
	descServed    = prometheus.NewDesc("faultline_vm_served_total", "VMs served on a binding since it was made.", []string{"vm_id"}, nil)
	descFaults    = prometheus.NewDesc("faultline_vm_faults_total", "Page-fault messages read on a binding's VMs.", []string{"vm_id"}, nil)
	descPages     = prometheus.NewDesc("faultline_vm_pages_installed_total", "Pages installed into a binding's VMs, prefetched ones included.", []string{"vm_id"}, nil)
	descPrefetch  = prometheus.NewDesc("faultline_vm_pages_prefetched_total", "Pages a binding's working-set prefetch installed.", []string{"vm_id"}, nil)
	descBytes     = prometheus.NewDesc("faultline_vm_bytes_copied_total", "Bytes copied from the snapshot into a binding's VMs.", []string{"vm_id"}, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descBindings, descSnapshots, descLive, descServed, descFaults, descPages, descPrefetch, descBytes} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := (*Server)(c)
	vms := s.List()
	ch <- prometheus.MustNewConstMetric(descBindings, prometheus.GaugeValue, float64(len(vms)))
	ch <- prometheus.MustNewConstMetric(descSnapshots, prometheus.GaugeValue, float64(len(s.Snapshots())))
	for _, vm := range vms {
		st := vm.Stats
		ch <- prometheus.MustNewConstMetric(descLive, prometheus.GaugeValue, float64(st.Live), vm.ID)
		for _, m := range []struct {
			d *prometheus.Desc
			v uint64
		}{{descServed, uint64(st.Served)}, {descFaults, st.Faults}, {descPages, st.Pages}, {descPrefetch, st.Prefetched}, {descBytes, st.Bytes}} {
			ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v), vm.ID)
		}
	}
}
