//go:build linux

package uffd_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// The non-cooperative event scenarios of the kernel selftests (uffd-unit-tests "events" and
// "events-wp"): a puppet registers memory, forks, moves, releases
// and unmaps it while this process serves its faults and reads the events.

// evServer is the fault server of the event, fork and SIGBUS tests. It serves one userfaultfd:
// MISSING faults by COPY from src at the fault's offset from base — or with zeros (ZEROPAGE; COPY
// of zeros on hugetlb, which has no ZEROPAGE) inside ranges a REMOVE event emptied — and WP faults
// by unprotecting the page. It follows REMAP events by moving base, hands FORK events to onFork
// and logs every message it reads, in order.
type evServer struct {
	t        testing.TB
	fd       *uffd.FD
	ownsFD   bool // close fd on stop (a child's fd from a FORK event)
	huge     bool
	ps       uintptr
	src      []byte // pattern, indexed by offset from base
	zeros    []byte // one page of zeros, for hugetlb
	copyMode uffd.CopyMode
	// onFork receives the fd number of a FORK event; it runs on the server goroutine. nil:
	// close the fd.
	onFork func(fd int) error

	mu      sync.Mutex
	base    uintptr
	removed []uffd.Range
	exist   map[uintptr]int // EEXIST answers per page
	log     []uffd.Msg
	errs    []error

	stopped atomic.Bool
	started bool
	done    chan struct{}
}

func newEvServer(t testing.TB, fd *uffd.FD, k memory.Kind, base uintptr, src []byte) *evServer {
	ps, err := memory.PageSize(k)
	if err != nil {
		t.Fatal(err)
	}
	s := &evServer{t: t, fd: fd, huge: k.Huge(), ps: uintptr(ps), src: src, base: base, done: make(chan struct{})}
	if s.huge {
		s.zeros = source(t, ps, 0)
		clear(s.zeros)
	}
	return s
}

// start runs the server goroutine; stop (also run at cleanup) ends it.
func (s *evServer) start() {
	s.started = true
	s.t.Cleanup(s.stop)
	go s.serve()
}

func (s *evServer) fail(err error) {
	s.mu.Lock()
	s.errs = append(s.errs, err)
	s.mu.Unlock()
}

// stop ends the server and reports the errors it met. It is idempotent.
func (s *evServer) stop() {
	if s.stopped.Swap(true) || !s.started {
		return
	}
	s.fd.SetReadDeadline(time.Now())
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		s.t.Errorf("fault server did not stop")
	}
	s.fd.SetReadDeadline(time.Time{})
	if s.ownsFD {
		s.fd.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, err := range s.errs {
		s.t.Errorf("fault server: %v", err)
	}
	s.errs = nil
}

func (s *evServer) serve() {
	defer close(s.done)
	rd, err := s.fd.NewReader()
	if err != nil {
		s.fail(err)
		return
	}
	msgs := make([]uffd.Msg, 16)
	var deferred []uffd.Pagefault
	var since time.Time
	for !s.stopped.Load() {
		var n int
		if len(deferred) == 0 {
			n, err = rd.Read(msgs)
		} else {
			// Faults wait for an event to finish (EAGAIN, which lasts until the thread that
			// raised the event runs again, a while after the event is read): look for new
			// messages without blocking, then retry them.
			n, err = rd.TryRead(msgs)
		}
		if err != nil {
			if !errors.Is(err, uffd.ErrClosed) && !errors.Is(err, os.ErrDeadlineExceeded) {
				s.fail(err)
			}
			return
		}
		var again []uffd.Pagefault
		for _, pf := range deferred {
			if s.resolve(pf) {
				again = append(again, pf)
			}
		}
		for i := range msgs[:n] {
			m := &msgs[i]
			s.mu.Lock()
			s.log = append(s.log, *m)
			s.mu.Unlock()
			if err := m.Check(); err != nil {
				s.fail(err)
			}
			if m.Event() == uffd.EventPagefault {
				if pf := m.Pagefault(); s.resolve(pf) {
					again = append(again, pf)
				}
				continue
			}
			s.event(m)
		}
		switch {
		case len(again) == 0:
			since = time.Time{}
		case since.IsZero():
			since = time.Now()
		case time.Since(since) > 10*time.Second:
			s.fail(fmt.Errorf("faults %v still refused with EAGAIN after 10 s", again))
			return
		default:
			time.Sleep(100 * time.Microsecond)
		}
		deferred = again
	}
}

func (s *evServer) event(m *uffd.Msg) {
	switch m.Event() {
	case uffd.EventFork:
		if s.onFork == nil {
			unix.Close(m.ForkFD())
			return
		}
		if err := s.onFork(m.ForkFD()); err != nil {
			s.fail(err)
		}
	case uffd.EventRemap:
		rm := m.Remap()
		s.mu.Lock()
		if rm.From == s.base {
			s.base = rm.To
		}
		for i, r := range s.removed {
			if r.Start >= rm.From && r.End <= rm.From+rm.Len {
				s.removed[i] = uffd.Range{Start: r.Start - rm.From + rm.To, End: r.End - rm.From + rm.To}
			}
		}
		s.mu.Unlock()
	case uffd.EventRemove:
		s.mu.Lock()
		s.removed = append(s.removed, m.Range())
		s.mu.Unlock()
	case uffd.EventUnmap:
		// Nothing is served there any more; the log keeps the event for the test.
	default:
		s.fail(fmt.Errorf("unexpected event %v", m))
	}
}

// resolve answers one fault; it reports whether to retry it later (events in flight).
func (s *evServer) resolve(pf uffd.Pagefault) (retry bool) {
	addr := pf.Address &^ (s.ps - 1)
	var err error
	if pf.Flags&uffd.FaultWP != 0 {
		err = s.fd.Writeprotect(addr, s.ps, 0)
	} else {
		s.mu.Lock()
		base := s.base
		zero := false
		for _, r := range s.removed {
			if addr >= r.Start && addr < r.End {
				zero = true
			}
		}
		s.mu.Unlock()
		if addr < base || addr+s.ps > base+uintptr(len(s.src)) {
			s.fail(fmt.Errorf("fault at %#x outside the served area [%#x, %#x)", pf.Address, base, base+uintptr(len(s.src))))
			s.fd.Wake(addr, s.ps)
			return false
		}
		switch {
		case zero && !s.huge:
			_, err = s.fd.Zeropage(addr, s.ps, 0)
		case zero:
			_, err = s.fd.Copy(addr, addrOf(s.zeros), s.ps, s.copyMode)
		default:
			_, err = s.fd.Copy(addr, addrOf(s.src)+addr-base, s.ps, s.copyMode)
		}
	}
	switch {
	case err == nil:
		return false
	case errors.Is(err, uffd.ErrEventsPending):
		return true
	case errors.Is(err, uffd.ErrExist):
		// Resolved already (a duplicate message after a signal): wake and move on. Bounded:
		// COPY into hugetlb memory mapped MAP_NORESERVE answers EEXIST forever when the
		// pool is empty.
		s.mu.Lock()
		if s.exist == nil {
			s.exist = map[uintptr]int{}
		}
		s.exist[addr]++
		n := s.exist[addr]
		s.mu.Unlock()
		if n == 1000 {
			h, _ := memory.ReadHugePages()
			s.fail(fmt.Errorf("fault %#x flags %v: COPY answered EEXIST %d times (hugepages free %d of %d); giving up on the page",
				pf.Address, pf.Flags, n, h.Free, h.Total))
		}
		if n >= 1000 {
			return false
		}
		err = s.fd.Wake(addr, s.ps)
	}
	if err != nil {
		s.fail(err)
	}
	return false
}

// mark is the current length of the message log, to look at what came after it.
func (s *evServer) mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.log)
}

// since returns the messages logged after mark.
func (s *evServer) since(mark int) []uffd.Msg {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]uffd.Msg(nil), s.log[mark:]...)
}

// events waits until at least n events were logged after mark and returns the events logged
// after mark. The kernel lets the thread that caused an event go on as soon as the event is read,
// which may be just before the server logs it.
func (s *evServer) events(mark, n int) []uffd.Msg {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ev := evEvents(s.since(mark))
		if len(ev) >= n || time.Now().After(deadline) {
			return ev
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// evEvents returns the non-page-fault messages of msgs.
func evEvents(msgs []uffd.Msg) []uffd.Msg {
	var out []uffd.Msg
	for _, m := range msgs {
		if m.Event() != uffd.EventPagefault {
			out = append(out, m)
		}
	}
	return out
}

// evFaultPages returns the distinct pages (aligned to ps) of the page-fault messages of msgs
// whose flags, masked with mask, equal want; duplicates (a thread interrupted by a signal faults
// again) count once.
func evFaultPages(msgs []uffd.Msg, ps uintptr, mask, want uffd.FaultFlags) map[uintptr]bool {
	out := map[uintptr]bool{}
	for _, m := range msgs {
		if m.Event() != uffd.EventPagefault {
			continue
		}
		if pf := m.Pagefault(); pf.Flags&mask == want {
			out[pf.Address&^(ps-1)] = true
		}
	}
	return out
}

// evPagesIn checks that pages holds exactly the n pages from start.
func evPagesIn(t testing.TB, what string, pages map[uintptr]bool, start, ps uintptr, n int) {
	t.Helper()
	if len(pages) != n {
		t.Errorf("%s: faults on %d distinct pages, want %d", what, len(pages), n)
	}
	for p := range pages {
		if p < start || p >= start+uintptr(n)*ps {
			t.Errorf("%s: fault on %#x, outside [%#x, %#x)", what, p, start, start+uintptr(n)*ps)
		}
	}
}

// evPatternSum is what the puppet's forked child sums: the first 8 bytes of every page of
// [off, off+n) of the pattern src.
func evPatternSum(src []byte, off, n, ps int) (sum, count uint64) {
	for p := off; p < off+n; p += ps {
		sum += binary.NativeEndian.Uint64(src[p:])
		count++
	}
	return sum, count
}

// evForkResult decodes the reply of the puppet's "fork": the wait status, the pagemap entry
// the forked child saw and its sum and count.
func evForkResult(t testing.TB, rep puppet.Reply) (ws unix.WaitStatus, pm, sum, count uint64) {
	t.Helper()
	if len(rep.Data) != 16 || len(rep.Pagemap) != 1 {
		t.Fatalf("fork reply: %d data bytes, %d pagemap entries", len(rep.Data), len(rep.Pagemap))
	}
	return unix.WaitStatus(rep.Status), rep.Pagemap[0],
		binary.NativeEndian.Uint64(rep.Data[:8]), binary.NativeEndian.Uint64(rep.Data[8:])
}

// evPageSize is the page size of kind k.
func evPageSize(t testing.TB, k memory.Kind) int {
	t.Helper()
	ps, err := memory.PageSize(k)
	if err != nil {
		requireKernel(t, err.Error())
	}
	return ps
}

// evWaitFor polls cond until it holds or timeout passes.
func evWaitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// evTaskInState reports whether a thread of pid is in the given scheduler state ("D": waiting,
// uninterruptibly, e.g. for its event to be read).
func evTaskInState(pid int, state string) bool {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i >= 0 {
			if f := strings.Fields(s[i+1:]); len(f) > 0 && f[0] == state {
				return true
			}
		}
	}
	return false
}

// TestEvents is the selftest "events" scenario (test 16).
func TestEvents(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) { eventsScenario(t, k, false) })
}

// TestEventsWP is the selftest "events-wp" scenario (test 17): the same with MISSING|WP
// registration, pages installed write-protected, and WP faults resolved by unprotecting.
func TestEventsWP(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) { eventsScenario(t, k, true) })
}

func eventsScenario(t *testing.T, k memory.Kind, wp bool) {
	const seed = 16
	ps := evPageSize(t, k)
	pages := 32
	if k.Huge() {
		pages = 8
	}
	size := pages * ps
	half, quarter := pages/2, pages/4
	mode := uffd.ModeMissing
	var copyMode uffd.CopyMode
	if wp {
		mode |= uffd.ModeWP
		copyMode = uffd.CopyWP
	}
	r := newRemote(t, remoteOpts{kind: k, size: size, mode: mode,
		features: uffd.FeatureEventFork | uffd.FeatureEventRemap | uffd.FeatureEventRemove | uffd.FeatureEventUnmap})
	src := source(t, size, seed)
	s := newEvServer(t, r.fd, k, r.addr, src)
	s.copyMode = copyMode
	forks := make(chan *evServer, 1)
	s.onFork = func(fd int) error {
		f, err := uffd.NewFD(fd, false)
		if err != nil {
			unix.Close(fd)
			return err
		}
		// The forked child has the parent's layout: its area is where the parent's is now.
		s.mu.Lock()
		base := s.base
		s.mu.Unlock()
		cs := newEvServer(t, f, k, base, src)
		cs.copyMode, cs.ownsFD = copyMode, true
		cs.start()
		select {
		case forks <- cs:
			return nil
		default:
			return errors.New("more than one FORK event")
		}
	}
	// The handler must run before the fork: fork() blocks until the FORK event is read.
	s.start()

	// 1. fork: the forked child reads the first half; its faults come on the child's new
	// userfaultfd and are served by COPY from this process's buffer into the child.
	mark := s.mark()
	rep := r.do(puppet.Request{Op: "fork", Off: 0, Len: half * ps})
	ws, _, sum, count := evForkResult(t, rep)
	wantSum, wantCount := evPatternSum(src, 0, half*ps, ps)
	if !ws.Exited() || ws.ExitStatus() != 0 {
		t.Fatalf("forked child: wait status %#x, want exit 0", int(ws))
	}
	if sum != wantSum || count != wantCount {
		t.Fatalf("forked child read sum %#x over %d pages, want %#x over %d", sum, count, wantSum, wantCount)
	}
	var cs *evServer
	select {
	case cs = <-forks:
	case <-time.After(10 * time.Second):
		t.Fatal("no FORK event")
	}
	cs.stop()
	childMsgs := cs.since(0)
	if ev := evEvents(childMsgs); len(ev) != 0 {
		t.Errorf("child's userfaultfd delivered events %v, want none", ev)
	}
	// The forked child is one thread without signals: exactly one MISSING read fault per page.
	if got := len(childMsgs); got != half {
		t.Errorf("child's userfaultfd delivered %d faults, want %d", got, half)
	}
	evPagesIn(t, "forked child", evFaultPages(childMsgs, s.ps, uffd.FaultWP|uffd.FaultWrite, 0), r.addr, s.ps, half)
	if ev := s.events(mark, 1); len(ev) != 1 || ev[0].Event() != uffd.EventFork {
		t.Fatalf("parent's userfaultfd delivered events %v, want one FORK", ev)
	}
	if pf := evFaultPages(s.since(mark), s.ps, 0, 0); len(pf) != 0 {
		t.Fatalf("parent's userfaultfd delivered faults on %d pages during the fork, want none", len(pf))
	}

	// 2. The parent reads the first half. Shared memory got its pages from the child's COPY (the
	// page cache is shared): no faults; private memory faults every page.
	mark = s.mark()
	rep = r.do(puppet.Request{Op: "touch", Off: 0, Len: half * ps, Verify: "pattern", Seed: seed})
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("first half: %d wrong pages (first bad byte at %d), %d SIGBUS", rep.Mismatch, rep.FirstBad, rep.Sigbus)
	}
	firstHalf := evFaultPages(s.since(mark), s.ps, uffd.FaultWP, 0)
	if k.Shared() {
		evPagesIn(t, "first half (shared: filled by the child's COPY)", firstHalf, r.addr, s.ps, 0)
	} else {
		evPagesIn(t, "first half", firstHalf, r.addr, s.ps, half)
	}

	// 3. mremap → REMAP{from, to, len}; the server retargets its base.
	mark = s.mark()
	rep = r.do(puppet.Request{Op: "mremap"})
	from, to := r.addr, uintptr(rep.Addr)
	ev := s.events(mark, 2)
	if len(ev) == 0 || ev[0].Event() != uffd.EventRemap {
		t.Fatalf("mremap: events %v, want REMAP first", ev)
	}
	if got, want := ev[0].Remap(), (uffd.Remap{From: from, To: to, Len: uintptr(size)}); got != want {
		t.Fatalf("REMAP %+v, want %+v", got, want)
	}
	// With EVENT_UNMAP the old range is also reported unmapped, after the REMAP.
	if len(ev) != 2 || ev[1].Event() != uffd.EventUnmap || ev[1].Range() != (uffd.Range{Start: from, End: from + uintptr(size)}) {
		t.Fatalf("mremap: events %v, want REMAP then UNMAP [%#x, %#x)", ev, from, from+uintptr(size))
	}

	// 4. The second half faults at the new address and is served there.
	mark = s.mark()
	rep = r.do(puppet.Request{Op: "touch", Off: half * ps, Len: half * ps, Verify: "pattern", Seed: seed})
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("second half after mremap: %d wrong pages (first bad byte at %d), %d SIGBUS", rep.Mismatch, rep.FirstBad, rep.Sigbus)
	}
	evPagesIn(t, "second half after mremap", evFaultPages(s.since(mark), s.ps, uffd.FaultWP, 0), to+uintptr(half*ps), s.ps, half)

	if wp {
		// 4b. Protect everything; every write raises a WP fault that the server unprotects.
		if err := r.fd.Writeprotect(to, uintptr(size), uffd.WriteprotectWP); err != nil {
			t.Fatal(err)
		}
		mark = s.mark()
		rep = r.do(puppet.Request{Op: "touch", Write: true})
		if rep.Sigbus != 0 {
			t.Fatalf("writes: %d SIGBUS", rep.Sigbus)
		}
		wpPages := evFaultPages(s.since(mark), s.ps, uffd.FaultWP|uffd.FaultWrite, uffd.FaultWP|uffd.FaultWrite)
		evPagesIn(t, "WP faults", wpPages, to, s.ps, pages)
		if missing := evFaultPages(s.since(mark), s.ps, uffd.FaultWP, 0); len(missing) != 0 {
			t.Errorf("writes to present pages raised %d MISSING faults", len(missing))
		}
		// The write landed: the first word of a page is its offset, the rest is the pattern.
		off := 3 * ps
		rep = r.do(puppet.Request{Op: "read", Off: off, Len: 64})
		want := append(binary.NativeEndian.AppendUint64(nil, uint64(off)), src[off+8:off+64]...)
		if string(rep.Data) != string(want) {
			t.Fatalf("page 3 after the write: % x, want % x", rep.Data, want)
		}
	}

	// 5. release → REMOVE of the released range; later faults there are answered with zeros.
	mark = s.mark()
	r.do(puppet.Request{Op: "release", Off: 0, Len: quarter * ps})
	ev = s.events(mark, 1)
	wantRemove := uffd.Range{Start: to, End: to + uintptr(quarter*ps)}
	if len(ev) != 1 || ev[0].Event() != uffd.EventRemove || ev[0].Range() != wantRemove {
		t.Fatalf("release: events %v, want REMOVE [%#x, %#x)", ev, wantRemove.Start, wantRemove.End)
	}
	mark = s.mark()
	rep = r.do(puppet.Request{Op: "touch", Off: 0, Len: quarter * ps, Verify: "zero"})
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("released range: %d non-zero pages (first bad byte at %d), %d SIGBUS", rep.Mismatch, rep.FirstBad, rep.Sigbus)
	}
	evPagesIn(t, "released range", evFaultPages(s.since(mark), s.ps, uffd.FaultWP, 0), to, s.ps, quarter)
	// The rest of the area kept its contents.
	rep = r.do(puppet.Request{Op: "read", Off: quarter*ps + 8, Len: 64})
	if string(rep.Data) != string(src[quarter*ps+8:quarter*ps+72]) {
		t.Fatalf("page %d after the release: % x, want the pattern", quarter, rep.Data)
	}

	// 6. munmap → UNMAP with the munmap range.
	mark = s.mark()
	off := (pages - 2) * ps
	r.do(puppet.Request{Op: "munmap", Off: off, Len: 2 * ps})
	ev = s.events(mark, 1)
	wantUnmap := uffd.Range{Start: to + uintptr(off), End: to + uintptr(size)}
	if len(ev) != 1 || ev[0].Event() != uffd.EventUnmap || ev[0].Range() != wantUnmap {
		t.Fatalf("munmap: events %v, want UNMAP [%#x, %#x)", ev, wantUnmap.Start, wantUnmap.End)
	}
	s.stop()
}

// TestEventsFaultsBeforeEvents pins the delivery order: read(2) returns pending faults before
// events, so a fault queued after an unread REMOVE event is still read first.
func TestEventsFaultsBeforeEvents(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		const seed = 19
		ps := evPageSize(t, k)
		r := newRemote(t, remoteOpts{kind: k, size: 4 * ps, mode: uffd.ModeMissing, features: uffd.FeatureEventRemove})
		src := source(t, 4*ps, seed)
		rd, err := r.fd.NewReader()
		if err != nil {
			t.Fatal(err)
		}
		// The event first: madvise blocks (state D) until the REMOVE is read.
		release := r.start(puppet.Request{Op: "release", Off: 3 * ps, Len: ps})
		evWaitFor(t, "the releasing thread to block on its event", 10*time.Second, func() bool { return evTaskInState(r.pid, "D") })
		// Then a fault.
		touch := r.start(puppet.Request{Op: "touch", Off: 0, Len: ps, Verify: "pattern", Seed: seed})
		evWaitFor(t, "the fault to be pending", 10*time.Second, func() bool {
			in, err := r.fd.Info()
			return err == nil && in.Pending >= 1
		})
		msgs := make([]uffd.Msg, 8)
		n, err := rd.TryRead(msgs)
		if err != nil {
			t.Fatal(err)
		}
		// Faults first (a signal to the faulting thread may have added a duplicate), then the event.
		if n < 2 {
			t.Fatalf("read %d messages, want a fault and the REMOVE", n)
		}
		for i, m := range msgs[:n-1] {
			if m.Event() != uffd.EventPagefault || m.Pagefault().Address != r.addr {
				t.Fatalf("message %d of %d is %v, want a fault at %#x", i, n, &m, r.addr)
			}
		}
		last := msgs[n-1]
		if want := (uffd.Range{Start: r.addr + uintptr(3*ps), End: r.addr + uintptr(4*ps)}); last.Event() != uffd.EventRemove || last.Range() != want {
			t.Fatalf("last message %v, want REMOVE [%#x, %#x)", &last, want.Start, want.End)
		}
		// Resolve the fault; COPY refuses with EAGAIN until the madvise has finished.
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, err := r.fd.Copy(r.addr, addrOf(src), uintptr(ps), 0)
			if err == nil || errors.Is(err, uffd.ErrExist) {
				break
			}
			if !errors.Is(err, uffd.ErrEventsPending) || time.Now().After(deadline) {
				t.Fatalf("COPY after reading the event: %v", err)
			}
			time.Sleep(100 * time.Microsecond)
		}
		r.fd.Wake(r.addr, uintptr(ps))
		if _, _, err := release.Wait(10 * time.Second); err != nil {
			t.Fatal(err)
		}
		rep, _, err := touch.Wait(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Mismatch != 0 || rep.Sigbus != 0 {
			t.Fatalf("touch: %d wrong pages, %d SIGBUS", rep.Mismatch, rep.Sigbus)
		}
	})
}
