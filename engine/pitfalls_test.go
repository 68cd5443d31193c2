//go:build linux

package engine_test

// Kernel behaviours (seen on Linux 6.18) that break a handler following the documentation
// literally, each shown handled by the engine against the real kernel: (1) UFFDIO_UNREGISTER
// does not wake every fault of the range (not WP waiters; not a fault queued while it runs), so
// the handler must wake what it cannot resolve; (2) resolving ioctls fail with EAGAIN while an
// event is in flight, and for a while after it was read; (3) on hugetlb mapped MAP_NORESERVE
// with an empty pool, UFFDIO_COPY fails with EEXIST although nothing is mapped. The empty-hugetlb-pool test changes the system's pool; it
// is the last test of this file and restores the pool at once.

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// Pitfall 1, write-protect: UNREGISTER leaves a thread blocked on a WP fault of the range
// asleep (it wakes only MISSING waiters). When the engine then resolves the fault, WRITEPROTECT
// says ENOENT; the engine must wake the range, or the thread sleeps forever. The write is done
// from a system call (read(2) from a pipe into the page), so nothing but a wake gets the thread
// going again: no signal interrupts the fault and makes it retry on its own.
func TestPitfallUnregisterWPWaiter(t *testing.T) {
	v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeWP)
	ps := v.pageSize
	const page = 5
	off := page * ps
	// WP-only: the first write populates the page normally; then protect it from here.
	v.do(puppet.Request{Op: "write", Off: off, Data: []byte("before")})
	if err := v.fd.Writeprotect(v.addr+uintptr(off), uintptr(ps), uffd.WriteprotectWP); err != nil {
		t.Fatal(err)
	}
	w := v.start(puppet.Request{Op: "pit-syscall-write", Off: off + 8, Data: []byte("after")})
	if !settle(func() bool { i, err := v.fd.Info(); return err == nil && i.Pending == 1 }) {
		t.Fatal("the write to the protected page did not fault")
	}
	v.do(puppet.Request{Op: "unregister", Off: off, Len: ps})
	// UNREGISTER wakes the waiters it wakes inside the ioctl, and a woken fault leaves the
	// queue: still pending now means it was not woken.
	if i, err := v.fd.Info(); err != nil || i.Pending != 1 || w.Done() {
		t.Fatalf("after UNREGISTER: %+v, %v, write done %v; want the WP fault still pending: the kernel no longer shows pitfall 1 this way", i, err, w.Done())
	}

	// Now serve: the engine reads the fault, WRITEPROTECT fails with ENOENT, and it wakes.
	e, stop := serve(t, v, []engine.Region{v.region(source.NewZero(int64(v.size)))}, engine.Options{})
	rep, _, err := w.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("the thread blocked on the unregistered page was not woken: %v", err)
	}
	if rep.Ints[0] != 5 {
		t.Errorf("wrote %d bytes, want 5", rep.Ints[0])
	}
	got := v.do(puppet.Request{Op: "read", Off: off, Len: 16}).Data
	if want := []byte("before\x00\x00after\x00\x00\x00"); !bytes.Equal(got, want) {
		t.Errorf("page holds %q, want %q", got, want)
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if st := e.Stats()[0]; st.WP != 1 || st.Errors != 0 {
		t.Errorf("WP faults %d, errors %d; want 1 and 0", st.WP, st.Errors)
	}
}

// Pitfall 1, missing fault in flight: the child unregisters a page while its fetch is in flight.
// The faulting thread retries without the userfaultfd and reads zeros; the fetch's COPY later
// gets ENOENT, which must neither stop the engine nor install anything.
func TestPitfallUnregisterDuringFetch(t *testing.T) {
	v := newVM(t, memory.Anon, 1<<20, 0, uffd.ModeMissing)
	ps := v.pageSize
	const page = 5
	src := newGatedSource(source.NewMemory(patternSource(t, v.size, 4).Bytes(0, int64(v.size))))
	src.slowFrom, src.slowTo = int64(page*ps), int64(page*ps+ps)
	e, stop := serve(t, v, []engine.Region{v.region(src)}, engine.Options{})
	defer src.open()

	r := v.start(puppet.Request{Op: "read", Off: page*ps + 64, Len: 64})
	src.waitEntered(t)
	v.do(puppet.Request{Op: "unregister", Off: page * ps, Len: ps})
	rep, _, err := r.Wait(20 * time.Second)
	if err != nil {
		t.Fatalf("the thread faulting on the unregistered page did not complete: %v", err)
	}
	if !bytes.Equal(rep.Data, make([]byte, 64)) {
		t.Fatalf("the unregistered page reads %x, want zeros", rep.Data)
	}
	src.open()
	// The engine carries on: the pages around are served.
	touchRange(t, v, 0, page*ps, "pattern", 4)
	touchRange(t, v, page*ps+ps, v.size-page*ps-ps, "pattern", 4)
	if rep := v.do(puppet.Request{Op: "read", Off: page*ps + 64, Len: 64}); !bytes.Equal(rep.Data, make([]byte, 64)) {
		t.Fatalf("after the fetch, the unregistered page reads %x, want zeros", rep.Data)
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	st := e.Stats()[0]
	if st.Errors != 0 {
		t.Errorf("%d errors", st.Errors)
	}
	if got, want := e.Installed()["mem"], v.size/ps-1; got != want {
		t.Errorf("%d pages installed, want %d (all but the unregistered one)", got, want)
	}
}

// Pitfall 2: resolving ioctls keep failing with EAGAIN for a while after a REMOVE event was
// read. A MADV_DONTNEED storm runs while the pages are read over and over: every word reads as
// the source or as zero, no page shows source data after it was removed, and everything
// completes (the engine retries instead of failing or giving up).
func TestPitfallEventsPendingRetries(t *testing.T) {
	v := newVM(t, memory.Anon, 2<<20, uffd.FeatureEventRemove, uffd.ModeMissing)
	e, stop := serve(t, v, []engine.Region{v.region(patternSource(t, v.size, 13))}, engine.Options{Workers: 2, FaultAround: engine.FaultAround{Max: 4}})
	call := v.start(puppet.Request{Op: "pit-remove-storm", Seed: 13, Ints: []int64{3, 2, 3000}})
	var rep puppet.Reply
	var err error
	replied := make(chan struct{})
	go func() {
		rep, _, err = call.Wait(60 * time.Second)
		close(replied)
	}()
	select {
	case <-replied:
	case <-e.Done():
		// The engine gave up mid-storm: the reading thread now sleeps on a fault nobody serves,
		// so say why at once instead of waiting for the reply that cannot come.
		t.Fatalf("the engine stopped during the storm: %v (%s)", stop(), statsLine(e.Stats()[0]))
	}
	if err != nil {
		t.Fatalf("storm: %v", err)
	}
	garbage, stale, removes, zeroPages, rounds := rep.Ints[0], rep.Ints[1], rep.Ints[2], rep.Ints[3], rep.Ints[4]
	if garbage != 0 || stale != 0 {
		t.Fatalf("%d wrong words, %d words of source data after removal: %s", garbage, stale, rep.Str)
	}
	if removes == 0 || zeroPages == 0 {
		t.Fatalf("the storm did nothing: %d madvise calls, %d pages seen zero", removes, zeroPages)
	}
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	st := e.Stats()[0]
	if st.PagesRemoved == 0 || st.Errors != 0 {
		t.Errorf("pages removed %d, errors %d", st.PagesRemoved, st.Errors)
	}
	t.Logf("%d madvise calls, %d rounds, %d pages seen zero; engine: %d faults, %d zero pages, %d removed, %d retries",
		removes, rounds, zeroPages, st.Faults, st.PagesZero, st.PagesRemoved, st.Retries)
}

// Pitfall 3 — keep this the last test of the file: hugetlb memory mapped MAP_NORESERVE with an
// empty pool. The COPY of a huge page fails with EEXIST although nothing is mapped; an engine
// that takes EEXIST for "already there" and wakes the thread spins forever. Run must instead
// return an error naming the exhausted pool — whether the page is copied on the fault path
// (resident source) or by a fetcher (a source that is not resident).
//
// The test holds the machine-wide huge page lock exclusively, so no test of another package
// uses huge pages meanwhile. The pool is emptied by a second child that takes every free huge
// page, not by lowering /proc/sys/vm/nr_hugepages: the setting never changes, so nothing can
// leave it wrong. The child is killed as soon as the engines have stopped, which gives the
// pages back. If something outside the lock refills the pool meanwhile (a page gets installed),
// the attempt proves nothing and is repeated.
func TestPitfallEmptyHugetlbPool(t *testing.T) {
	unlock, err := memory.LockHugePages()
	if err != nil {
		requireKernel(t, err.Error())
	}
	t.Cleanup(unlock)
	if b, err := os.ReadFile("/proc/sys/vm/nr_overcommit_hugepages"); err != nil || strings.TrimSpace(string(b)) != "0" {
		requireKernel(t, "surplus huge pages are allowed (nr_overcommit_hugepages), so the pool cannot be emptied")
	}
	for attempt := 1; ; attempt++ {
		if emptyPoolAttempt(t) {
			break
		}
		if attempt == 3 {
			t.Fatal("the hugetlb pool was refilled from outside in every attempt")
		}
		t.Logf("attempt %d: the pool was refilled from outside; again", attempt)
	}
	unlock()
}

// emptyPoolAttempt runs the empty-pool scenario once; it returns false when the result is
// void because a page got installed (the pool was refilled by someone else).
func emptyPoolAttempt(t *testing.T) bool {
	type server struct {
		name  string
		v     *vm
		e     *engine.Engine
		stop  func() error
		touch *puppet.Call
		err   error
	}
	var servers []*server
	for _, name := range []string{"resident", "fetched"} {
		v := newUnreservedVM(t, memory.Hugetlb, 4<<20, uffd.ModeMissing)
		var src source.Source = patternSource(t, v.size, 2)
		if name == "fetched" {
			src = newGatedSource(src.(*source.Memory))
		}
		e, stop := serve(t, v, []engine.Region{v.region(src)}, engine.Options{})
		servers = append(servers, &server{name: name, v: v, e: e, stop: stop})
	}
	defer func() {
		for _, s := range servers {
			s.stop()
			s.v.p.Kill()
		}
	}()

	hog, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer hog.Kill() // gives the pages back
	for try := 0; ; try++ {
		h, err := memory.ReadHugePages()
		if err != nil {
			t.Fatal(err)
		}
		if h.Free == 0 {
			break
		}
		if try == 5 {
			t.Fatalf("cannot empty the hugetlb pool: %+v", h)
		}
		rep, _, err := hog.Do(puppet.Request{Op: "map", Kind: memory.Hugetlb.String(), Size: h.Free * h.Size})
		if err != nil {
			t.Fatal(err)
		}
		// Writing each page allocates it; a SIGBUS means someone else took the last ones.
		if _, _, err := hog.Do(puppet.Request{Op: "touch", Area: rep.Area, Write: true}); err != nil {
			t.Fatal(err)
		}
	}

	for _, s := range servers {
		s.touch = s.v.start(puppet.Request{Op: "touch", Len: s.v.pageSize})
	}
	deadline := time.After(20 * time.Second)
	for _, s := range servers {
	wait:
		for {
			select {
			case <-s.e.Done():
				s.err = s.stop()
				break wait
			case <-time.After(10 * time.Millisecond):
				if s.touch.Done() {
					return false // the page was installed: not an empty pool
				}
			case <-deadline:
				break wait
			}
		}
	}
	hog.Kill()

	for _, s := range servers {
		st := s.e.Stats()[0]
		if s.touch.Done() {
			return false
		}
		if s.err == nil {
			t.Errorf("%s: the engine is still running after 20 s on an empty pool (faults %d, duplicates %d)", s.name, st.Faults, st.Duplicates)
			continue
		}
		t.Logf("%s: Run: %v (faults %d, duplicates %d)", s.name, s.err, st.Faults, st.Duplicates)
		if !strings.Contains(s.err.Error(), "hugetlb pool exhausted") {
			t.Errorf("%s: Run's error %q does not name the exhausted hugetlb pool", s.name, s.err)
		}
		if errors.Is(s.err, engine.ErrProcessGone) {
			t.Errorf("%s: Run's error %v claims the process is gone", s.name, s.err)
		}
	}
	return true
}

// newUnreservedVM is newVM without reserving huge pages, for a test that wants no free pages:
// the hugetlb area is mapped MAP_NORESERVE and needs none until it is touched.
func newUnreservedVM(t testing.TB, kind memory.Kind, size int, mode uffd.RegisterMode) *vm {
	t.Helper()
	return startVM(t, kind, size, 0, mode)
}
