//go:build linux

package daemon_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
)

// The crash and hand-off tests run each daemon as a process of its own — this test binary
// started again with envTestDaemon set — so that it can be killed with SIGKILL while VMs fault.

const envTestDaemon = "FAULTLINE_TEST_DAEMON"

// daemonSpec configures a test daemon process.
type daemonSpec struct {
	Socket, MemFile, StateDir string
	Takeover                  bool
	DieInTakeover             bool // exit(3) once everything is received, before resuming a VM
}

// testDaemonMain runs a daemon when this process was started as one, and exits: it prints READY
// (or ERROR and why) once New has returned, a REPORT line with each VM's report, and logs to
// stderr.
func testDaemonMain() {
	js := os.Getenv(envTestDaemon)
	if js == "" {
		return
	}
	var s daemonSpec
	if err := json.Unmarshal([]byte(js), &s); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(2)
	}
	if s.DieInTakeover {
		daemon.SetTestHookTakeover(func() { os.Exit(3) })
	}
	out := make(chan string, 64)
	cfg := daemon.Config{Socket: s.Socket, MemFile: s.MemFile, StateDir: s.StateDir, Takeover: s.Takeover,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)),
		Engine: engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}},
		OnVMEnd: func(r daemon.Report) {
			b, _ := json.Marshal(r)
			out <- "REPORT " + string(b)
		}}
	go func() {
		for l := range out {
			fmt.Println(l)
		}
	}()
	d, err := daemon.New(cfg)
	if err != nil {
		fmt.Println("ERROR", strings.ReplaceAll(err.Error(), "\n", "; "))
		os.Exit(1)
	}
	fmt.Println("READY")
	d.Serve()
	close(out)
	time.Sleep(50 * time.Millisecond) // the last reports
	os.Exit(0)
}

// daemonProc is a test daemon process.
type daemonProc struct {
	t       testing.TB
	cmd     *exec.Cmd
	lines   chan string
	stderr  *syncbuf.Buffer
	exited  chan struct{}
	err     error // the exit, once exited is closed
	Started time.Time
	Ready   time.Time
	reports chan daemon.Report
}

// startDaemon starts a daemon process and waits until New returned: it returns the error New
// returned, if it did.
func startDaemon(t testing.TB, s daemonSpec) (*daemonProc, error) {
	t.Helper()
	js, _ := json.Marshal(s)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envTestDaemon+"="+string(js))
	p := &daemonProc{t: t, cmd: cmd, lines: make(chan string, 16), stderr: &syncbuf.Buffer{}, exited: make(chan struct{}),
		reports: make(chan daemon.Report, 64)}
	cmd.Stderr = p.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.Started = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			l := sc.Text()
			if r, ok := strings.CutPrefix(l, "REPORT "); ok {
				var rep daemon.Report
				if json.Unmarshal([]byte(r), &rep) == nil {
					p.reports <- rep
				}
				continue
			}
			p.lines <- l
		}
		close(p.lines)
	}()
	go func() {
		// Wait closes the stdout pipe: only after everything the daemon wrote was read (its
		// last line may be the ERROR a test waits for).
		<-scanned
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("daemon pid %d log:\n%s", cmd.Process.Pid, p.stderr.String())
		}
	})
	select {
	case l, ok := <-p.lines:
		p.Ready = time.Now()
		switch {
		case l == "READY":
			return p, nil
		case strings.HasPrefix(l, "ERROR "):
			<-p.exited
			return p, fmt.Errorf("%s", strings.TrimPrefix(l, "ERROR "))
		case !ok:
			<-p.exited
			return p, fmt.Errorf("daemon exited before it was ready: %v\n%s", p.err, p.stderr.String())
		default:
			return p, fmt.Errorf("daemon said %q", l)
		}
	case <-time.After(30 * time.Second):
		return p, fmt.Errorf("daemon not ready after 30 s:\n%s", p.stderr.String())
	}
}

// kill sends SIGKILL and reaps the process.
func (p *daemonProc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// wait waits for the process to exit by itself.
func (p *daemonProc) wait(d time.Duration) error {
	select {
	case <-p.exited:
		return p.err
	case <-time.After(d):
		return fmt.Errorf("daemon pid %d still running after %v", p.cmd.Process.Pid, d)
	}
}

// storm is a balloon storm running in a VMM (puppet op eng-balloon): touchers and chasers read
// pages and check every byte against the release history while a balloon releases runs of
// pages with MADV_DONTNEED, then one pass checks all of guest memory.
type storm struct {
	call *puppet.Call
}

type stormResult struct {
	Reads, Releases, FinalZero, FinalPattern int64
	Slowest, P99                             time.Duration
	Faults                                   int64
}

func startStorm(t testing.TB, v *vmm.VMM, region int, ms int) *storm {
	t.Helper()
	const touchers, chasers, maxRun, chunk = 2, 1, 16, 64
	c, err := v.Go(puppet.Request{Op: "eng-balloon", Area: v.Regions[region].Area, Seed: seed,
		Ints: []int64{touchers, chasers, int64(ms), maxRun, chunk}})
	if err != nil {
		t.Fatal(err)
	}
	return &storm{call: c}
}

// wait returns the storm's outcome; it fails the test on a wrong byte or a hung thread.
func (s *storm) wait(t testing.TB, timeout time.Duration) stormResult {
	t.Helper()
	rep, _, err := s.call.Wait(timeout)
	if err != nil {
		t.Fatalf("storm: %v (a thread hung, or the VMM died)", err)
	}
	if rep.Mismatch != 0 {
		t.Fatalf("storm: %d wrong reads; first: %s", rep.Mismatch, rep.Str)
	}
	r := stormResult{Reads: rep.Ints[0], Releases: rep.Ints[2], FinalZero: rep.Ints[4], FinalPattern: rep.Ints[5],
		Slowest: time.Duration(rep.Ints[6]), Faults: rep.Ints[7], P99: time.Duration(rep.Ints[8])}
	if r.Reads == 0 || r.Releases == 0 || r.FinalZero == 0 || r.FinalPattern == 0 {
		t.Fatalf("the storm proved nothing: %+v", r)
	}
	return r
}

// exitReport makes the VMM exit and returns the daemon's report of it, which must say origin
// and no failure.
func exitReport(t testing.TB, v *vmm.VMM, p *daemonProc, origin string) daemon.Report {
	t.Helper()
	if err := v.Exit(); err != nil {
		t.Fatal(err)
	}
	select {
	case rep := <-p.reports:
		if rep.Origin != origin || rep.Failure != "" {
			t.Fatalf("the report of the VM: %+v, want origin %q and no failure", rep, origin)
		}
		return rep
	case <-time.After(20 * time.Second):
		t.Fatal("no report from the daemon")
	}
	return daemon.Report{}
}
