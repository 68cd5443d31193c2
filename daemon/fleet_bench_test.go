//go:build linux

package daemon_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/puppet"
)

// The fleet benchmarks measure what one daemon costs for many VMs. One child process stands
// for all the VMMs (fc-fleet: a connection, a uffd and a region per VM, each connection sending
// a Firecracker v1.12 handshake), so a thousand VMs need not be a thousand processes. Run them
// once each:
//
//	go test ./daemon -run XXX -bench Fleet -benchtime 1x

// fleetGuest is each VM's guest memory: Firecracker's default mem_size_mib.
const fleetGuest = 128 << 20

// fleetDaemon is a daemon for a benchmark: the options `faultline serve` uses by default, a log
// that only counts, and a count of the VMs that ended.
type fleetDaemon struct {
	d       *daemon.Daemon
	serving atomic.Int64 // "serving" lines: engines started
	ended   atomic.Int64
	failed  atomic.Value // first failure, a string
}

func startFleetDaemon(b *testing.B, mem string) *fleetDaemon {
	b.Helper()
	f := &fleetDaemon{}
	d, err := daemon.New(daemon.Config{
		Socket: filepath.Join(b.TempDir(), "uffd.sock"), MemFile: mem,
		Logger: slog.New(countHandler{f}),
		Engine: engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}},
		OnVMEnd: func(r daemon.Report) {
			if r.Failure != "" {
				f.failed.CompareAndSwap(nil, r.Failure)
			}
			f.ended.Add(1)
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	f.d = d
	go d.Serve()
	b.Cleanup(func() {
		d.Close()
		<-d.Done()
		if s, _ := f.failed.Load().(string); s != "" {
			b.Errorf("a VM failed: %s", s)
		}
	})
	return f
}

// countHandler counts the daemon's "serving" lines and drops everything.
type countHandler struct{ f *fleetDaemon }

func (h countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h countHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message == "serving" {
		h.f.serving.Add(1)
	}
	return nil
}
func (h countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h countHandler) WithGroup(string) slog.Handler      { return h }

// waitFleet waits until cond holds (a count of VMs), for at most a minute.
func waitFleet(b *testing.B, what string, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// raiseNoFile makes room for n more fds (a VM costs the daemon three: stream, uffd, pidfd).
func raiseNoFile(b *testing.B, n uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	lim.Cur, lim.Max = max(lim.Cur, n), max(lim.Max, n)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		b.Skipf("RLIMIT_NOFILE %d is too low for the fleet and cannot be raised: %v", lim.Cur, err)
	}
}

// procStatus reads a "kB" line of /proc/self/status, in bytes.
func procStatus(b *testing.B, key string) uint64 {
	s, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatalf("%s: %v", l, err)
			}
			return n << 10
		}
	}
	b.Fatalf("no %s in /proc/self/status", key)
	return 0
}

// cpuTime is the CPU this process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// 1,000 connected VMs that faulted a little (64 KiB each, so every engine has served and its
// read spinning has had something to adapt to) and are now idle: the daemon's memory beyond the
// snapshot mapping (RssAnon: the mapping is file-backed), its goroutines per VM, and its CPU
// while nothing happens.
func BenchmarkFleetIdle(b *testing.B) {
	const vms = 1000
	raiseNoFile(b, 4*vms+256)
	mem := snapshot(b, fleetGuest)
	for range b.N {
		f := startFleetDaemon(b, mem)
		runtime.GC()
		anon0, rss0, g0 := procStatus(b, "RssAnon"), procStatus(b, "VmRSS"), runtime.NumGoroutine()
		p, areas := fleetPeer(b, f.d.Addr(), vms, fleetGuest, 1)
		waitFleet(b, "every VM served", func() bool { return f.serving.Load() == vms })
		for _, a := range areas {
			rep, _, err := p.Do(puppet.Request{Op: "touch", Area: a, Len: 64 << 10, Verify: "pattern-sample", Seed: seed})
			if err != nil || rep.Mismatch != 0 {
				b.Fatalf("area %d: %+v %v", a, rep, err)
			}
		}
		// Idle from here: the first second shows adaptive spinning winding down; then measure.
		s0, st0 := cpuTime(b), time.Now()
		time.Sleep(time.Second)
		settle := 100 * (cpuTime(b) - s0).Seconds() / time.Since(st0).Seconds()
		runtime.GC()
		anon, rss, g, own := procStatus(b, "RssAnon"), procStatus(b, "VmRSS"), runtime.NumGoroutine(), daemonGoroutines()
		if live := f.d.Live(); live != vms {
			b.Fatalf("%d VMs live, want %d", live, vms)
		}
		const window = 3 * time.Second
		c0, t0 := cpuTime(b), time.Now()
		time.Sleep(window)
		cpu, wall := cpuTime(b)-c0, time.Since(t0)

		b.ReportMetric(float64(int64(anon)-int64(anon0))/(1<<20), "MiB-anon")
		b.ReportMetric(float64(int64(rss)-int64(rss0))/(1<<20), "MiB-rss")
		b.ReportMetric(float64(g-g0)/vms, "goroutines/VM")
		b.ReportMetric(float64(own)/vms, "daemon-goroutines/VM")
		b.ReportMetric(100*cpu.Seconds()/wall.Seconds(), "%cpu-idle")
		b.ReportMetric(settle, "%cpu-first-idle-s")
		b.Logf("%d idle VMs: RssAnon %+.1f MiB, VmRSS %+.1f MiB, %d goroutines (%+d; %d running daemon code), "+
			"CPU %v in %v (in the first idle second: %.2f%%)",
			vms, float64(int64(anon)-int64(anon0))/(1<<20), float64(int64(rss)-int64(rss0))/(1<<20), g, g-g0, own,
			cpu.Round(time.Microsecond), wall.Round(time.Millisecond), settle)

		if err := p.Exit(0); err != nil {
			b.Fatal(err)
		}
		waitFleet(b, "every VM ended", func() bool { return f.ended.Load() == vms })
	}
}

// N = 1, 8 and 32 VMs faulting at once, one thread each in random order (one page per fault),
// the same 32,768 pages in all split between them: aggregate pages per second, the daemon's CPU
// per page, and the ratio of 32 VMs to 1 (1 = no collapse). Three rounds, the cases round-robin
// within each, the median reported.
func BenchmarkFleetFault(b *testing.B) {
	const total, rounds = 32768, 3 // pages of 4 KiB: 128 MiB
	mem := snapshot(b, total*4096)
	ns := []int{1, 8, 32}
	for range b.N {
		pps, cpu := map[int][]float64{}, map[int][]float64{}
		for r := range rounds {
			for _, n := range ns {
				p, c := fleetFault(b, mem, n, total/n)
				pps[n], cpu[n] = append(pps[n], p), append(cpu[n], c)
				b.Logf("round %d, N=%d: %.0f pages/s, daemon CPU %.0f ns/page", r, n, p, c)
			}
		}
		for _, n := range ns {
			b.ReportMetric(median(pps[n]), fmt.Sprintf("pages/s-N%d", n))
			b.ReportMetric(median(cpu[n]), fmt.Sprintf("cpu-ns/page-N%d", n))
		}
		b.ReportMetric(median(pps[32])/median(pps[1]), "ratio-32v1")
	}
}

// fleetFault serves n VMs of pages pages each, all touched at once: aggregate pages/s and the
// daemon's CPU ns per page.
func fleetFault(b *testing.B, mem string, n, pages int) (pps, cpuPerPage float64) {
	f := startFleetDaemon(b, mem)
	defer func() { f.d.Close(); <-f.d.Done() }()
	p, areas := fleetPeer(b, f.d.Addr(), n, pages*4096, 1)
	waitFleet(b, "every VM served", func() bool { return f.serving.Load() == int64(n) })
	c0, t0 := cpuTime(b), time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, a := range areas {
		c, err := p.Go(puppet.Request{Op: "touch", Area: a, Threads: 1, Order: "rand", Verify: "pattern-sample", Seed: seed})
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep, _, err := c.Wait(5 * time.Minute)
			if err == nil && (rep.Mismatch != 0 || rep.Pages != pages) {
				err = fmt.Errorf("touched %d pages, %d wrong", rep.Pages, rep.Mismatch)
			}
			errs <- err
		}()
	}
	wg.Wait()
	wall, cpu := time.Since(t0), cpuTime(b)-c0
	close(errs)
	for err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	// The counters may trail the wake-ups the touches returned on by a moment.
	waitFleet(b, "every page counted", func() bool { return f.d.Summary().Pages >= uint64(n*pages) })
	if s := f.d.Summary(); s.Pages != uint64(n*pages) {
		b.Fatalf("the daemon installed %d pages, want %d", s.Pages, n*pages)
	}
	if err := p.Exit(0); err != nil {
		b.Fatal(err)
	}
	waitFleet(b, "every VM ended", func() bool { return f.ended.Load() == int64(n) })
	all := float64(n * pages)
	return all / wall.Seconds(), float64(cpu.Nanoseconds()) / all
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
