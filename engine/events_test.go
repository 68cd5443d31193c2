//go:build linux

package engine_test

import (
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// Tests of the engine under every event the kernel sends (REMOVE, UNMAP, REMAP, FORK) and under
// WP and MINOR faults. The faulting side is always the puppet child; the test process only
// serves.

// eventSize is the area size per kind: 512 small pages, or 16 huge pages.
func eventSize(k memory.Kind) int {
	if k.Huge() {
		return 32 << 20
	}
	return 2 << 20
}

// fetched hides a Memory source's Bytes, so the engine reads it through its fetchers as it would
// a file or a remote image: the prefetch path.
type fetched struct{ m *source.Memory }

func (f fetched) ReadAt(p []byte, off int64) (int, error) { return f.m.ReadAt(p, off) }
func (f fetched) Size() int64                             { return f.m.Size() }
func (f fetched) Close() error                            { return nil }

// pageSet is a set of page indexes, encoded as eng-touch wants its "must read zero" bitmap.
type pageSet []byte

func (s *pageSet) add(lo, hi int) {
	for p := lo; p < hi; p++ {
		for len(*s) <= p/8 {
			*s = append(*s, 0)
		}
		(*s)[p/8] |= 1 << (p % 8)
	}
}

func (s pageSet) has(p int) bool { return p/8 < len(s) && s[p/8]&(1<<(p%8)) != 0 }

func (s pageSet) count() int {
	n := 0
	for p := 0; p < 8*len(s); p++ {
		if s.has(p) {
			n++
		}
	}
	return n
}

// touchFlags modify a touch.
type touchFlags int

const (
	touchWrite touchFlags = 1 << iota // write the first word of each page (then check the page)
	// touchQuiet blocks Go's preemption signal in the touching thread, which otherwise can
	// interrupt a thread waiting on a fault and make it fault again: the handler then counts the
	// fault twice. Only while an engine serves the area (see eng-touch).
	touchQuiet
)

// touch runs eng-touch over pages [lo, hi) in order from one thread: every byte of every page is
// checked, zeros expected on the pages of zero, the pattern of seed elsewhere. It fails the test
// on any wrong page or signal and returns the reply.
func (v *vm) touch(lo, hi int, seed uint64, zero pageSet, flags touchFlags) puppet.Reply {
	v.t.Helper()
	var quiet int64
	if flags&touchQuiet != 0 {
		quiet = 1
	}
	rep := v.do(puppet.Request{Op: "eng-touch", Off: lo * v.pageSize, Len: (hi - lo) * v.pageSize, Seed: seed, Data: zero,
		Write: flags&touchWrite != 0, Ints: []int64{quiet}})
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		v.t.Fatalf("touch pages [%d, %d): %d pages wrong (first bad byte at area offset %d, page %d), %d signals",
			lo, hi, rep.Mismatch, rep.FirstBad, rep.FirstBad/v.pageSize, rep.Sigbus)
	}
	return rep
}

// serveLogged is serve, and when the test fails it stops the engine and logs Run's error and the
// engine's counters.
func serveLogged(t *testing.T, v *vm, regions []engine.Region, opts engine.Options) (*engine.Engine, func() error) {
	t.Helper()
	e, stop := serve(t, v, regions, opts)
	t.Cleanup(func() {
		if t.Failed() {
			err := stop()
			t.Logf("engine: Run returned %v", err)
			for _, st := range e.Stats() {
				t.Logf("engine: %s", statsLine(st))
			}
		}
	})
	return e, stop
}

// statsLine gives the counters of st without the latency histogram.
func statsLine(st engine.Stats) string {
	return fmt.Sprintf("region %q: %d faults (%d missing, %d wp, %d minor, %d duplicates), pages %d faulted, %d around, %d zero, %d removed, %d retries, %d errors",
		st.Region, st.Faults, st.Missing, st.WP, st.Minor, st.Duplicates, st.PagesFault, st.PagesAround, st.PagesZero, st.PagesRemoved, st.Retries, st.Errors)
}

// patternWord is the first 8 bytes of the pattern of seed at off, as the child reads them.
func patternWord(seed uint64, off int) uint64 {
	var b [8]byte
	puppet.Fill(b[:], seed, off)
	return binary.NativeEndian.Uint64(b[:])
}

// releaseAdvice is how the child gives memory back: MADV_REMOVE punches shared memory,
// MADV_DONTNEED drops private pages.
func releaseAdvice(k memory.Kind) int {
	if k.Shared() {
		return unix.MADV_REMOVE
	}
	return unix.MADV_DONTNEED
}

// waitPending waits until at least n faults are queued on fd, unread.
func waitPending(t testing.TB, fd *uffd.FD, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		in, err := fd.Info()
		if err != nil {
			t.Fatal(err)
		}
		if in.Pending >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d faults pending after 10 s, want %d", in.Pending, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitEventBlocked waits until the child thread that published its id under key (eng-mm) waits
// for the handler to read the event it raised (a non-cooperative event blocks the thread that
// raised it until the handler reads it): its kernel stack shows the wait, or — where the stack
// cannot be read — it sleeps uninterruptibly.
func waitEventBlocked(t testing.TB, v *vm, key int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var tid int64
	for time.Now().Before(deadline) {
		if tid == 0 {
			tid = v.do(puppet.Request{Op: "eng-tid", Ints: []int64{key}}).Ints[0]
		}
		if tid != 0 {
			dir := fmt.Sprintf("/proc/%d/task/%d/", v.p.Pid(), tid)
			if stack, err := os.ReadFile(dir + "stack"); err == nil {
				if strings.Contains(string(stack), "userfaultfd_event_wait_completion") {
					return
				}
			} else {
				b, err := os.ReadFile(dir + "stat")
				if err != nil {
					t.Fatal(err)
				}
				// pid (comm) state ...: the state follows the last ')'.
				if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 0 && f[0] == "D" {
					return
				}
			}
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("thread %d did not block on its event within 10 s", tid)
}

// TestEventRemove: pages released with MADV_DONTNEED / MADV_REMOVE read zeros afterwards and are
// never filled from the source again — not by fault-around, not by the fetchers — while the
// pages around them keep the pattern.
func TestEventRemove(t *testing.T) {
	for _, k := range memory.Kinds {
		for _, srcKind := range []string{"resident", "fetched"} {
			t.Run(k.String()+"/"+srcKind, func(t *testing.T) {
				const seed = 21
				v := newVM(t, k, eventSize(k), uffd.FeatureEventRemove, uffd.ModeMissing)
				n := v.size / v.pageSize
				var src source.Source = patternSource(t, v.size, seed)
				if srcKind == "fetched" {
					src = fetched{src.(*source.Memory)}
				}
				e, stop := serveLogged(t, v, []engine.Region{v.region(src)}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})

				// Fill the first half (fault-around runs past it), then release a range that
				// was filled and one that fault-around may or may not have reached.
				v.touch(0, n/2, seed, nil, 0)
				var zero pageSet
				for _, r := range [][2]int{{n / 4, n / 2}, {5 * n / 8, 3 * n / 4}} {
					v.do(puppet.Request{Op: "release", Off: r[0] * v.pageSize, Len: (r[1] - r[0]) * v.pageSize})
					zero.add(r[0], r[1])
				}
				// Everything in order: the growing window runs into the released ranges.
				rep := v.touch(0, n, seed, zero, 0)
				if got, want := int(rep.Ints[0]), zero.count(); got != want {
					t.Errorf("%d pages read zero, want %d", got, want)
				}
				// Counted when the event is read, which its madvise waits for.
				if st := e.Stats()[0]; st.PagesRemoved != uint64(zero.count()) {
					t.Errorf("PagesRemoved = %d, want %d", st.PagesRemoved, zero.count())
				}

				// Release part of the zero-filled range again and a filled range: zeros still,
				// never the source.
				v.do(puppet.Request{Op: "release", Off: n / 4 * v.pageSize, Len: n / 8 * v.pageSize})
				v.do(puppet.Request{Op: "release", Off: 7 * n / 8 * v.pageSize, Len: n / 16 * v.pageSize})
				zero.add(7*n/8, 7*n/8+n/16)
				v.touch(0, n, seed, zero, 0)
				// The rest of the bookkeeping may trail the wake-up the child saw: look once the
				// engine has stopped.
				if err := stop(); err != nil {
					t.Fatalf("Run: %v", err)
				}
				st := e.Stats()[0]
				released := uint64(zero.count() + n/8) // [n/4, 3n/4) went twice
				if st.PagesRemoved != released || st.PagesZero != released {
					t.Errorf("PagesRemoved = %d, PagesZero = %d, want %d and %d: every released page is served zeros once after each release",
						st.PagesRemoved, st.PagesZero, released, released)
				}
				if got := e.Installed()["mem"]; got != n {
					t.Errorf("%d pages installed, want %d", got, n)
				}
			})
		}
	}
}

// TestEventRemoveQueuedBeforeFault: faults read in the same batch as a later REMOVE of their
// page must get zeros, not source data, and fault-around for a fault next to the removed range
// must stop at it — the engine applies a batch's events before its faults.
func TestEventRemoveQueuedBeforeFault(t *testing.T) {
	for _, k := range memory.Kinds {
		t.Run(k.String(), func(t *testing.T) {
			const seed = 22
			v := newVM(t, k, eventSize(k), uffd.FeatureEventRemove, uffd.ModeMissing)
			n := v.size / v.pageSize
			p := n / 2
			var zero pageSet
			zero.add(p, p+4)

			// Before any handler runs: a fault next to the range, one in it, then the release of
			// [p, p+4), whose caller blocks until its REMOVE is read.
			before := v.start(puppet.Request{Op: "eng-touch", Off: (p - 1) * v.pageSize, Len: v.pageSize, Seed: seed})
			waitPending(t, v.fd, 1)
			inside := v.start(puppet.Request{Op: "eng-touch", Off: p * v.pageSize, Len: v.pageSize, Seed: seed, Data: zero})
			waitPending(t, v.fd, 2)
			release := v.start(puppet.Request{Op: "eng-mm", Ints: []int64{int64(p * v.pageSize), int64(4 * v.pageSize), int64(releaseAdvice(k)), 1}})
			waitEventBlocked(t, v, 1)

			e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))}, engine.Options{FaultAround: engine.FaultAround{Max: 64}})
			for name, c := range map[string]*puppet.Call{"fault before the range": before, "fault in the range": inside, "release": release} {
				rep, _, err := c.Wait(30 * time.Second)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				if rep.Mismatch != 0 || rep.Sigbus != 0 {
					t.Errorf("%s: read wrong data (first bad byte at %d), %d signals", name, rep.FirstBad, rep.Sigbus)
				}
			}
			v.touch(0, n, seed, zero, 0)
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			// A zero page installed for a fault in the gap between the REMOVE being read and the
			// kernel's zap is zapped too; the next fault on it installs it again (counted as a
			// duplicate first). So PagesZero is 4 plus at most one per duplicate.
			if st := e.Stats()[0]; st.PagesRemoved != 4 || st.PagesZero < 4 || st.PagesZero > 4+st.Duplicates {
				t.Errorf("PagesRemoved = %d, PagesZero = %d (duplicates %d), want 4 and 4..4+duplicates", st.PagesRemoved, st.PagesZero, st.Duplicates)
			}
		})
	}
}

// TestEventUnmap: the child unmaps the middle of the area — once with a fault on it queued in the
// same batch as the UNMAP — and the engine drops that range and keeps serving the rest.
func TestEventUnmap(t *testing.T) {
	for _, k := range memory.Kinds {
		t.Run(k.String(), func(t *testing.T) {
			const seed = 23
			v := newVM(t, k, eventSize(k), uffd.FeatureEventUnmap, uffd.ModeMissing)
			n := v.size / v.pageSize
			lo, hi := n/4, n/2

			// A fault in the range to be unmapped, then the munmap, before the engine runs.
			// munmap removes the range before it sends UNMAP, so the engine wakes the thread
			// onto an address it no longer maps, and the retried load usually takes SIGSEGV.
			// But the child's Go runtime maps memory of its own (stacks, heap) and the hole
			// is a fit: if it mapped something there meanwhile, the load reads that instead.
			// Both are legitimate; what must hold is that the fault ends (no hang), with at
			// most one signal, without the source's bytes, and the engine does not fail.
			gone := v.start(puppet.Request{Op: "eng-touch", Off: (lo + 1) * v.pageSize, Len: v.pageSize, Seed: seed})
			waitPending(t, v.fd, 1)
			unmap := v.start(puppet.Request{Op: "eng-mm", Ints: []int64{int64(lo * v.pageSize), int64((hi - lo) * v.pageSize), puppet.EngMunmap, 1}})
			waitEventBlocked(t, v, 1)

			e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})
			if _, _, err := unmap.Wait(30 * time.Second); err != nil {
				t.Fatal(err)
			}
			rep, _, err := gone.Wait(30 * time.Second)
			if err != nil {
				t.Fatalf("the fault on the page being unmapped did not end: %v", err)
			}
			switch {
			case rep.Sigbus > 1:
				t.Errorf("the fault on the unmapped page took %d signals, want at most 1 SIGSEGV", rep.Sigbus)
			case rep.Sigbus == 0 && rep.Mismatch == 0:
				t.Errorf("the unmapped page read the source's bytes: it was served after the UNMAP")
			}
			t.Logf("fault on the page being unmapped ended with %d SIGSEGV (none: the child mapped memory there meanwhile)", rep.Sigbus)
			// The rest, in order: windows grow toward the hole and must stop at it.
			v.touch(0, lo, seed, nil, 0)
			v.touch(hi, n, seed, nil, 0)

			// An unmap while the engine runs: the tail goes, the pages before it stay served.
			v.do(puppet.Request{Op: "munmap", Off: 7 * n / 8 * v.pageSize, Len: n / 8 * v.pageSize})
			v.touch(0, lo, seed, nil, 0)
			v.touch(hi, 7*n/8, seed, nil, 0)
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			if got, want := e.Installed()["mem"], n-(hi-lo)-n/8; got != want {
				t.Errorf("%d pages installed, want %d", got, want)
			}
			if st := e.Stats()[0]; st.PagesZero != 0 || st.Errors != 0 {
				t.Errorf("PagesZero = %d, Errors = %d: the pages left must be served from the source", st.PagesZero, st.Errors)
			}
		})
	}
}

// TestEventRemap: the child mremaps the whole area; the engine follows it, and faults at the new
// address are served from the offsets of the old one (the pattern check catches a wrong offset).
func TestEventRemap(t *testing.T) {
	for _, k := range memory.Kinds {
		for _, feat := range []uffd.Feature{uffd.FeatureEventRemap, uffd.FeatureEventRemap | uffd.FeatureEventUnmap} {
			name := k.String() + "/remap"
			if feat&uffd.FeatureEventUnmap != 0 {
				name += "+unmap"
			}
			t.Run(name, func(t *testing.T) {
				const seed = 24
				v := newVM(t, k, eventSize(k), feat, uffd.ModeMissing)
				n := v.size / v.pageSize
				e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 8, Adaptive: true}})

				v.touch(0, n/2, seed, nil, 0)
				at := v.addr
				for range 2 {
					to := uintptr(v.do(puppet.Request{Op: "eng-mremap"}).Addr)
					if to == at {
						t.Fatalf("mremap left the area at %#x", at)
					}
					at = to
					// Pages filled before the move moved with it; the rest fault at the new
					// address, in random order so windows start everywhere.
					rep := v.do(puppet.Request{Op: "eng-touch", Seed: seed, Order: "rand", Threads: 2})
					if rep.Mismatch != 0 || rep.Sigbus != 0 {
						t.Fatalf("after mremap to %#x: %d pages wrong (first bad byte %d), %d signals", at, rep.Mismatch, rep.FirstBad, rep.Sigbus)
					}
				}
				if err := stop(); err != nil {
					t.Fatalf("Run: %v", err)
				}
				st := e.Stats()[0]
				if got := st.Pages(); got != uint64(n) {
					t.Errorf("installed %d pages in all, want %d: each exactly once (%s)", got, n, statsLine(st))
				}
				if st.PagesZero != 0 || st.PagesRemoved != 0 {
					t.Errorf("PagesZero = %d, PagesRemoved = %d, want 0: the move is no release", st.PagesZero, st.PagesRemoved)
				}
			})
		}
	}
}

// TestEventFork: the child forks; the forked process reads every page. The engine gets the FORK
// event and serves the new userfaultfd with the parent's state: pages the parent had filled are
// not faulted again, pages it had released read zeros (never the source), the others come from
// the source.
func TestEventFork(t *testing.T) {
	for _, k := range memory.Kinds {
		t.Run(k.String(), func(t *testing.T) {
			const seed = 25
			v := newVM(t, k, eventSize(k), uffd.FeatureEventFork|uffd.FeatureEventRemove, uffd.ModeMissing)
			n := v.size / v.pageSize
			forked := make(chan *engine.Engine, 4)
			e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))},
				engine.Options{FaultAround: engine.FaultAround{Max: 4}, OnFork: func(c *engine.Engine) { forked <- c }})

			// Fill the first half (windows of 4 pages end exactly there), then release a filled
			// range and one never filled.
			v.touch(0, n/2, seed, nil, 0)
			var zero pageSet
			for _, r := range [][2]int{{n / 4, 3 * n / 8}, {3 * n / 4, 7 * n / 8}} {
				v.do(puppet.Request{Op: "release", Off: r[0] * v.pageSize, Len: (r[1] - r[0]) * v.pageSize})
				zero.add(r[0], r[1])
			}
			filled := n/2 - n/8
			parentFaults := e.Stats()[0].Faults // counted before the fault is resolved

			rep := v.do(puppet.Request{Op: "fork", Len: v.size, Stride: v.pageSize})
			// One worker resolved every fault before it read the FORK event and cloned its state.
			if got := e.Installed()["mem"]; got != filled {
				t.Errorf("%d pages installed at the fork, want %d", got, filled)
			}
			if ws := unix.WaitStatus(rep.Status); !ws.Exited() || ws.ExitStatus() != 0 {
				t.Fatalf("forked child: wait status %#x (signal %v)", rep.Status, ws.Signal())
			}
			var c *engine.Engine
			select {
			case c = <-forked:
			default:
				t.Fatal("OnFork was not called")
			}
			sum, count := binary.NativeEndian.Uint64(rep.Data), binary.NativeEndian.Uint64(rep.Data[8:])
			var want uint64
			for p := range n {
				if !zero.has(p) {
					want += patternWord(seed, p*v.pageSize)
				}
			}
			if count != uint64(n) || sum != want {
				t.Errorf("forked child read %d pages summing to %#x, want %d pages summing to %#x", count, sum, n, want)
			}
			if got := e.Stats()[0].Faults; got != parentFaults {
				t.Errorf("the parent's engine saw %d faults during the fork, want 0: the child's go to its own fd", got-parentFaults)
			}
			// The parent still reads its memory, served by its own engine (shared memory the
			// child's engine filled needs no fault).
			v.touch(0, n, seed, zero, 0)
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			select {
			case <-c.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the forked child's engine still runs after the parent's stopped")
			}
			cs := c.Stats()[0]
			if got := cs.Pages(); got != uint64(n-filled) {
				t.Errorf("the forked child's engine installed %d pages, want %d: the %d the parent had must not fault again (%s)", got, n-filled, filled, statsLine(cs))
			}
			if cs.PagesZero != uint64(zero.count()) || cs.Duplicates != 0 {
				t.Errorf("forked child's engine: %d zero pages and %d duplicates, want %d and 0", cs.PagesZero, cs.Duplicates, zero.count())
			}
		})
	}
}

// TestEventWriteProtect: with MISSING|WP registered, pages the test write-protects after they were
// filled fault on the child's writes; the engine unprotects them and reports exactly those pages
// dirty.
func TestEventWriteProtect(t *testing.T) {
	for _, k := range memory.Kinds {
		t.Run(k.String(), func(t *testing.T) {
			const seed = 26
			v := newVM(t, k, eventSize(k), 0, uffd.ModeMissing|uffd.ModeWP)
			n := v.size / v.pageSize
			// The engine owns v.fd; protect pages through a second descriptor of the same
			// userfaultfd.
			dup, err := unix.Dup(v.fd.Fd())
			if err != nil {
				t.Fatal(err)
			}
			wfd, err := uffd.NewFD(dup, false)
			if err != nil {
				unix.Close(dup)
				t.Fatal(err)
			}
			t.Cleanup(func() { wfd.Close() })
			e, stop := serveLogged(t, v, []engine.Region{v.region(patternSource(t, v.size, seed))}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})

			v.touch(0, n, seed, nil, 0)
			var protected []int
			for p := range n {
				if p%3 == 0 || p >= n/2 && p < n/2+n/8 {
					protected = append(protected, p)
				}
			}
			for _, p := range protected {
				if err := wfd.Writeprotect(v.addr+uintptr(p*v.pageSize), uintptr(v.pageSize), uffd.WriteprotectWP); err != nil {
					t.Fatal(err)
				}
			}
			before := e.Stats()[0]
			v.touch(0, n, seed, nil, touchWrite|touchQuiet)
			after := e.Stats()[0]
			if got := e.Dirty("mem"); !slices.Equal(got, protected) {
				t.Errorf("Dirty = %v, want %v", got, protected)
			}
			if got := after.WP - before.WP; got != uint64(len(protected)) {
				t.Errorf("%d WP faults, want %d", got, len(protected))
			}
			if after.Missing != before.Missing {
				t.Errorf("%d MISSING faults on filled pages", after.Missing-before.Missing)
			}
			// Unprotected now: writing again faults nowhere.
			v.touch(0, n, seed, nil, touchWrite|touchQuiet)
			if again := e.Stats()[0]; again.Faults != after.Faults {
				t.Errorf("%d faults writing unprotected pages", again.Faults-after.Faults)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
		})
	}
}

// TestEventMinor: the child fills the page cache behind a file-backed area through a second
// mapping; reads of the registered mapping raise MINOR faults, which the engine resolves with
// CONTINUE, once per page.
func TestEventMinor(t *testing.T) {
	for _, k := range memory.Kinds {
		if !k.FileBacked() {
			continue
		}
		t.Run(k.String(), func(t *testing.T) {
			const seed = 27
			v := newVM(t, k, eventSize(k), 0, uffd.ModeMinor)
			n := v.size / v.pageSize
			v.do(puppet.Request{Op: "eng-fill-file", Seed: seed})
			// The source is never read for MINOR faults: serve an all-zero image to prove it.
			e, stop := serveLogged(t, v, []engine.Region{v.region(source.NewZero(int64(v.size)))}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}})
			v.touch(0, n, seed, nil, touchQuiet)
			st := e.Stats()[0]
			if st.Minor != uint64(n) || st.Faults != uint64(n) {
				t.Errorf("%d MINOR faults of %d, want %d of %d", st.Minor, st.Faults, n, n)
			}
			if st.Missing != 0 || st.PagesZero != 0 || st.Bytes != 0 {
				t.Errorf("Missing = %d, PagesZero = %d, Bytes = %d, want 0: nothing comes from the source", st.Missing, st.PagesZero, st.Bytes)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
		})
	}
}
