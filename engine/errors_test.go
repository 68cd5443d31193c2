//go:build linux

package engine_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync"
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

// gatedSource is a source that is not resident (only source.Source): the engine must read it
// from its fetchers, off the fault path. Reads that touch [slowFrom, slowTo) report their offset
// on entered and then wait until the gate opens; reads that touch [failFrom, failTo) fail with
// errBadBlock (after the gate, if both apply).
type gatedSource struct {
	mem              *source.Memory
	slowFrom, slowTo int64
	failFrom, failTo int64
	short            bool // reads of the failing range return short with no error instead
	entered          chan int64
	gate             chan struct{}
	openOnce         sync.Once
	failedReads      atomic.Int64
}

var errBadBlock = errors.New("test source: bad block")

func newGatedSource(mem *source.Memory) *gatedSource {
	return &gatedSource{mem: mem, entered: make(chan int64, 64), gate: make(chan struct{})}
}

func overlaps(off, n, from, to int64) bool { return from < to && off < to && off+n > from }

func (s *gatedSource) ReadAt(p []byte, off int64) (int, error) {
	if overlaps(off, int64(len(p)), s.slowFrom, s.slowTo) {
		select {
		case s.entered <- off:
		default:
		}
		<-s.gate
	}
	if overlaps(off, int64(len(p)), s.failFrom, s.failTo) {
		s.failedReads.Add(1)
		if s.short {
			return s.mem.ReadAt(p[:s.failFrom-min(off, s.failFrom)], off)
		}
		return 0, fmt.Errorf("reading %d bytes at %d: %w", len(p), off, errBadBlock)
	}
	return s.mem.ReadAt(p, off)
}

func (s *gatedSource) Size() int64  { return s.mem.Size() }
func (s *gatedSource) Close() error { return nil }

// open lets every waiting and future slow read proceed.
func (s *gatedSource) open() {
	s.openOnce.Do(func() { close(s.gate) })
}

// waitEntered waits for a slow read to start and returns its offset.
func (s *gatedSource) waitEntered(t testing.TB) int64 {
	t.Helper()
	select {
	case off := <-s.entered:
		return off
	case <-time.After(20 * time.Second):
		t.Fatal("the engine never read the slow range of the source")
		return 0
	}
}

var _ source.Source = (*gatedSource)(nil)

// Neither Resident nor Zeros: the engine must fetch.
func TestGatedSourceIsNotResident(t *testing.T) {
	var s source.Source = newGatedSource(source.NewMemory(make([]byte, 4096)))
	if _, ok := s.(source.Resident); ok {
		t.Fatal("gatedSource must not be Resident")
	}
	if _, ok := s.(source.Zeros); ok {
		t.Fatal("gatedSource must not be Zeros")
	}
}

// countingHandler counts log records at Warn and above.
type countingHandler struct{ n atomic.Int64 }

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		h.n.Add(1)
	}
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

// newFDs lists the fds open now that were not open in before, or point elsewhere now.
func newFDs(t testing.TB, before map[string]string) []string {
	t.Helper()
	var out []string
	for fd, link := range kerneltest.OpenFDs(t) {
		if before[fd] != link {
			out = append(out, fd+" -> "+link)
		}
	}
	return out
}

// initNetpoller makes sure the runtime's netpoller exists (it opens an epoll fd and an eventfd
// on first use and keeps them), so that a test that compares fd sets does not count them as
// the engine's.
func initNetpoller(t testing.TB) {
	t.Helper()
	r, w, err := os.Pipe() // pipes from os.Pipe are registered with the netpoller
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Close()
}

// faultSleeper reports whether a thread of process pid sleeps in a userfault: its kernel stack
// (or, where that cannot be read, its wait channel) shows handle_userfault.
func faultSleeper(pid int) bool {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s/", pid, task.Name())
		b, err := os.ReadFile(dir + "stack")
		if err != nil {
			b, _ = os.ReadFile(dir + "wchan")
		}
		if strings.Contains(string(b), "handle_userfault") {
			return true
		}
	}
	return false
}

// settle waits until cond holds, up to 10 s; it reports whether it did.
func settle(cond func() bool) bool {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// runEngine starts e.Run(ctx) and returns a channel with its result.
func runEngine(ctx context.Context, e *engine.Engine) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- e.Run(ctx) }()
	return errc
}

// stopEngine closes e and waits for its Run to return.
func stopEngine(t testing.TB, e *engine.Engine) {
	e.Close()
	select {
	case <-e.Done():
	case <-time.After(20 * time.Second):
		t.Error("Run did not return after Close")
	}
}

func waitRun(t testing.TB, errc <-chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

// twoRegions splits v's area in two regions of one engine: "slow" (first half) from slow, and
// "fast" (second half) from a resident pattern source. Both are the pattern of seed at the
// area's offsets, so a touch with Verify "pattern" checks either.
func twoRegions(t testing.TB, v *vm, seed uint64) ([]engine.Region, *gatedSource) {
	half := v.size / 2
	full := patternSource(t, v.size, seed)
	slow := newGatedSource(source.NewMemory(full.Bytes(0, int64(half))))
	fast := source.NewMemory(full.Bytes(int64(half), int64(half)))
	ps := uintptr(v.pageSize)
	return []engine.Region{
		{Name: "slow", Base: v.addr, Size: uintptr(half), PageSize: ps, Source: slow},
		{Name: "fast", Base: v.addr + uintptr(half), Size: uintptr(half), PageSize: ps, Source: fast},
	}, slow
}

// A fault on a page whose fetch is slow does not hold up faults of another region that can be
// served now: the fast region's pages are installed while the slow read is still in flight.
func TestSlowSourceDoesNotBlockFastRegion(t *testing.T) {
	for _, k := range []memory.Kind{memory.Anon, memory.Hugetlb} {
		t.Run(k.String(), func(t *testing.T) {
			v := newVM(t, k, 8<<20, 0, uffd.ModeMissing)
			regions, slow := twoRegions(t, v, 11)
			slow.slowFrom, slow.slowTo = 0, int64(v.size/2)
			e, stop := serve(t, v, regions, engine.Options{FaultAround: engine.FaultAround{Max: 4}})
			defer slow.open()

			half := v.size / 2
			ps := v.pageSize
			// Two child threads fault on the same slow page: one fetch, both wait for it.
			slowA := v.start(puppet.Request{Op: "touch", Off: ps, Len: ps, Verify: "pattern", Seed: 11})
			off := slow.waitEntered(t)
			if off != int64(ps) {
				t.Errorf("slow read at source offset %d, want %d", off, ps)
			}
			slowB := v.start(puppet.Request{Op: "touch", Off: ps, Len: ps, Verify: "pattern", Seed: 11})

			// Meanwhile the whole fast region is served.
			rep, _, err := v.start(puppet.Request{Op: "touch", Off: half, Len: half, Threads: 2, Verify: "pattern", Seed: 11}).Wait(30 * time.Second)
			if err != nil {
				t.Fatalf("fast region not served while a slow fetch is in flight: %v", err)
			}
			if rep.Mismatch != 0 {
				t.Fatalf("fast region: %d pages wrong, first bad byte %d", rep.Mismatch, rep.FirstBad)
			}
			// The order of completion: fast done, slow still waiting.
			if slowA.Done() || slowB.Done() {
				t.Fatal("a slow touch completed before its source read returned")
			}
			if got := e.Installed()["slow"]; got != 0 {
				t.Errorf("slow region has %d pages installed before the read returned", got)
			}

			slow.open()
			for i, c := range []*puppet.Call{slowA, slowB} {
				rep, _, err := c.Wait(30 * time.Second)
				if err != nil {
					t.Fatalf("slow touch %d: %v", i, err)
				}
				if rep.Mismatch != 0 {
					t.Fatalf("slow touch %d: wrong bytes at %d", i, rep.FirstBad)
				}
			}
			// The rest of the slow region, through the fetchers with fault-around.
			rep, _, err = v.start(puppet.Request{Op: "touch", Len: half, Threads: 2, Verify: "pattern", Seed: 11}).Wait(30 * time.Second)
			if err != nil || rep.Mismatch != 0 {
				t.Fatalf("slow region: %v, %d pages wrong (first bad byte %d)", err, rep.Mismatch, rep.FirstBad)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			st := e.Stats()
			for _, s := range st {
				if got := int(s.PagesFault + s.PagesAround); got != half/ps {
					t.Errorf("region %s: installed %d pages, want %d (%+v)", s.Region, got, half/ps, s)
				}
				if s.Errors != 0 {
					t.Errorf("region %s: %d errors", s.Region, s.Errors)
				}
			}
			if st[0].Bytes != uint64(half) {
				t.Errorf("slow region: %d bytes read from the source, want %d", st[0].Bytes, half)
			}
		})
	}
}

// A source that fails stops the engine with an error naming the region and the offset; the
// thread that faulted on the page gets no bytes at all — it stays blocked until it is killed.
func TestFailingSource(t *testing.T) {
	for _, tc := range []struct {
		name  string
		short bool
	}{{"error", false}, {"short-read", true}} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVM(t, memory.Anon, 4<<20, 0, uffd.ModeMissing)
			src := newGatedSource(source.NewMemory(patternSource(t, v.size, 5).Bytes(0, int64(v.size))))
			ps := v.pageSize
			badPage := 100
			src.failFrom, src.failTo = int64(badPage*ps), int64(badPage*ps+ps)
			src.short = tc.short
			e, err := engine.New(v.fd, []engine.Region{v.region(src)}, engine.Options{})
			if err != nil {
				t.Fatal(err)
			}
			v.fd = nil
			errc := runEngine(context.Background(), e)
			t.Cleanup(func() { stopEngine(t, e) })

			// Good pages are served.
			rep, _, err := v.start(puppet.Request{Op: "touch", Len: badPage * ps, Verify: "pattern", Seed: 5}).Wait(30 * time.Second)
			if err != nil || rep.Mismatch != 0 {
				t.Fatalf("good pages: %v, %d wrong", err, rep.Mismatch)
			}
			// The bad page: the read blocks in the fault and never returns data.
			bad := v.start(puppet.Request{Op: "read", Off: badPage*ps + 8, Len: 64})
			runErr := waitRun(t, errc)
			if runErr == nil {
				t.Fatal("Run returned nil after the source failed")
			}
			t.Logf("Run: %v", runErr)
			if !tc.short && !errors.Is(runErr, errBadBlock) {
				t.Errorf("Run's error %v does not wrap the source's error", runErr)
			}
			msg := runErr.Error()
			if !strings.Contains(msg, `"mem"`) {
				t.Errorf("Run's error %q does not name the region", msg)
			}
			if want := fmt.Sprint(badPage * ps); !strings.Contains(msg, want) {
				t.Errorf("Run's error %q does not name the source offset %s", msg, want)
			}
			if st := e.Stats()[0]; st.Errors == 0 {
				t.Errorf("Stats().Errors = 0 after a failed read (%+v)", st)
			}
			if e.Installed()["mem"] != badPage {
				t.Errorf("installed %d pages, want %d (the bad page must not be)", e.Installed()["mem"], badPage)
			}
			// Run has returned and closed its fd; the child still holds its own, so the thread
			// must still sleep in the fault, with no bytes: see it there, then kill the child.
			if !settle(func() bool { return faultSleeper(v.p.Pid()) || bad.Done() }) || bad.Done() {
				rep, _, err := bad.Wait(time.Second)
				t.Fatalf("no thread of the child sleeps in the fault on the bad page after Run returned; the read returned %x, %v", rep.Data, err)
			}
			v.p.Kill()
			rep, _, err = bad.Wait(10 * time.Second)
			if err == nil {
				t.Fatalf("the read of the bad page returned %x after the kill", rep.Data)
			}
			if len(rep.Data) != 0 {
				t.Fatalf("the faulting thread got %d bytes", len(rep.Data))
			}
		})
	}
}

// The child is killed while faults are being served and a fetch is in flight: the fetch's COPY
// hits ESRCH, Run returns ErrProcessGone — once, with no error storm — and the engine leaves no
// goroutine and no fd behind.
func TestProcessGone(t *testing.T) {
	g0 := runtime.NumGoroutine()
	initNetpoller(t)
	fd0 := kerneltest.OpenFDs(t)

	func() {
		v := newVM(t, memory.Anon, 32<<20, 0, uffd.ModeMissing)
		regions, slow := twoRegions(t, v, 9)
		slow.slowFrom, slow.slowTo = 0, int64(v.size/2)
		logs := &countingHandler{}
		e, err := engine.New(v.fd, regions, engine.Options{Workers: 2, FaultAround: engine.FaultAround{Max: 8}, Logger: slog.New(logs)})
		if err != nil {
			t.Fatal(err)
		}
		v.fd = nil
		errc := runEngine(context.Background(), e)
		defer stopEngine(t, e)
		defer slow.open()

		// One thread waits on a slow page; four others fault all over the fast region.
		v.start(puppet.Request{Op: "touch", Off: 0, Len: v.pageSize})
		slow.waitEntered(t)
		busy := v.start(puppet.Request{Op: "touch", Off: v.size / 2, Len: v.size / 2, Threads: 4, Order: "rand", Seed: 1})
		if !settle(func() bool { return e.Stats()[1].PagesFault > 500 || busy.Done() }) {
			t.Fatal("the fast region is not being served")
		}
		v.p.Kill()
		slow.open() // the fetch's COPY now meets a process that is gone

		runErr := waitRun(t, errc)
		if !errors.Is(runErr, engine.ErrProcessGone) {
			t.Fatalf("Run = %v, want ErrProcessGone", runErr)
		}
		for _, s := range e.Stats() {
			if s.Errors != 0 {
				t.Errorf("region %s: %d errors counted for a process that exited", s.Region, s.Errors)
			}
		}
		if n := logs.n.Load(); n != 0 {
			t.Errorf("%d warnings or errors logged for a process that exited", n)
		}
		select {
		case <-e.Done():
		default:
			t.Error("Done not closed after Run returned")
		}
		t.Logf("fast region: %d faults served before the kill", e.Stats()[1].PagesFault)
	}()

	if !settle(func() bool { return runtime.NumGoroutine() <= g0 }) {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines: %d before, %d after\n%s", g0, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
	}
	// The child's uffd and control socket are closed once Run has returned and the puppet has
	// seen the child die.
	if !settle(func() bool { return len(newFDs(t, fd0)) == 0 }) {
		t.Errorf("fds left open by the engine or the puppet: %v", newFDs(t, fd0))
	}
}
