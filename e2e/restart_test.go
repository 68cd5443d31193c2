//go:build linux

package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/fcapi"
)

// A real Firecracker across the end of its daemon: `faultline serve --state-dir` killed with
// SIGKILL and started again (crash recovery), and replaced with --takeover (a live upgrade).
// The guest goes on verifying its pattern; the new daemon's report of the VM says how it came
// to serve it.

// serveAgain starts another `faultline serve` on d's socket and state directory, with extra
// flags, and waits until it logs msg.
func serveAgain(t *testing.T, d *daemon, state, msg string, extra ...string) *daemon {
	t.Helper()
	n := &daemon{dir: d.dir, socket: d.socket, log: &console{}, done: make(chan struct{})}
	args := append([]string{"serve", "--socket", d.socket, "--mem-file", env.snapMem, "--state-dir", state,
		"--metrics-addr", "127.0.0.1:0", "--log-format", "json"}, extra...)
	n.cmd = exec.Command(env.faultline, args...)
	n.cmd.Stdout = n.log
	n.cmd.Stderr = n.log
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	t0 := time.Now()
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { n.cmd.Wait(); close(n.done) }()
	t.Cleanup(func() {
		n.cmd.Process.Signal(syscall.SIGKILL)
		<-n.done
		if t.Failed() {
			t.Logf("new daemon log:\n%s", n.log.String())
		}
	})
	err := waitUntil(30*time.Second, func() bool {
		for _, r := range n.records("metrics") {
			n.metricsAddr, _ = r["addr"].(string)
		}
		return len(n.records(msg)) > 0
	})
	if err != nil {
		t.Fatalf("the new daemon did not log %q: %v\n%s", msg, err, n.log.String())
	}
	t.Logf("new daemon (%v): %q %v after its start", extra, msg, time.Since(t0).Round(time.Millisecond))
	return n
}

// endTakenOver kills Firecracker and checks the new daemon's report of the VM: how it came to
// serve it, and no failure. (It may have served no fault: the guest's pattern was in already.)
func endTakenOver(t *testing.T, n *daemon, f *fcProc, origin string) {
	t.Helper()
	f.kill()
	rep := n.ended(t, f.pid())
	if rep["origin"] != origin || rep["failure"] != nil {
		t.Errorf("the new daemon's report: %v, want origin %q", rep, origin)
	}
	t.Logf("%s: new daemon: VM ended: origin=%q cause=%q faults=%v pages=%v", f.name, rep["origin"], rep["cause"], rep["faults"], rep["pages"])
}

// Killed with SIGKILL while its guest runs with a balloon inflated: the daemon started again on
// the same state directory takes the guest's uffd back from Firecracker and serves it; the guest
// verifies its pattern, the balloon deflates and inflates again (REMOVE events for the new
// daemon), and the guest verifies again.
func testDaemonKilled(t *testing.T) {
	state := filepath.Join(baseDir, "state-killed")
	d := startServe(t, "--mem-file", env.snapMem, "--state-dir", state)
	f := restore(t, d, "vm", true)
	next := verify(t, f, 0, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	balloon := func(mib int) {
		t.Helper()
		if err := f.api.PatchBalloon(ctx, mib); err != nil {
			t.Fatal(err)
		}
		var st fcapi.BalloonStats
		if err := waitUntil(guestTimeout, func() bool { st, _ = f.api.BalloonStatistics(ctx); return st.ActualMib == uint64(mib) }); err != nil {
			t.Fatalf("balloon to %d MiB: %v (actual %d MiB)", mib, err, st.ActualMib)
		}
	}
	balloon(balloonMiB)
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
	n := serveAgain(t, d, state, "VM recovered")
	next = verify(t, f, next, 2)
	balloon(0)
	balloon(balloonMiB)
	n.waitMetric(t, "faultline_pages_removed_total", func(v float64) bool { return v >= balloonMiB<<20/4096 },
		"the new daemon's REMOVE events of the second inflation")
	verify(t, f, next, 2)
	endTakenOver(t, n, f, "recovered")
}

// Replaced with --takeover while its guest runs: the old daemon exits by itself, the new one
// serves the guest, which goes on verifying.
func testDaemonUpgraded(t *testing.T) {
	state := filepath.Join(baseDir, "state-upgraded")
	d := startServe(t, "--mem-file", env.snapMem, "--state-dir", state)
	f := restore(t, d, "vm", true)
	next := verify(t, f, 0, 1)
	n := serveAgain(t, d, state, "VM taken over", "--takeover")
	select {
	case <-d.done:
		if c := d.cmd.ProcessState.ExitCode(); c != 0 {
			t.Fatalf("the old daemon exited %d after the hand-off", c)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the old daemon did not exit after the hand-off")
	}
	verify(t, f, next, 2)
	endTakenOver(t, n, f, "taken over")
}
