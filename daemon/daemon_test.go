//go:build linux

package daemon_test

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
)

const seed = 0xfc

// snapshot writes a memory file of size bytes holding the pattern.
func snapshot(t testing.TB, size int) string {
	t.Helper()
	b := make([]byte, size)
	puppet.Fill(b, seed, 0)
	p := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

type fixture struct {
	t       *testing.T
	d       *daemon.Daemon
	logs    *syncbuf.Buffer
	reports chan daemon.Report
	served  chan error
}

func start(t *testing.T, memFile string, mod func(*daemon.Config)) *fixture {
	t.Helper()
	f := &fixture{t: t, logs: &syncbuf.Buffer{}, reports: make(chan daemon.Report, 16), served: make(chan error, 1)}
	cfg := daemon.Config{
		Socket: filepath.Join(t.TempDir(), "uffd.sock"), MemFile: memFile,
		Logger:  slog.New(slog.NewTextHandler(f.logs, nil)),
		OnVMEnd: func(r daemon.Report) { f.reports <- r },
		Engine:  engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}},
	}
	if mod != nil {
		mod(&cfg)
	}
	d, err := daemon.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.d = d
	go func() { f.served <- d.Serve() }()
	t.Cleanup(func() {
		d.Close()
		select {
		case <-d.Done():
		case <-time.After(10 * time.Second):
			t.Error("daemon did not stop")
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", f.logs.String())
		}
	})
	return f
}

func (f *fixture) report() daemon.Report {
	f.t.Helper()
	select {
	case r := <-f.reports:
		return r
	case <-time.After(20 * time.Second):
		f.t.Fatalf("no VM report; log:\n%s", f.logs.String())
	}
	return daemon.Report{}
}

// Every Firecracker handshake generation, two regions laid out the way Firecracker does (the
// second region at a lower address than the first, file offsets back to back), four vCPU
// threads: every byte right, then the VM exits and the daemon releases it.
func TestServeEveryVersion(t *testing.T) {
	mem := snapshot(t, 24<<20)
	serveEveryVersion(t, func(t *testing.T) *fixture { return start(t, mem, nil) })
}

// serveEveryVersion runs the every-version case against the daemons start makes.
func serveEveryVersion(t *testing.T, start func(*testing.T) *fixture) {
	for _, v := range []firecracker.Version{firecracker.V1_1, firecracker.V1_7, firecracker.V1_12} {
		t.Run(v.String(), func(t *testing.T) {
			f := start(t)
			m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Version: v,
				Regions: []vmm.Region{{Size: 16 << 20, FileOffset: 0}, {Size: 8 << 20, FileOffset: 16 << 20}}})
			if err != nil {
				t.Fatal(err)
			}
			got, err := m.Touch(4, "rand", seed, false)
			if err != nil {
				m.Kill()
				t.Fatal(err)
			}
			if got.Wrong != 0 || got.Pages != 6144 {
				t.Fatalf("touched %d pages, %d wrong", got.Pages, got.Wrong)
			}
			if err := m.Exit(); err != nil {
				t.Fatal(err)
			}
			r := f.report()
			if r.Version != v.String() || r.Regions != 2 || r.Pages != 6144 || r.Failure != "" {
				t.Fatalf("report %+v", r)
			}
			if r.FirstFault <= 0 || r.P99 < r.P50 {
				t.Fatalf("report latencies %+v", r)
			}
			if f.d.Live() != 0 {
				t.Fatalf("%d VMs still live after exit", f.d.Live())
			}
		})
	}
}

// Balloon inflation: pages given back with MADV_DONTNEED read zeros afterwards, the rest keeps
// the snapshot; hugetlb guest memory is served in whole 2 MiB pages.
func TestBalloon(t *testing.T) {
	for _, huge := range []bool{false, true} {
		name := map[bool]string{false: "4k", true: "2M"}[huge]
		t.Run(name, func(t *testing.T) {
			if huge {
				needHugePages(t, 16)
			}
			const size = 16 << 20
			f := start(t, snapshot(t, size), nil)
			m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Huge: huge, Regions: []vmm.Region{{Size: size}}})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Kill()
			if got, err := m.Touch(2, "seq", seed, false); err != nil || got.Wrong != 0 {
				t.Fatalf("first pass: %+v %v", got, err)
			}
			// Inflate: 4 MiB in the middle.
			if err := m.Balloon(0, 4<<20, 4<<20); err != nil {
				t.Fatal(err)
			}
			if got, err := m.TouchRange(0, 4<<20, 4<<20, 2, seed, true); err != nil || got.Wrong != 0 {
				t.Fatalf("ballooned range not zero: %+v %v", got, err)
			}
			if got, err := m.TouchRange(0, 8<<20, 8<<20, 2, seed, false); err != nil || got.Wrong != 0 {
				t.Fatalf("rest changed: %+v %v", got, err)
			}
			m.Exit()
			r := f.report()
			if r.ZeroPages == 0 {
				t.Fatalf("no zero pages installed after the balloon: %+v", r)
			}
		})
	}
}

// needHugePages reserves n free huge pages for the test (see kerneltest.HugePages).
func needHugePages(t testing.TB, n int) { t.Helper(); kerneltest.HugePages(t, n) }

// Many VMs at once from one daemon and one mapping of the memory file.
func TestManyVMs(t *testing.T) {
	const size = 8 << 20
	f := start(t, snapshot(t, size), nil)
	var ms []*vmm.VMM
	for i := 0; i < 4; i++ {
		m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Kill()
		ms = append(ms, m)
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(ms))
	for _, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := m.Touch(2, "rand", seed, false)
			if err == nil && got.Wrong != 0 {
				err = errorf("%d wrong pages", got.Wrong)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := f.d.Live(); n != 4 {
		t.Fatalf("live VMs %d, want 4", n)
	}
	for _, m := range ms {
		m.Exit()
		f.report()
	}
}

type strErr string

func (e strErr) Error() string { return string(e) }

func errorf(format string, args ...any) error {
	return strErr(strings.TrimSpace(sprintf(format, args...)))
}

var sprintf = func(format string, args ...any) string { return fmtSprintf(format, args...) }

// A VM that exits mid-serve (killed while its threads fault) is released: no goroutine, fd or
// mapping left behind.
func TestVMExitReleasesEverything(t *testing.T) {
	const size = 32 << 20
	f := start(t, snapshot(t, size), nil)
	var g0, fd0 int
	var maps0 string
	// Round 0 warms up: lazily started runtime goroutines do not count as leaks.
	for i := 0; i < 4; i++ {
		if i == 1 {
			g0, fd0, maps0 = runtime.NumGoroutine(), countFDs(t), daemonMaps(t)
		}
		m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
		if err != nil {
			t.Fatal(err)
		}
		before := f.d.Summary().Faults
		if _, err := m.Go(puppet.Request{Op: "touch", Area: m.Regions[0].Area, Threads: 4, Order: "rand"}); err != nil {
			t.Fatal(err)
		}
		// Kill it mid-serve: once the daemon has served faults of this VM and, at the same
		// moment, the kernel holds faulting threads of it (its uffd counts faults not yet
		// resolved).
		waitUntil(t, "faults served and in flight", func() bool {
			return f.d.Summary().Faults > before && uffdFaultsInFlight(t) > 0
		})
		m.Kill()
		r := f.report()
		if r.Failure != "" {
			t.Fatalf("a VM that exited is not a failure: %+v", r)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		g, fd, mp := runtime.NumGoroutine(), countFDs(t), daemonMaps(t)
		if g <= g0 && fd <= fd0 && newLines(maps0, mp) == "" {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("leak: goroutines %d -> %d, fds %d -> %d, new mappings:\n%s\n%s",
				g0, g, fd0, fd, newLines(maps0, mp), buf[:n])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// newLines lists the lines of after that are not in before.
func newLines(before, after string) string {
	old := map[string]bool{}
	for _, l := range strings.Split(before, "\n") {
		old[l] = true
	}
	var out []string
	for _, l := range strings.Split(after, "\n") {
		if !old[l] {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func countFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// daemonMaps lists the mappings a VM could leave behind: mappings of files (the snapshot, once
// for all VMs) and anonymous ones that are not read-write (an engine's zero buffer is
// read-only). The runtime's own anonymous read-write mappings and reservations come and go with
// heap growth and new threads, so they are not counted (nor, with them, the read-write fetch
// buffers an engine maps for a non-resident source, which the daemon's file is not).
func daemonMaps(t testing.TB) string {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		anon := len(f) == 5 || strings.HasPrefix(f[5], "[")
		if anon && (f[1] == "rw-p" || f[1] == "---p") {
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// uffdFaultsInFlight sums, over the userfaultfds this process holds (the daemon's), the faults
// the kernel has queued or handed out but not yet seen resolved: threads of the VMM blocked in
// a fault right now ("total" in the fd's fdinfo).
func uffdFaultsInFlight(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l != "anon_inode:[userfaultfd]" {
			continue
		}
		b, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "total:"); ok {
				var k int
				fmt.Sscan(strings.TrimSpace(v), &k)
				n += k
			}
		}
	}
	return n
}

// An idle VM costs the daemon at most 2 goroutines of its own (today: the one reading its
// stream and the one running its engine; exits are watched for all VMs by one goroutine).
// Counted by stack: goroutines running daemon code. Fails on main before the fix (3 per VM: a
// goroutine per VM parked on its pidfd).
func TestIdleVMGoroutines(t *testing.T) {
	const vms, size = 4, 1 << 20
	f := start(t, snapshot(t, size), nil)
	// Warm up: one VM served and ended, so lazily started goroutines do not count.
	p, _ := fleetPeer(t, f.d.Addr(), 1, size, 1)
	p.Exit(0)
	f.report()
	own0, all0 := daemonGoroutines(), runtime.NumGoroutine()
	fleetPeer(t, f.d.Addr(), vms, size, 1)
	waitUntil(t, "every VM served", func() bool { return strings.Count(f.logs.String(), "msg=serving") == 1+vms })
	own, all := daemonGoroutines(), runtime.NumGoroutine()
	t.Logf("per idle VM: %.1f goroutines running daemon code, %.1f in all (engines included)",
		float64(own-own0)/vms, float64(all-all0)/vms)
	if own-own0 > 2*vms {
		t.Fatalf("%d VMs cost the daemon %d goroutines of its own, want at most 2 each\n%s", vms, own-own0, allStacks())
	}
}

// daemonGoroutines counts the goroutines with a frame in package daemon.
func daemonGoroutines() int {
	n := 0
	for _, g := range strings.Split(allStacks(), "\n\n") {
		for _, line := range strings.Split(g, "\n") {
			if !strings.HasPrefix(line, "created by") && strings.Contains(line, "faultline/daemon.") {
				n++
				break
			}
		}
	}
	return n
}

func allStacks() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return string(buf[:n])
		}
		buf = make([]byte, 2*len(buf))
	}
}
