//go:build linux

package fleet_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/fleet/client"
	"github.com/faultline-go/faultline/internal/cli"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
)

// The state directory tests run each fleet as a process of its own — this test binary started
// again with envTestServe set to faultline serve's arguments — so that it can be killed with
// SIGKILL, or hand over and exit, while a VMM's threads fault.

const envTestServe = "FAULTLINE_TEST_SERVE"

const (
	stormSize = 16 << 20 // region 0: the balloon storm's
	probeSize = 1 << 20  // region 1: untouched until a probe fault
	seed      = 0x5eed
)

type serveProc struct {
	cmd    *exec.Cmd
	stderr *syncbuf.Buffer
	exited chan struct{}
	err    error // once exited is closed
}

func startServe(t *testing.T, args ...string) *serveProc {
	t.Helper()
	js, _ := json.Marshal(append([]string{"serve"}, args...))
	p := &serveProc{cmd: exec.Command(os.Args[0], "-test.run=^$"), stderr: &syncbuf.Buffer{}, exited: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), envTestServe+"="+string(js))
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("fleet pid %d log:\n%s", p.cmd.Process.Pid, p.stderr.String())
		}
	})
	return p
}

func (p *serveProc) kill() {
	select {
	case <-p.exited:
	default:
		p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.exited
	}
}

// fleetCase is a fleet on a state directory with one binding of a memory file.
type fleetCase struct {
	t                *testing.T
	ctl, state, sock string
	mem              string
	c                *client.Client
	args             []string
}

func newFleetCase(t *testing.T) *fleetCase {
	if os.Geteuid() != 0 {
		kerneltest.Require(t, "taking a uffd back from the VMM (pidfd_getfd) needs root")
		return nil
	}
	dir := t.TempDir()
	fc := &fleetCase{t: t, ctl: filepath.Join(dir, "control.sock"), state: filepath.Join(dir, "state"),
		sock: filepath.Join(dir, "a.sock"), mem: memFile(t, stormSize+probeSize, seed)}
	fc.c = noKeepAlive(fc.ctl)
	fc.args = []string{"--control", fc.ctl, "--state-dir", fc.state}
	return fc
}

// noKeepAlive is a client that connects anew for every request: each one tests the socket.
func noKeepAlive(ctl string) *client.Client {
	c := client.New(ctl)
	c.HTTP.Transport.(*http.Transport).DisableKeepAlives = true
	return c
}

// waitServing waits until the control API answers (the fleet process may still be starting).
func (fc *fleetCase) waitServing(p *serveProc) []client.VM {
	fc.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		vms, err := fc.c.List(context.Background())
		if err == nil {
			return vms
		}
		select {
		case <-p.exited:
			fc.t.Fatalf("the fleet exited: %v", p.err)
		default:
		}
		if time.Now().After(deadline) {
			fc.t.Fatalf("the control API does not answer: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// loaded makes the binding, starts a VMM on it and a balloon storm of ms milliseconds in it, and
// waits until the fleet has served faults of it.
func (fc *fleetCase) loaded(p *serveProc, ms int) (*vmm.VMM, *puppet.Call) {
	t := fc.t
	t.Helper()
	fc.waitServing(p)
	if _, err := fc.c.Create(context.Background(), "a", client.Spec{MemFile: fc.mem, Socket: fc.sock}); err != nil {
		t.Fatal(err)
	}
	v, err := vmm.Start(vmm.Options{Socket: fc.sock,
		Regions: []vmm.Region{{Size: stormSize, FileOffset: 0}, {Size: probeSize, FileOffset: stormSize}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Kill)
	const touchers, chasers, maxRun, chunk = 2, 1, 16, 64
	storm, err := v.Go(puppet.Request{Op: "eng-balloon", Area: v.Regions[0].Area, Seed: seed,
		Ints: []int64{touchers, chasers, int64(ms), maxRun, chunk}})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "faults served", func() bool {
		vm, err := fc.c.Get(context.Background(), "a")
		return err == nil && vm.Stats.Faults > 0
	})
	return v, storm
}

// probe starts a read of a page of the probe region, never touched before: it waits until a
// fleet serves it.
func probe(t *testing.T, v *vmm.VMM) *puppet.Call {
	t.Helper()
	c, err := v.Go(puppet.Request{Op: "touch", Area: v.Regions[1].Area, Off: 0, Len: 4096, Threads: 1,
		Verify: "pattern", Seed: seed, PatternBase: stormSize})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// check waits for the storm and the probe: every byte right, no thread hung; then the binding
// is listed, serving the VM.
func (fc *fleetCase) check(storm, pc *puppet.Call) {
	t := fc.t
	t.Helper()
	rep, _, err := pc.Wait(60 * time.Second)
	if err != nil || rep.Mismatch != 0 || rep.Pages != 1 {
		t.Fatalf("probe fault: %+v, %v", rep, err)
	}
	rep, _, err = storm.Wait(2 * time.Minute)
	if err != nil {
		t.Fatalf("storm: %v (a thread hung, or the VMM died)", err)
	}
	if rep.Mismatch != 0 {
		t.Fatalf("storm: %d wrong reads; first: %s", rep.Mismatch, rep.Str)
	}
	if reads, releases, zero, pattern := rep.Ints[0], rep.Ints[2], rep.Ints[4], rep.Ints[5]; reads == 0 || releases == 0 || zero == 0 || pattern == 0 {
		t.Fatalf("the storm proved nothing: %v", rep.Ints)
	}
	vms, err := fc.c.List(context.Background())
	if err != nil || len(vms) != 1 || vms[0].ID != "a" || vms[0].State != client.StateListening || vms[0].Stats.Live != 1 {
		t.Fatalf("GET /vms: %+v, %v", vms, err)
	}
}

// kill -9 of a fleet under load, then a fleet started on the same state directory: the binding
// is made again, its daemon takes the VM back, and every fault is served right.
func TestFleetCrashRecovery(t *testing.T) {
	fc := newFleetCase(t)
	a := startServe(t, fc.args...)
	v, storm := fc.loaded(a, 1500)
	a.kill()
	pc := probe(t, v) // faults with no fleet: sleeps until one serves it
	b := startServe(t, fc.args...)
	fc.check(storm, pc)
	if vms := fc.waitServing(b); vms[0].Stats.Served != 1 {
		t.Fatalf("the recovered binding serves: %+v", vms[0].Stats)
	}
	if err := v.Exit(); err != nil {
		t.Fatal(err)
	}
}

// A live hand-off under load: a fleet started with --takeover gets the control socket and the
// binding; a client polling GET /vms throughout is never refused; the old fleet exits 0.
func TestFleetTakeover(t *testing.T) {
	fc := newFleetCase(t)
	a := startServe(t, fc.args...)
	v, storm := fc.loaded(a, 2000)

	var polls, failed int
	var firstErr error
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			vms, err := fc.c.List(context.Background())
			if err == nil && (len(vms) != 1 || vms[0].ID != "a") {
				err = &client.Error{Message: "the binding is not listed"}
			}
			polls++
			if err != nil {
				failed++
				if firstErr == nil {
					firstErr = err
				}
			}
		}
	}()
	b := startServe(t, append(fc.args, "--takeover")...)
	select {
	case <-a.exited:
	case <-time.After(2 * time.Minute):
		t.Fatal("the old fleet did not exit after the hand-off")
	}
	if a.err != nil {
		t.Fatalf("the old fleet: %v, want exit 0", a.err)
	}
	pc := probe(t, v) // served by the new fleet: the old is gone
	fc.check(storm, pc)
	close(stop)
	<-stopped
	if failed != 0 || polls == 0 {
		t.Fatalf("GET /vms during the hand-off: %d of %d failed; first: %v", failed, polls, firstErr)
	}
	if !strings.Contains(a.stderr.String(), "hand-off done") {
		t.Fatalf("the old fleet did not say it handed over")
	}
	t.Logf("%d GET /vms during the hand-off, none refused", polls)
	fc.waitServing(b)
	if err := v.Exit(); err != nil {
		t.Fatal(err)
	}
}

// A fleet.json that is not one a fleet wrote whole, or of another version: a clear error at
// start, and nothing listens.
func TestFleetStateCorrupt(t *testing.T) {
	for _, c := range []struct{ name, file, want string }{
		{"cut short", `{"format":"faultline-fleet","version":1,"bindings":[{"id":"a"`, "state directory corrupt"},
		{"checksum", `{"format":"faultline-fleet","version":1,"bindings":[],"sha256":"00"}`, "checksum mismatch"},
		{"version", `{"format":"faultline-fleet","version":99,"bindings":[],"sha256":"00"}`, "another faultline version"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			state, ctl := filepath.Join(dir, "state"), filepath.Join(dir, "control.sock")
			os.MkdirAll(state, 0o700)
			if err := os.WriteFile(filepath.Join(state, "fleet.json"), []byte(c.file), 0o600); err != nil {
				t.Fatal(err)
			}
			var out, errOut bytes.Buffer
			code := cli.Run([]string{"serve", "--control", ctl, "--state-dir", state}, &out, &errOut)
			if code != 1 || !strings.Contains(errOut.String(), c.want) || !strings.Contains(errOut.String(), "fleet.json") {
				t.Fatalf("exit %d, stderr:\n%s\nwant exit 1 and %q about fleet.json", code, errOut.String(), c.want)
			}
			if _, err := os.Lstat(ctl); !os.IsNotExist(err) {
				t.Fatalf("control socket made: %v", err)
			}
		})
	}
}
