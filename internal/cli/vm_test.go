//go:build linux

package cli

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/snapshot"
)

// faultline serve --control with a --socket of its own, and faultline vm create|ls|show|rm on
// top of it, in-process: two snapshots (the packed "default" and a raw memory file bound by vm
// create), a VMM on each gets every byte of its own; vm ls shows both with their stats; vm rm
// removes the socket; errors exit 1 with the API's message, usage errors 2; SIGTERM then ends
// serve.
func TestVMCommandsEndToEnd(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	memA, memB := filepath.Join(dir, "a.mem"), filepath.Join(dir, "b.mem")
	for i, p := range []string{memA, memB} {
		b := make([]byte, size)
		puppet.Fill(b, uint64(0x10+i), 0)
		os.WriteFile(p, b, 0o600)
	}
	snapA := filepath.Join(dir, "a.snap")
	if _, err := snapshot.Pack(context.Background(), memA, snapA, snapshot.PackOptions{}); err != nil {
		t.Fatal(err)
	}
	ctl, sockA, sockB := filepath.Join(dir, "control.sock"), filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	var logs syncbuf.Buffer
	code := make(chan int, 1)
	go func() {
		code <- Run([]string{"serve", "--control", ctl, "--socket", sockA, "--snapshot", snapA, "--max-vms", "2", "--metrics-addr", "127.0.0.1:0"}, io.Discard, &logs)
	}()
	waitFor(t, "the control socket", func() bool { _, err := os.Stat(ctl); return err == nil })
	defer func() {
		if t.Failed() {
			t.Logf("serve log:\n%s", logs.String())
		}
	}()
	if fi, err := os.Stat(ctl); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v %v", fi.Mode(), err)
	}

	c, out, errs := run("vm", "create", "b", "--control", ctl, "--mem-file", memB, "--socket", sockB)
	if c != 0 || out != "b listening on "+sockB+", serving mem_file "+memB+"\n" {
		t.Fatalf("vm create: exit %d, %q, %q", c, out, errs)
	}
	ma, err := vmm.Start(vmm.Options{Socket: sockA, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer ma.Kill()
	mb, err := vmm.Start(vmm.Options{Socket: sockB, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer mb.Kill()
	for i, m := range []*vmm.VMM{ma, mb} {
		if got, err := m.TouchRange(0, 0, size, 2, uint64(0x10+i), false); err != nil || got.Wrong != 0 || got.Pages != size/4096 {
			t.Fatalf("VM %d: %+v, %v", i, got, err)
		}
	}

	c, out, errs = run("vm", "ls", "--control", ctl)
	t.Logf("faultline vm ls:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if c != 0 || len(lines) != 3 || !strings.HasPrefix(lines[0], "ID ") {
		t.Fatalf("vm ls: exit %d:\n%s%s", c, out, errs)
	}
	row := regexp.MustCompile(`^(\S+)\s+listening\s+1\s+1\s+[1-9]\d*\s+2048\s+0\s+(\S+)\s+(.+)$`)
	for i, want := range [][]string{{"default", sockA, snapA}, {"b", sockB, "mem_file " + memB}} {
		m := row.FindStringSubmatch(lines[1+1-i]) // sorted: b, default
		if m == nil || m[1] != want[0] || m[2] != want[1] || m[3] != want[2] {
			t.Errorf("vm ls row of %s: %q", want[0], lines[1+1-i])
		}
	}
	// Metrics per binding.
	addr := regexp.MustCompile(`msg=metrics addr=(\S+)`).FindStringSubmatch(logs.String())
	if addr == nil {
		t.Fatalf("no metrics address logged:\n%s", logs.String())
	}
	body := scrape(t, addr[1])
	for _, want := range []string{"faultline_fleet_bindings 2", `faultline_vm_live{vm_id="b"} 1`, `faultline_vm_pages_installed_total{vm_id="default"} 2048`} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
	if c, out, _ = run("vm", "show", "b", "--control", ctl); c != 0 || !strings.Contains(out, `"pages": 2048`) || !strings.Contains(out, `"state": "listening"`) {
		t.Fatalf("vm show: exit %d:\n%s", c, out)
	}

	// Errors from the API: exit 1 with its message.
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"vm", "create", "b", "--control", ctl, "--mem-file", memB, "--socket", filepath.Join(dir, "c.sock")}, `VM "b" exists`},
		{[]string{"vm", "create", "c", "--control", ctl, "--mem-file", memB, "--socket", filepath.Join(dir, "c.sock")}, "most VMs (2"},
		{[]string{"vm", "rm", "nope", "--control", ctl}, `no VM "nope"`},
		{[]string{"vm", "ls", "--control", filepath.Join(dir, "none.sock")}, "no such file"},
	} {
		if c, _, errs := run(tc.args...); c != 1 || !strings.Contains(errs, tc.msg) {
			t.Errorf("%q: exit %d, %q, want 1 and %q", tc.args, c, errs, tc.msg)
		}
	}
	// Usage errors: exit 2.
	for _, args := range [][]string{{"vm"}, {"vm", "frob"}, {"vm", "ls"}, {"vm", "rm", "--control", ctl},
		{"vm", "create", "x", "--control", ctl, "--socket", sockB}} {
		if c, _, errs := run(args...); c != 2 {
			t.Errorf("%q: exit %d, %q, want 2", args, c, errs)
		}
	}

	// rm with the VM live: the socket goes now, the VM is served until it exits.
	if c, out, errs = run("vm", "rm", "b", "--control", ctl); c != 0 || !strings.Contains(out, "1 VM(s) still served") {
		t.Fatalf("vm rm: exit %d, %q, %q", c, out, errs)
	}
	if _, err := os.Lstat(sockB); !os.IsNotExist(err) {
		t.Fatalf("socket after vm rm: %v", err)
	}
	if got, err := mb.TouchRange(0, 0, size, 1, 0x11, false); err != nil || got.Wrong != 0 {
		t.Fatalf("the removed binding's VM: %+v, %v", got, err)
	}
	mb.Exit()
	waitFor(t, "b to go", func() bool { _, out, _ := run("vm", "ls", "--control", ctl); return !strings.Contains(out, "\nb ") })

	// SIGTERM drains: serve returns when the last VM exits, removing the control socket.
	if err := syscallKillSelf(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "draining", func() bool { return strings.Contains(logs.String(), "signal: draining") })
	ma.Exit()
	select {
	case c := <-code:
		if c != 0 {
			t.Fatalf("serve exit %d", c)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not return after its VMs exited")
	}
	for _, p := range []string{ctl, sockA} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after serve: %v", p, err)
		}
	}
}

func syscallKillSelf() error { return syscall.Kill(os.Getpid(), syscall.SIGTERM) }

func TestServeControlUsage(t *testing.T) {
	ctl := filepath.Join(t.TempDir(), "c.sock")
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"serve", "--control", ctl, "--record"}, "--socket and one of"},
		{[]string{"serve", "--control", ctl, "--socket", "/x"}, "--socket and one of"},
		{[]string{"serve", "--control", ctl, "--cache-size", "64M", "--min-snapshot-cache", "128M"}, "at most --cache-size"},
	} {
		var out syncbuf.Buffer
		if c := Run(tc.args, io.Discard, &out); c != 2 || !strings.Contains(out.String(), tc.msg) {
			t.Errorf("%q: exit %d: %s", tc.args, c, out.String())
		}
	}
	if _, err := os.Lstat(ctl); !os.IsNotExist(err) {
		t.Errorf("a usage error left a control socket: %v", err)
	}
}
