//go:build linux

package engine_test

import (
	"bytes"
	"context"
	"errors"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// Tests of races and lifecycle bugs found in review, each against the kernel with the faulting
// side in the puppet child. Each failed on the engine before its fix.

// A fetch in flight across a REMAP: a thread faults on a page at the area's new address while
// the slow read for that page, queued at the old address, is still running. The fetch must
// install and wake where the page is now; before the fix it copied to the old address (ENOENT),
// and the thread at the new address, its fault dropped as "being fetched", slept forever.
func TestRemapDuringFetch(t *testing.T) {
	const seed = 31
	v := newVM(t, memory.Anon, 1<<20, uffd.FeatureEventRemap, uffd.ModeMissing)
	ps := v.pageSize
	full := patternSource(t, v.size, seed)
	src := newGatedSource(source.NewMemory(full.Bytes(0, int64(v.size))))
	src.slowFrom, src.slowTo = 0, int64(8*ps)
	e, stop := serve(t, v, []engine.Region{v.region(src)}, engine.Options{FaultAround: engine.FaultAround{Min: 8, Max: 8}})
	defer src.open()

	// Page 0 faults at the old address; its fetch (pages 0-7) waits at the gate.
	old := v.start(puppet.Request{Op: "read", Off: 64, Len: 64})
	src.waitEntered(t)
	to := uintptr(v.do(puppet.Request{Op: "eng-mremap"}).Addr)
	if to == v.addr {
		t.Fatal("mremap left the area in place")
	}
	// Page 3 at the new address, part of the run being fetched, from a quiet thread: Go's
	// preemption signal would otherwise interrupt its wait and make it fault afresh, hiding a
	// lost wake-up (a VMM's vCPU thread gets no such signal).
	moved := v.start(puppet.Request{Op: "eng-touch", Off: 3 * ps, Len: ps, Seed: seed, Ints: []int64{1}})
	waitFaults(t, e, 2)
	src.open()
	rep, _, err := moved.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("the thread faulting at the new address was never served: %v", err)
	}
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("page 3 at the new address: %d pages wrong, %d signals", rep.Mismatch, rep.Sigbus)
	}
	// The thread that faulted at the old address is woken too; the address is gone, so it
	// takes SIGSEGV (or, had it been served before the move, reads the data). Either way it ends.
	if rep, _, err := old.Wait(20 * time.Second); err != nil {
		t.Fatalf("the thread faulting at the old address never ended: %v", err)
	} else {
		t.Logf("the thread at the old address ended with %d signals", rep.Sigbus)
	}
	touchRange(t, v, 0, v.size, "pattern", seed)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st := e.Stats()[0]; st.Errors != 0 {
		t.Errorf("%d errors", st.Errors)
	}
}

// waitFaults waits until e has read at least n fault messages.
func waitFaults(t testing.TB, e *engine.Engine, n uint64) {
	t.Helper()
	if !settle(func() bool { return e.Stats()[0].Faults >= n }) {
		t.Fatalf("the engine read %d faults, want %d", e.Stats()[0].Faults, n)
	}
}

// mremap(MREMAP_FIXED) of the second half of a registered area onto its first half: the first
// half's addresses now hold the second half's pages (file offsets), and must be served from
// there. Before the fix the span table kept the destination's old span beside the moved one,
// and the lookup found the stale one: bytes of the wrong offset.
func TestRemapOntoRegistered(t *testing.T) {
	const seed = 32
	v := newVM(t, memory.Anon, 1<<20, uffd.FeatureEventRemap, uffd.ModeMissing)
	half := v.size / 2
	full := patternSource(t, v.size, seed)
	e, stop := serveLogged(t, v, []engine.Region{v.region(full)}, engine.Options{})
	v.do(puppet.Request{Op: "eng-mremap-onto", Off: half, Len: half, Ints: []int64{0}})
	for _, off := range []int{0, 5 * v.pageSize, half - v.pageSize} {
		rep := v.do(puppet.Request{Op: "read", Off: off, Len: 256})
		if want := full.Bytes(int64(half+off), 256); !bytes.Equal(rep.Data, want) {
			t.Fatalf("offset %d after the move reads the bytes of offset %d, want those of %d", off, findOffset(full, rep.Data), half+off)
		}
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st := e.Stats()[0]; st.Errors != 0 {
		t.Errorf("%d errors", st.Errors)
	}
}

// findOffset returns where b occurs in src (page-aligned search), or -1.
func findOffset(src *source.Memory, b []byte) int {
	all := src.Bytes(0, src.Size())
	for off := 0; off+len(b) <= len(all); off += 4096 {
		if bytes.Equal(all[off:off+len(b)], b) {
			return off
		}
	}
	return -1
}

// closedSource records reads after the owner closed it, as the daemon closes the snapshot once
// the engines' Run returned.
type closedSource struct {
	*gatedSource
	closed     atomic.Bool
	lateReads  atomic.Int64
	totalReads atomic.Int64
}

func (s *closedSource) ReadAt(p []byte, off int64) (int, error) {
	s.totalReads.Add(1)
	n, err := s.gatedSource.ReadAt(p, off)
	if s.closed.Load() {
		s.lateReads.Add(1)
		return 0, errors.New("read after close")
	}
	return n, err
}

// A forked child's engine must not outlive the parent's Run: the owner releases the shared
// source when Run returns. Here the child's fetch is in flight when the parent is closed. Before
// the fix Run returned at once and the child's fetcher read the source after the owner closed it.
func TestForkChildEndsBeforeParentRun(t *testing.T) {
	const seed = 33
	v := newVM(t, memory.Anon, 1<<20, uffd.FeatureEventFork, uffd.ModeMissing)
	full := patternSource(t, v.size, seed)
	src := &closedSource{gatedSource: newGatedSource(source.NewMemory(full.Bytes(0, int64(v.size))))}
	src.slowFrom, src.slowTo = 0, int64(v.size)
	defer src.open()
	forked := make(chan *engine.Engine, 1)
	e, err := engine.New(v.fd, []engine.Region{v.region(src)}, engine.Options{OnFork: func(c *engine.Engine) { forked <- c }})
	if err != nil {
		t.Fatal(err)
	}
	v.fd = nil
	errc := runEngine(context.Background(), e)
	defer stopEngine(t, e)

	// The forked process reads a page: its fault goes to the child's engine, whose fetch waits.
	call := v.start(puppet.Request{Op: "fork", Len: v.pageSize, Stride: v.pageSize})
	var c *engine.Engine
	select {
	case c = <-forked:
	case <-time.After(20 * time.Second):
		t.Fatal("OnFork was not called")
	}
	src.waitEntered(t)
	e.Close()
	// While the child's read is held, Run must not have returned; open the gate after a while
	// (the outcome is checked below whatever the timing).
	select {
	case err := <-errc:
		src.closed.Store(true) // the owner would release the source now
		src.open()
		c.Close()
		<-c.Done()
		t.Fatalf("Run returned (%v) while the forked child's engine was still reading the source (%d reads after close)", err, src.lateReads.Load())
	case <-time.After(500 * time.Millisecond):
	}
	src.open()
	if err := waitRun(t, errc); err != nil {
		t.Fatalf("Run = %v", err)
	}
	src.closed.Store(true)
	select {
	case <-c.Done():
	default:
		t.Fatal("the parent's Run returned before the forked child's engine was done")
	}
	if n := src.lateReads.Load(); n != 0 {
		t.Fatalf("%d reads of the source after the parent's Run returned", n)
	}
	if _, _, err := call.Wait(20 * time.Second); err != nil {
		t.Fatalf("fork: %v", err)
	}
}

// Run is run-once, and Close releases an engine that never ran: its userfaultfd is closed and
// Done is closed. Before the fix Run twice panicked (closing a closed channel) and an engine
// never run kept its fd open for good.
func TestRunOnceAndCloseUnrun(t *testing.T) {
	t.Run("never-run", func(t *testing.T) {
		v := newVM(t, memory.Hugetlb, 4<<20, 0, uffd.ModeMissing) // hugetlb: a zero buffer too
		e, fd := newEngine(t, v, engine.Options{})
		before := kerneltest.OpenFDs(t)
		e.Close()
		select {
		case <-e.Done():
		default:
			t.Fatal("Done not closed by Close of an engine that never ran")
		}
		if isUffd(fd) {
			t.Fatalf("fd %d is still a userfaultfd after Close of an engine that never ran", fd)
		}
		after := kerneltest.OpenFDs(t)
		var gone []string
		for n, what := range before {
			if after[n] != what {
				gone = append(gone, n)
			}
		}
		if len(gone) != 1 || gone[0] != strconv.Itoa(fd) {
			t.Errorf("Close closed fds %v, want exactly the uffd %d", gone, fd)
		}
	})
	t.Run("twice", func(t *testing.T) {
		v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
		e, _ := newEngine(t, v, engine.Options{})
		errc := runEngine(context.Background(), e)
		touchRange(t, v, 0, 16*v.pageSize, "pattern", 1)
		if err := e.Run(context.Background()); !errors.Is(err, engine.ErrRunOnce) {
			t.Fatalf("second Run = %v, want ErrRunOnce", err)
		}
		e.Close()
		if err := waitRun(t, errc); err != nil {
			t.Fatalf("first Run = %v", err)
		}
		if err := e.Run(context.Background()); !errors.Is(err, engine.ErrRunOnce) {
			t.Fatalf("Run after Run returned = %v, want ErrRunOnce", err)
		}
	})
}

// On hugetlb a fault-around window is capped in bytes: 64 pages would be 128 MiB in one COPY
// under the shared lock, holding up event reads. Before the fix a fixed window of 4 pages
// installed 4 huge pages (8 MiB) per fault.
func TestFaultAroundByteCap(t *testing.T) {
	v := newVM(t, memory.Hugetlb, 16<<20, 0, uffd.ModeMissing)
	e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, 34))},
		engine.Options{FaultAround: engine.FaultAround{Min: 4, Max: 4}})
	touchRange(t, v, 0, v.pageSize, "pattern", 34)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got, want := e.Installed()["mem"], engine.DefaultFaultAroundBytes/v.pageSize; got != want {
		t.Fatalf("one fault installed %d huge pages, want %d (the %d-byte cap)", got, want, engine.DefaultFaultAroundBytes)
	}
}

// Adaptive fault-around tells concurrent streams apart: 4 threads, each walking its own part of
// a region in order (as vCPUs do), take at most one fault per 8 pages. Before the fix one
// stream per region saw every fault as a jump and served one page per fault.
func TestFaultAroundStreams(t *testing.T) {
	const seed = 35
	v := newVM(t, memory.Anon, 32<<20, 0, uffd.ModeMissing)
	pages := v.size / v.pageSize
	e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))},
		engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})
	rep := v.do(puppet.Request{Op: "touch", Threads: 4, Order: "parts", Verify: "pattern", Seed: seed})
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("%d pages wrong, %d signals", rep.Mismatch, rep.Sigbus)
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	st := e.Stats()[0]
	t.Logf("4 threads, own parts: %d faults for %d pages (%s)", st.Missing, pages, statsLine(st))
	if st.Missing > uint64(pages/8) {
		t.Errorf("%d faults for %d pages, want at most 1 per 8 pages", st.Missing, pages)
	}
}

// On random access adaptive fault-around installs what the faults earn, no more: 8 threads
// touching a quarter of the pages (one per 4-page group, random order) get at most 5% more pages
// installed than they touch.
func TestFaultAroundRandomStaysSmall(t *testing.T) {
	const seed = 36
	v := newVM(t, memory.Anon, 32<<20, 0, uffd.ModeMissing)
	touched := v.size / (4 * v.pageSize)
	e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))},
		engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})
	// Only the first word of each group is read here (a check would read the whole group);
	// every byte is checked by the pass below, once the counts are taken.
	rep := v.do(puppet.Request{Op: "touch", Threads: 8, Order: "rand", Stride: 4 * v.pageSize, Seed: seed})
	if rep.Pages != touched || rep.Sigbus != 0 {
		t.Fatalf("touched %d pages (%d signals), want %d", rep.Pages, rep.Sigbus, touched)
	}
	st := e.Stats()[0]
	touchRange(t, v, 0, v.size, "pattern", seed)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	t.Logf("8 threads, random: %d pages installed for %d touched (%s)", st.Pages(), touched, statsLine(st))
	if st.Pages() > uint64(touched)*105/100 {
		t.Errorf("%d pages installed for %d touched, want at most 5%% more", st.Pages(), touched)
	}
}

// Fetchers start with the first read a non-resident source needs, and stop with the engine.
func TestFetchersStartOnFirstFetch(t *testing.T) {
	v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
	g0 := runtime.NumGoroutine()
	src := fetched{patternSource(t, v.size, 37)}
	e, stop := serve(t, v, []engine.Region{v.region(src)}, engine.Options{Fetchers: 3})
	if !settle(func() bool { return runtime.NumGoroutine() == g0+1 }) {
		t.Fatalf("goroutines: %d before Run, %d idle; want 1 more (the reader)", g0, runtime.NumGoroutine())
	}
	touchRange(t, v, 0, v.pageSize, "pattern", 37)
	if !settle(func() bool { return runtime.NumGoroutine() == g0+1+3 }) {
		t.Fatalf("goroutines: %d before Run, %d after a fetch; want the reader and 3 fetchers more", g0, runtime.NumGoroutine())
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !settle(func() bool { return runtime.NumGoroutine() <= g0 }) {
		t.Errorf("goroutines: %d before Run, %d after", g0, runtime.NumGoroutine())
	}
	if e.Installed()["mem"] != 1 {
		t.Errorf("%d pages installed, want 1", e.Installed()["mem"])
	}
}

// With Workers > 1, helpers take part of a large batch: 64 threads faulting at once outrun one
// reader, the helpers start, and every byte is right.
func TestHelpersShareLargeBatches(t *testing.T) {
	const seed = 38
	v := newVM(t, memory.Anon, 64<<20, 0, uffd.ModeMissing)
	g0 := runtime.NumGoroutine()
	e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))}, engine.Options{Workers: 3})
	rep := v.do(puppet.Request{Op: "eng-touch", Seed: seed, Order: "rand", Threads: 64})
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("%d pages wrong, %d signals", rep.Mismatch, rep.Sigbus)
	}
	if n := runtime.NumGoroutine(); n < g0+3 {
		t.Errorf("goroutines: %d before Run, %d after 64 threads faulted; want the reader and 2 helpers", g0, n)
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st := e.Stats()[0]; st.Pages() != uint64(v.size/v.pageSize) || st.Errors != 0 {
		t.Errorf("%d pages installed, %d errors; want %d and 0", st.Pages(), st.Errors, v.size/v.pageSize)
	}
}

// The FORK event's child engine is set up, and OnFork called, without the engine's exclusive
// lock: here OnFork waits until a fetch in flight for the parent installs its page (under the
// shared lock). Before the fix OnFork ran under the exclusive lock, the install waited for it,
// and it for the install: a fault served by nobody, for good.
func TestOnForkOutsideTheLock(t *testing.T) {
	const seed = 39
	v := newVM(t, memory.Anon, 1<<20, uffd.FeatureEventFork, uffd.ModeMissing)
	ps := v.pageSize
	full := patternSource(t, v.size, seed)
	src := newGatedSource(source.NewMemory(full.Bytes(0, int64(v.size))))
	src.slowFrom, src.slowTo = 0, int64(ps)
	defer src.open()
	installed := make(chan struct{})
	var onForkErr atomic.Value
	e, stop := serveLogged(t, v, []engine.Region{v.region(src)}, engine.Options{OnFork: func(c *engine.Engine) {
		src.open() // the fetch may install now
		select {
		case <-installed:
		case <-time.After(10 * time.Second):
			onForkErr.Store("the parent's fetch could not install while OnFork ran")
		}
	}})
	// The parent faults on page 0; its fetch waits at the gate.
	read := v.start(puppet.Request{Op: "eng-touch", Off: 0, Len: ps, Seed: seed, Ints: []int64{1}})
	src.waitEntered(t)
	go func() {
		if rep, _, err := read.Wait(20 * time.Second); err == nil && rep.Mismatch == 0 {
			close(installed)
		}
	}()
	// A fork (whose child reads nothing): OnFork runs, opens the gate, and waits for the install.
	if _, _, err := v.start(puppet.Request{Op: "fork", Len: 0, Stride: ps}).Wait(30 * time.Second); err != nil {
		t.Fatalf("fork: %v", err)
	}
	if msg := onForkErr.Load(); msg != nil {
		t.Fatal(msg)
	}
	select {
	case <-installed:
	case <-time.After(10 * time.Second):
		t.Fatal("the parent's faulting thread was never served")
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := e.Installed()["mem"]; got != 1 {
		t.Errorf("%d pages installed, want 1", got)
	}
}
