//go:build linux

package engine_test

import (
	"context"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// isUffd reports whether fd is open in this process as a userfaultfd.
func isUffd(fd int) bool {
	l, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	return err == nil && l == "anon_inode:[userfaultfd]"
}

// newEngine makes an engine over v's whole area from a pattern source; the test owns Run.
func newEngine(t testing.TB, v *vm, opts engine.Options) (*engine.Engine, int) {
	t.Helper()
	fd := v.fd.Fd()
	if !isUffd(fd) {
		t.Fatalf("fd %d is not a userfaultfd before the engine", fd)
	}
	e, err := engine.New(v.fd, []engine.Region{v.region(patternSource(t, v.size, 1))}, opts)
	if err != nil {
		t.Fatal(err)
	}
	v.fd = nil
	t.Cleanup(func() { stopEngine(t, e) })
	return e, fd
}

// Close with the reader parked in the netpoller: Run returns nil, and the userfaultfd is closed.
// An idle engine serving a resident source costs one goroutine, Run's own, however many Workers
// and Fetchers it may start: helpers start with the first batch of several faults (a single
// thread touching in order brings one at a time), fetchers with the first non-resident read.
func TestCloseParkedWorkers(t *testing.T) {
	v := newVM(t, memory.Anon, 4<<20, 0, uffd.ModeMissing)
	initNetpoller(t)
	fds := kerneltest.OpenFDs(t)
	g0 := runtime.NumGoroutine()
	e, fd := newEngine(t, v, engine.Options{Workers: 4, Fetchers: 2})
	errc := runEngine(context.Background(), e)
	// Serve some faults, so the workers have been through a read, then park.
	rep, _, err := v.start(puppet.Request{Op: "touch", Len: 64 << 10, Verify: "pattern", Seed: 1}).Wait(30 * time.Second)
	if err != nil || rep.Mismatch != 0 {
		t.Fatalf("touch: %v, %d wrong", err, rep.Mismatch)
	}
	if !settle(func() bool { return runtime.NumGoroutine() == g0+1 }) {
		t.Fatalf("goroutines: %d before Run, %d while serving idle; want exactly 1 more (the reader)", g0, runtime.NumGoroutine())
	}
	// Close from several goroutines at once: idempotent.
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); e.Close() }()
	}
	wg.Wait()
	if err := waitRun(t, errc); err != nil {
		t.Fatalf("Run after Close = %v, want nil", err)
	}
	select {
	case <-e.Done():
	default:
		t.Error("Done not closed after Run returned")
	}
	if isUffd(fd) {
		t.Errorf("fd %d is still a userfaultfd after Run returned", fd)
	}
	// The uffd is gone (above) and nothing is open that was not before.
	if fds[strconv.Itoa(fd)] != "anon_inode:[userfaultfd]" {
		t.Fatalf("fd %d was not the userfaultfd before Run: %v", fd, fds)
	}
	if leaked := newFDs(t, fds); len(leaked) > 0 {
		t.Errorf("fds opened while serving and still open after Run: %v", leaked)
	}
	if !settle(func() bool { return runtime.NumGoroutine() <= g0 }) {
		t.Errorf("goroutines: %d before Run, %d after", g0, runtime.NumGoroutine())
	}
	e.Close() // after Run: still harmless
	if got := e.Installed()["mem"]; got != 16 {
		t.Errorf("Installed after Run = %d, want 16", got)
	}
}

// Run with a context that is already cancelled, or cancelled while serving, returns nil and
// closes the userfaultfd.
func TestRunCancelledContext(t *testing.T) {
	t.Run("before", func(t *testing.T) {
		v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
		e, fd := newEngine(t, v, engine.Options{Workers: 2})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := waitRun(t, runEngine(ctx, e)); err != nil {
			t.Fatalf("Run = %v, want nil", err)
		}
		if isUffd(fd) {
			t.Errorf("fd %d is still a userfaultfd after Run returned", fd)
		}
	})
	t.Run("while-serving", func(t *testing.T) {
		v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
		e, fd := newEngine(t, v, engine.Options{Workers: 2})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		errc := runEngine(ctx, e)
		rep, _, err := v.start(puppet.Request{Op: "touch", Verify: "pattern", Seed: 1}).Wait(30 * time.Second)
		if err != nil || rep.Mismatch != 0 {
			t.Fatalf("touch: %v, %d wrong", err, rep.Mismatch)
		}
		cancel()
		if err := waitRun(t, errc); err != nil {
			t.Fatalf("Run = %v, want nil", err)
		}
		if isUffd(fd) {
			t.Errorf("fd %d is still a userfaultfd after Run returned", fd)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
		e, _ := newEngine(t, v, engine.Options{})
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if err := waitRun(t, runEngine(ctx, e)); err != nil {
			t.Fatalf("Run = %v, want nil", err)
		}
	})
}

// Close before Run: Run returns nil at once and still closes the fd.
func TestCloseBeforeRun(t *testing.T) {
	v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
	e, fd := newEngine(t, v, engine.Options{Workers: 3})
	e.Close()
	if err := waitRun(t, runEngine(context.Background(), e)); err != nil {
		t.Fatalf("Run = %v, want nil", err)
	}
	if isUffd(fd) {
		t.Errorf("fd %d is still a userfaultfd after Run returned", fd)
	}
}

// The fault path allocates nothing in steady state: serving 4096 faults from a resident source
// costs (amortized over them) effectively no heap allocations in this process. The count
// includes the test's own puppet traffic, which is a handful of allocations per command.
func TestServeAllocations(t *testing.T) {
	const faults = 4096
	v := newVM(t, memory.Anon, (faults+64)*4096, 0, uffd.ModeMissing)
	e, _ := newEngine(t, v, engine.Options{})
	errc := runEngine(context.Background(), e)
	// Warm up: the first faults grow nothing, but let any lazy setup happen outside the count.
	if _, _, err := v.start(puppet.Request{Op: "touch", Len: 64 * 4096}).Wait(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	call := puppet.Request{Op: "touch", Off: 64 * 4096, Len: faults * 4096}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	rep, _, err := v.start(call).Wait(60 * time.Second)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Pages != faults {
		t.Fatalf("touched %d pages, want %d", rep.Pages, faults)
	}
	// The counters of a fault are updated after the COPY woke the thread: stop first.
	e.Close()
	if err := waitRun(t, errc); err != nil {
		t.Fatalf("Run: %v", err)
	}
	st := e.Stats()[0]
	if st.PagesFault != faults+64 || st.PagesAround != 0 {
		t.Fatalf("served %d faults (%d around), want %d", st.PagesFault, st.PagesAround, faults+64)
	}
	mallocs := after.Mallocs - before.Mallocs
	perFault := float64(mallocs) / faults
	t.Logf("%d mallocs for %d faults: %.4f per fault", mallocs, faults, perFault)
	if perFault >= 0.05 {
		t.Errorf("%d mallocs while serving %d faults (%.3f per fault), want < 0.05 per fault", mallocs, faults, perFault)
	}
}
