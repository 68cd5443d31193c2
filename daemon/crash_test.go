//go:build linux

package daemon_test

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/vmm"
)

// Crash recovery: the daemon runs as its own process with a state directory, and is killed with
// SIGKILL while a VMM's threads fault through a balloon storm; a new daemon on the same state
// directory takes the VM's uffd back from the VMM (pidfd_getfd) and serves it again. The storm
// checks every read against the release history and, at its end, every page of guest memory:
// released pages must read zeros (never the snapshot), the others the snapshot.

const (
	stormSize = 16 << 20 // region 0: the storm's
	probeSize = 1 << 20  // region 1: untouched until a probe fault
)

// crashVM starts a VMM with the storm's region and the probe's, connected to socket.
func crashVM(t testing.TB, socket string) *vmm.VMM {
	t.Helper()
	v, err := vmm.Start(vmm.Options{Socket: socket,
		Regions: []vmm.Region{{Size: stormSize, FileOffset: 0}, {Size: probeSize, FileOffset: stormSize}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Kill)
	return v
}

// probe starts a read of page i of the probe region (never touched before): it waits until a
// daemon serves it.
func probe(t testing.TB, v *vmm.VMM, i int) *puppet.Call {
	t.Helper()
	c, err := v.Go(puppet.Request{Op: "touch", Area: v.Regions[1].Area, Off: i * 4096, Len: 4096, Threads: 1,
		Verify: "pattern", Seed: seed, PatternBase: stormSize})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func waitProbe(t testing.TB, c *puppet.Call) {
	t.Helper()
	rep, _, err := c.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("probe fault not served: %v", err)
	}
	if rep.Mismatch != 0 || rep.Pages != 1 {
		t.Fatalf("probe: %d pages, %d wrong", rep.Pages, rep.Mismatch)
	}
}

// underLoad starts a daemon process on spec, a VMM, and a storm of ms milliseconds in it.
func underLoad(t testing.TB, spec daemonSpec, ms int) (*daemonProc, *vmm.VMM, *storm) {
	t.Helper()
	d, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	v := crashVM(t, spec.Socket)
	return d, v, startStorm(t, v, 0, ms)
}

// crashed starts a daemon process on spec and a VMM served by it, then kills the daemon: the
// VMM's state is left in spec.StateDir.
func crashed(t testing.TB, spec daemonSpec) *vmm.VMM {
	t.Helper()
	d, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	v := crashVM(t, spec.Socket)
	d.kill()
	return v
}

func crashSpec(t testing.TB) daemonSpec {
	return daemonSpec{Socket: filepath.Join(t.TempDir(), "uffd.sock"), MemFile: snapshot(t, stormSize+probeSize),
		StateDir: filepath.Join(t.TempDir(), "state")}
}

// kill -9 under load, then a restart: the storm finishes with every byte right, the fault that
// waited for the new daemon is served, and the VM's report says it was recovered.
func TestCrashRecoveryUnderLoad(t *testing.T) {
	spec := crashSpec(t)
	a, v, s := underLoad(t, spec, 1500)
	time.Sleep(300 * time.Millisecond) // into the storm
	a.kill()
	pc := probe(t, v, 0) // faults with no daemon: sleeps until one serves it
	b, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	waitProbe(t, pc)
	ttf := time.Since(b.Started)
	r := s.wait(t, 2*time.Minute)
	t.Logf("restart: ready in %v, a fault that waited for it served %v after its start (target ≤ 1 s)", b.Ready.Sub(b.Started), ttf)
	t.Logf("storm: %d reads, %d faults (p99 ≤ %v, slowest %v: the crash), %d releases; after: %d pages zero, %d the snapshot",
		r.Reads, r.Faults, r.P99, r.Slowest, r.Releases, r.FinalZero, r.FinalPattern)
	exitReport(t, v, b, "recovered")
}

// Ten kill -9 and restart cycles in a row, under one storm.
func TestCrashRecoveryTenCycles(t *testing.T) {
	spec := crashSpec(t)
	d, v, s := underLoad(t, spec, 4000)
	rng := rand.New(rand.NewPCG(7, 7))
	var worst time.Duration
	for i := range 10 {
		time.Sleep(time.Duration(80+rng.IntN(200)) * time.Millisecond)
		d.kill()
		pc := probe(t, v, i)
		var err error
		if d, err = startDaemon(t, spec); err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		waitProbe(t, pc)
		worst = max(worst, time.Since(d.Started))
	}
	r := s.wait(t, 2*time.Minute)
	t.Logf("10 crashes: the slowest restart served a waiting fault %v after its start", worst)
	t.Logf("storm: %d reads, %d faults (p99 ≤ %v, slowest %v), %d releases; after: %d pages zero, %d the snapshot",
		r.Reads, r.Faults, r.P99, r.Slowest, r.Releases, r.FinalZero, r.FinalPattern)
	if got, err := v.TouchRange(1, 0, probeSize, 2, seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("probe region: %+v %v", got, err)
	}
}

// The emulator keeps its own copy of the uffd after the handshake, as Firecracker v1.14.2 does
// (it is what recovery takes back), and the state file names its number in the VMM.
func TestVMMKeepsItsUffd(t *testing.T) {
	spec := crashSpec(t)
	f := start(t, spec.MemFile, func(c *daemon.Config) { c.StateDir = spec.StateDir })
	v := crashVM(t, f.d.Addr())
	var uffds []int
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", v.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", v.Pid(), e.Name())); l == "anon_inode:[userfaultfd]" {
			n, _ := strconv.Atoi(e.Name())
			uffds = append(uffds, n)
		}
	}
	if len(uffds) != 1 {
		t.Fatalf("the VMM holds %d userfaultfds, want its own copy: %v", len(uffds), uffds)
	}
	files, _ := filepath.Glob(filepath.Join(spec.StateDir, "vm-*.state"))
	if len(files) != 1 {
		t.Fatalf("state files: %v", files)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	var meta struct {
		Pid  int `json:"pid"`
		UFFD int `json:"uffd"`
	}
	if err := json.Unmarshal(b[32:32+binary.LittleEndian.Uint32(b[12:])], &meta); err != nil {
		t.Fatal(err)
	}
	if meta.Pid != v.Pid() || meta.UFFD != uffds[0] {
		t.Fatalf("state file names pid %d uffd %d, want %d and %d", meta.Pid, meta.UFFD, v.Pid(), uffds[0])
	}
	if err := v.Exit(); err != nil {
		t.Fatal(err)
	}
	f.report()
	if files, _ := filepath.Glob(filepath.Join(spec.StateDir, "vm-*.state")); len(files) != 0 {
		t.Fatalf("state files left after the VM ended: %v", files)
	}
}
