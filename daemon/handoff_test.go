//go:build linux

package daemon_test

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/internal/vmm"
)

// Live hand-off (--takeover) and the state directory's guards. Daemons run as processes of
// their own (see proc_test.go).

// An upgrade under load: the new daemon takes the VM over while its threads fault through a
// balloon storm; the old one exits by itself, no read is wrong, no thread hangs, and the
// slowest read across the hand-off is reported.
func TestTakeoverUnderLoad(t *testing.T) {
	spec := crashSpec(t)
	a, v, s := underLoad(t, spec, 1500)
	time.Sleep(400 * time.Millisecond) // into the storm
	spec.Takeover = true
	b, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.wait(20 * time.Second); err != nil {
		t.Fatalf("the old daemon after the hand-off: %v", err)
	}
	waitProbe(t, probe(t, v, 0)) // a fresh fault: the new daemon's
	r := s.wait(t, 2*time.Minute)
	t.Logf("takeover: the new daemon ready %v after its start", b.Ready.Sub(b.Started))
	t.Logf("storm: %d reads, %d faults: p99 ≤ %v, slowest %v (across the hand-off; target: ≤ 50 ms added); %d releases; after: %d pages zero, %d the snapshot",
		r.Reads, r.Faults, r.P99, r.Slowest, r.Releases, r.FinalZero, r.FinalPattern)
	if l := a.stderr.String(); !strings.Contains(l, "hand-off done") {
		t.Errorf("the old daemon's log does not say the hand-off was done:\n%s", l)
	} else {
		i := strings.Index(l, "hand-off done")
		t.Logf("old daemon: %s", strings.SplitN(l[i:], "\n", 2)[0])
	}
	select {
	case rep := <-a.reports:
		if rep.Cause != daemon.CauseHandedOver || rep.Failure != "" {
			t.Errorf("the old daemon's report: %+v", rep)
		}
	default:
		t.Error("the old daemon reported no VM")
	}
	exitReport(t, v, b, "taken over")
}

// VMMs that connect while a hand-off runs are served: the listening socket is handed over,
// never closed, so a connection waits in its backlog for whichever daemon accepts it.
func TestTakeoverWhileVMMsConnect(t *testing.T) {
	spec := crashSpec(t)
	if _, err := startDaemon(t, spec); err != nil {
		t.Fatal(err)
	}
	v := crashVM(t, spec.Socket)
	s := startStorm(t, v, 0, 800)
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		started []*vmm.VMM
		errs    []error
	)
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			m, err := vmm.Start(vmm.Options{Socket: spec.Socket, Regions: []vmm.Region{{Size: 1 << 20, FileOffset: 0}}})
			mu.Lock()
			if err != nil {
				errs = append(errs, err)
			} else {
				started = append(started, m)
			}
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		for _, m := range started {
			m.Kill()
		}
	})
	time.Sleep(100 * time.Millisecond)
	spec.Takeover = true
	b, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	before := len(started)
	mu.Unlock()
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d VMMs not served across the hand-off; first: %v", len(errs), errors.Join(errs[0]))
	}
	t.Logf("%d VMMs connected before the new daemon was ready, %d after; all served", before, len(started)-before)
	for i, m := range started {
		got, err := m.Touch(2, "rand", seed, false)
		if err != nil || got.Wrong != 0 || got.Pages != 256 {
			t.Fatalf("VMM %d: %+v %v", i, got, err)
		}
	}
	s.wait(t, time.Minute)
	_ = b
}

// Two daemons racing for one state directory: one gets it, the other refuses with an error
// that says so.
func TestStateDirRace(t *testing.T) {
	mem := snapshot(t, 1<<20)
	dir := filepath.Join(t.TempDir(), "state")
	var wg sync.WaitGroup
	ds := make([]*daemon.Daemon, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ds[i], errs[i] = daemon.New(daemon.Config{Socket: filepath.Join(t.TempDir(), "uffd.sock"), MemFile: mem,
				StateDir: dir, Logger: slog.New(slog.DiscardHandler)})
		}()
	}
	wg.Wait()
	var won int
	for i := range 2 {
		if errs[i] == nil {
			won++
			go ds[i].Serve()
			t.Cleanup(func() { ds[i].Close(); <-ds[i].Done() })
			continue
		}
		if !errors.Is(errs[i], daemon.ErrStateLocked) || !strings.Contains(errs[i].Error(), "locked by faultline serve pid") {
			t.Errorf("the loser's error: %v", errs[i])
		}
	}
	if won != 1 {
		t.Fatalf("%d daemons got the state directory, want 1: %v", won, errs)
	}
}

// A state directory that is corrupt, or from another state format, is a clear error: the new
// daemon does not start and serves nothing from it (the VM's waiting fault is not served);
// repaired, it is recovered, every byte right.
func TestStateDirCorruptOrWrongVersion(t *testing.T) {
	for _, c := range []struct {
		name  string
		off   int64 // the byte of the first state file changed
		b     byte
		want  string
		isErr error
	}{
		{"corrupt", 40, '~', "metadata checksum mismatch", daemon.ErrStateCorrupt},
		{"version", 8, 9, "is of state format 9, this faultline reads 1", daemon.ErrStateVersion},
		{"magic", 0, 'X', "not a faultline state file", daemon.ErrStateCorrupt},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := crashSpec(t)
			v := crashed(t, spec)
			files, _ := filepath.Glob(filepath.Join(spec.StateDir, "vm-*.state"))
			if len(files) != 1 {
				t.Fatalf("state files %v", files)
			}
			f, err := os.OpenFile(files[0], os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			old := make([]byte, 1)
			f.ReadAt(old, c.off)
			f.WriteAt([]byte{c.b}, c.off)
			pc := probe(t, v, 0)
			_, err = startDaemon(t, spec)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), files[0]) {
				t.Fatalf("a daemon on the damaged state directory: %v, want an error naming the file and saying %q", err, c.want)
			}
			// In-process too, for the error's kind.
			_, err = daemon.New(daemon.Config{Socket: filepath.Join(t.TempDir(), "s"), MemFile: spec.MemFile,
				StateDir: spec.StateDir, Logger: slog.New(slog.DiscardHandler)})
			if !errors.Is(err, c.isErr) {
				t.Fatalf("New: %v, want %v", err, c.isErr)
			}
			if pc.Done() {
				t.Fatal("the probe fault was served while no daemon could serve it")
			}
			f.WriteAt(old, c.off)
			if _, err := startDaemon(t, spec); err != nil {
				t.Fatalf("the repaired state directory: %v", err)
			}
			waitProbe(t, pc)
			if got, err := v.Touch(2, "rand", seed, false); err != nil || got.Wrong != 0 {
				t.Fatalf("after recovery: %+v %v", got, err)
			}
		})
	}
}

// --takeover with no live daemon to take over from (it was killed): the new daemon recovers the
// VMs of the state directory, as after a crash.
func TestTakeoverAfterCrashRecovers(t *testing.T) {
	spec := crashSpec(t)
	v := crashed(t, spec)
	pc := probe(t, v, 0)
	spec.Takeover = true
	b, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	waitProbe(t, pc)
	if !strings.Contains(b.stderr.String(), "no live daemon to take over from") {
		t.Errorf("the new daemon's log does not say why it recovered:\n%s", b.stderr.String())
	}
	if got, err := v.Touch(2, "rand", seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("after recovery: %+v %v", got, err)
	}
	exitReport(t, v, b, "recovered")
}

// A successor started with another snapshot is refused, by the live daemon (a takeover) or at
// its start (a recovery), and the VM lives on: it is not killed for an operator's typo.
func TestOtherSnapshotRefused(t *testing.T) {
	spec := crashSpec(t)
	a, err := startDaemon(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	v := crashVM(t, spec.Socket)
	other := spec
	other.MemFile = snapshot(t, stormSize+probeSize) // the same bytes, another file
	other.Takeover = true
	if _, err := startDaemon(t, other); err == nil || !strings.Contains(err.Error(), "take over with the same snapshot") {
		t.Fatalf("a takeover with another snapshot: %v", err)
	}
	if got, err := v.TouchRange(0, 0, 1<<20, 2, seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("the VM after the refused takeover: %+v %v", got, err)
	}
	a.kill()
	pc := probe(t, v, 0)
	other.Takeover = false
	if _, err := startDaemon(t, other); err == nil || !strings.Contains(err.Error(), "start it with that snapshot") {
		t.Fatalf("a recovery with another snapshot: %v", err)
	}
	if pc.Done() {
		t.Fatal("the probe was served by a daemon that refused to start")
	}
	if _, err := startDaemon(t, spec); err != nil {
		t.Fatal(err)
	}
	waitProbe(t, pc)
}

// A hand-off that fails after the old daemon stopped its VMs — the successor dies once it has
// received everything — ends with the old daemon serving them again (taken back from the state
// directory): the storm goes on, every byte right, and a later takeover goes through.
func TestTakeoverFailsVMsTakenBack(t *testing.T) {
	spec := crashSpec(t)
	a, v, s := underLoad(t, spec, 1500)
	time.Sleep(300 * time.Millisecond)
	dying := spec
	dying.Takeover, dying.DieInTakeover = true, true
	if _, err := startDaemon(t, dying); err == nil {
		t.Fatal("the dying successor started")
	}
	waitUntil(t, "the old daemon to take its VMs back", func() bool {
		return strings.Contains(a.stderr.String(), "the VMs are served here again")
	})
	select {
	case <-a.exited:
		t.Fatalf("the old daemon exited after a failed hand-off: %v", a.err)
	default:
	}
	waitProbe(t, probe(t, v, 0))
	r := s.wait(t, 2*time.Minute)
	t.Logf("storm across the failed hand-off: %d reads, %d faults, slowest %v", r.Reads, r.Faults, r.Slowest)
	spec.Takeover = true
	b, err := startDaemon(t, spec)
	if err != nil {
		t.Fatalf("a takeover after the failed one: %v", err)
	}
	if err := a.wait(20 * time.Second); err != nil {
		t.Fatal(err)
	}
	exitReport(t, v, b, "taken over")
}
