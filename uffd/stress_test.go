//go:build linux

package uffd_test

// A port of the kernel's uffd-stress bounce test (tools/testing/selftests/mm/uffd-stress.c)
// in our own code, against the real kernel, for every memory kind.
//
// Roles. The puppet child owns two areas of the kind, src and dst, and count_verify (in its own
// heap). Per bounce it registers dst MISSING (+WP), empties it and runs nr_parallel locking
// threads that take a per-page lock word, check the page's counter against count_verify and
// increment both. This process is the fault handler: nr_parallel handler goroutines serve
// MISSING faults by COPY (write-protected when WP is tested) and WP faults by unprotecting, while
// nr_parallel background goroutines COPY every page of their slice (first half, WRITEPROTECT the
// slice, second half), racing the handlers; EEXIST means the other side won and is answered
// with WAKE. After the bounce dst is unprotected, unregistered, verified (in "ver" bounces) and
// the two areas swap roles, so the counters travel from area to area through UFFDIO_COPY.
//
// Where COPY's source comes from. UFFDIO_COPY reads its source in the caller's address space,
// which is this process, while src lives in the child; for the private kinds (anon,
// shmem-private, hugetlb-private) it cannot be mapped here at all (the counters live in private
// pages of the child). So the child keeps a "mailbox", a shmem memfd it sends once, and copies
// src into it before every bounce (src is not written during a bounce: the lockers write dst
// only); handlers and background copiers COPY from this process's MAP_SHARED mapping of the
// mailbox, at the same offset. The data still makes the whole trip: the counters a locker reads
// on its first touch of a page are exactly what COPY installed.
//
// Modes. As in the selftest, the bits of the number of bounces left select the mode: 1 random
// page order ("rnd"), 2 all lockers start at the same page ("racing"), 4 verify every counter
// afterwards ("ver"), 8 poll (a non-blocking uffd read through the netpoller by uffd.Reader)
// else read (a blocking uffd, read one message at a time by uffd.Reader in read(2)). The child
// made one uffd; every bounce wraps a dup of it with uffd.NewFD, which sets or clears
// O_NONBLOCK on the shared open file, as the selftest toggles it with fcntl.
//
// Stopping blocking readers. A read(2) blocked on a uffd is not ended by closing the fd (the
// call holds its own reference) nor by a signal (Go's handlers are SA_RESTART, so the kernel
// restarts the read), and the selftest's pthread_cancel has no Go equivalent. So in read
// mode the child rings a doorbell: a small anonymous area registered MISSING on the same uffd,
// one page per reader, faulted from as many threads at once. Each reader, seeing a doorbell
// fault after the stop flag is set, resolves it (ZEROPAGE) and exits. A reader may consume a
// duplicate doorbell message (a thread interrupted by a signal faults again), leaving another
// doorbell fault with nobody to read it; once all readers have gone the test resolves the
// doorbell pages itself.

import (
	"errors"
	"fmt"
	"os"
	"runtime"
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

const (
	stressSmallSize = 16 << 20 // per area, for 4 KiB pages: 4096 pages
	stressHugePages = 32       // per area, for hugetlb
	stressTimeout   = 60 * time.Second
	// stressMaxMsgs bounds the MISSING messages for one page in one bounce. Duplicates are normal
	// (racing lockers, signal-interrupted faults), a few per page; thousands mean a fault that
	// COPY cannot resolve (into MAP_NORESERVE hugetlb memory, an exhausted pool answers EEXIST).
	stressMaxMsgs = 1000
)

// stressParallel is nr_parallel: the selftest uses one slot per CPU; 2 to 4 here.
func stressParallel() int { return min(max(runtime.NumCPU(), 2), 4) }

// stressModes lists the bounces, each given by the number of bounces left (which selects the
// mode). -short keeps four bounces in which every mode bit is on twice and off twice.
func stressModes() []int {
	if testing.Short() {
		return []int{15, 9, 6, 0}
	}
	modes := make([]int, 16)
	for i := range modes {
		modes[i] = 15 - i
	}
	return modes
}

func stressModeString(mode int) string {
	var b strings.Builder
	for _, m := range []struct {
		bit  int
		name string
	}{{puppet.StressRandom, "rnd"}, {puppet.StressRacing, "racing"}, {puppet.StressVerify, "ver"}} {
		if mode&m.bit != 0 {
			b.WriteString(" " + m.name)
		}
	}
	if mode&puppet.StressPoll != 0 {
		b.WriteString(" poll")
	} else {
		b.WriteString(" read")
	}
	return b.String()
}

// stressRun is one kind's run: the child, its areas and the uffd received from it.
type stressRun struct {
	t       *testing.T
	p       *puppet.Puppet
	sid     int64
	size    int
	ps      int
	nrPages int
	nrPar   int
	wp      bool
	// transientMissing: a write by a locker that already read the page may be reported as a
	// MISSING|WRITE fault whose page is in fact present (see stressHandler.handle).
	transientMissing bool
	base             int    // the uffd received from the child; each bounce wraps a dup of it
	mailbox          []byte // this process's mapping of the child's mailbox memfd
	bellArea         int
	bell             uintptr
	bellPS           int
}

type stressTotals struct {
	missing, missingMsgs, wp, incs, bgCopies, transient int64
}

func TestStressBounce(t *testing.T) {
	sup, err := uffd.SupportedFeatures()
	if err != nil {
		requireKernel(t, "no userfaultfd: "+err.Error())
	}
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		// WP is exercised where the kernel supports it, as the selftest does: anon needs
		// PAGEFAULT_FLAG_WP, shmem and hugetlb also WP_HUGETLBFS_SHMEM; anon asks for
		// WP_UNPOPULATED so that WRITEPROTECT also covers the pages not copied yet.
		wp := sup&uffd.FeaturePagefaultFlagWP != 0 && (k == memory.Anon || sup&uffd.FeatureWPHugetlbfsShmem != 0)
		var features uffd.Feature
		if wp && k == memory.Anon && sup&uffd.FeatureWPUnpopulated != 0 {
			features |= uffd.FeatureWPUnpopulated
		}
		if !wp {
			// The selftest then runs without WP; so do we, but CI must not lose it silently.
			msg := fmt.Sprintf("kernel features %v: write-protect not exercised on %v", sup, k)
			if os.Getenv("FAULTLINE_REQUIRE_KERNEL") == "1" {
				t.Error(msg)
			}
			t.Log(msg)
		}
		r := newStressRun(t, k, wp, features)
		var tot stressTotals
		for _, mode := range stressModes() {
			r.bounce(mode, &tot)
			if t.Failed() {
				return
			}
		}
		t.Logf("%v: totals: %d missing (%d messages, %d transient write-missing), %d wp, %d background copies, %d increments",
			k, tot.missing, tot.missingMsgs, tot.transient, tot.wp, tot.bgCopies, tot.incs)
		// The background copies race the lockers, so a single bounce may see every page copied
		// before its first touch; across all bounces the handlers must have served faults.
		if tot.missingMsgs == 0 || tot.missing == 0 {
			t.Errorf("no MISSING fault served by COPY across %d bounces (%d messages)", len(stressModes()), tot.missingMsgs)
		}
		if wp && tot.wp == 0 {
			t.Errorf("no WP fault across %d bounces although pages were copied write-protected", len(stressModes()))
		}
	})
}

func newStressRun(t *testing.T, k memory.Kind, wp bool, features uffd.Feature) *stressRun {
	r := &stressRun{t: t, nrPar: stressParallel(), wp: wp, base: -1}
	r.transientMissing = wp && k == memory.ShmemPrivate
	size := stressSmallSize
	if k.Huge() {
		hps, err := memory.HugePageSize()
		if err != nil {
			requireKernel(t, "no hugetlb: "+err.Error())
		}
		size = stressHugePages * hps
		// Two areas, plus a page per concurrent COPY that allocates before it finds EEXIST.
		needHugePages(t, 2*stressHugePages+2*r.nrPar+2)
	}
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	r.p = p
	t.Cleanup(func() {
		p.Kill()
		if r.base >= 0 {
			unix.Close(r.base)
		}
		if r.mailbox != nil {
			unix.Munmap(r.mailbox)
		}
	})
	mapArea := func(kind memory.Kind, n int) puppet.Reply {
		rep, fds, err := p.Do(puppet.Request{Op: "map", Kind: kind.String(), Size: n})
		if err != nil {
			t.Fatalf("map %v: %v", kind, err)
		}
		for _, fd := range fds {
			unix.Close(fd) // the area's memfd: not needed here, the mailbox carries the data
		}
		return rep
	}
	a := mapArea(k, size)
	b := mapArea(k, size)
	bell := mapArea(memory.Anon, r.nrPar*os.Getpagesize())
	r.size, r.ps = a.Size, a.PageSize
	r.bellArea, r.bell, r.bellPS = bell.Area, uintptr(bell.Addr), bell.PageSize

	_, fds, err := p.Do(puppet.Request{Op: "uffd", Features: uint64(features)})
	if err != nil {
		t.Fatalf("uffd in child (features %v): %v", features, err)
	}
	if len(fds) != 1 {
		t.Fatalf("child sent %d fds, want 1", len(fds))
	}
	r.base = fds[0]
	if _, _, err := p.Do(puppet.Request{Op: "register", Area: bell.Area, Mode: uint64(uffd.ModeMissing)}); err != nil {
		t.Fatalf("register doorbell: %v", err)
	}

	rep, fds, err := p.Do(puppet.Request{Op: "stress-init", Ints: []int64{int64(a.Area), int64(b.Area)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 1 || len(rep.Ints) != 3 {
		t.Fatalf("stress-init: %d fds, ints %v", len(fds), rep.Ints)
	}
	r.mailbox, err = unix.Mmap(fds[0], 0, r.size, unix.PROT_READ, unix.MAP_SHARED)
	unix.Close(fds[0])
	if err != nil {
		t.Fatalf("mmap mailbox: %v", err)
	}
	r.sid, r.nrPages = rep.Ints[0], int(rep.Ints[1])
	if r.nrPages != r.size/r.ps || int(rep.Ints[2]) != r.ps {
		t.Fatalf("child has %d pages of %d, want %d of %d", r.nrPages, rep.Ints[2], r.size/r.ps, r.ps)
	}
	t.Logf("nr_pages: %d, nr_pages_per_cpu: %d, page size %d, wp %v", r.nrPages, r.nrPages/r.nrPar, r.ps, wp)
	return r
}

// stressHandler serves one bounce's faults and runs its background copies.
type stressHandler struct {
	r        *stressRun
	fd       *uffd.FD
	dst      uintptr
	mailbox  uintptr
	copyMode uffd.CopyMode
	stop     atomic.Bool
	wg       sync.WaitGroup

	missing, msgs, wp []atomic.Int64 // per handler goroutine
	perPage           []atomic.Int32 // MISSING messages per page
	bgCopies          atomic.Int64
	transient         atomic.Int64 // MISSING|WRITE messages for pages already present

	errMu sync.Mutex
	errs  []error
	nerr  int
}

func (h *stressHandler) fail(err error) {
	h.errMu.Lock()
	defer h.errMu.Unlock()
	h.nerr++
	if len(h.errs) < 5 {
		h.errs = append(h.errs, err)
	}
}

func (h *stressHandler) errors() error {
	h.errMu.Lock()
	defer h.errMu.Unlock()
	if h.nerr == 0 {
		return nil
	}
	return fmt.Errorf("%d handler errors, first: %w", h.nerr, errors.Join(h.errs...))
}

// copyPage installs dst page addr from the mailbox. It reports whether this call installed it;
// EEXIST means someone else did (a background copy, another handler), and the faulting threads
// are woken in case they slept on it.
func (h *stressHandler) copyPage(addr uintptr) (bool, error) {
	ps := uintptr(h.r.ps)
	n, err := h.fd.Copy(addr, h.mailbox+(addr-h.dst), ps, h.copyMode)
	switch {
	case err == nil:
		if n != ps {
			return false, fmt.Errorf("COPY %#x returned %d bytes, want %d", addr, n, ps)
		}
		return true, nil
	case errors.Is(err, uffd.ErrExist):
		return false, h.fd.Wake(addr, ps)
	}
	return false, err
}

// serve is one handler goroutine: read messages, resolve them. In read mode it exits after a
// doorbell fault seen once stop is set; in poll mode when the read deadline passes after stop.
func (h *stressHandler) serve(i int, poll bool) {
	defer h.wg.Done()
	rd, err := h.fd.NewReader()
	if err != nil {
		h.fail(err)
		return
	}
	batch := 1 // read mode: one message per read(2), so each doorbell wakes one reader
	if poll {
		batch = 16
	}
	msgs := make([]uffd.Msg, batch)
	for {
		n, err := rd.Read(msgs)
		if err != nil {
			if poll && h.stop.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
			h.fail(fmt.Errorf("handler %d: read: %w", i, err))
			return
		}
		done := false
		for j := range msgs[:n] {
			if h.handle(i, &msgs[j]) {
				done = true
			}
		}
		if done {
			return
		}
	}
}

// handle resolves one message; it reports a doorbell fault after stop.
func (h *stressHandler) handle(i int, m *uffd.Msg) bool {
	if err := m.Check(); err != nil {
		h.fail(err)
		return false
	}
	if m.Event() != uffd.EventPagefault {
		h.fail(fmt.Errorf("unexpected event %v", m))
		return false
	}
	pf := m.Pagefault()
	ps := uintptr(h.r.ps)
	if bell, n := h.r.bell, uintptr(h.r.nrPar*h.r.bellPS); pf.Address >= bell && pf.Address < bell+n {
		if !h.stop.Load() {
			h.fail(fmt.Errorf("doorbell fault %v before stop", m))
		}
		pg := pf.Address &^ uintptr(h.r.bellPS-1)
		if _, err := h.fd.Zeropage(pg, uintptr(h.r.bellPS), 0); errors.Is(err, uffd.ErrExist) {
			err = h.fd.Wake(pg, uintptr(h.r.bellPS))
			if err != nil {
				h.fail(err)
			}
		} else if err != nil {
			h.fail(err)
		}
		return h.stop.Load()
	}
	if pf.Address < h.dst || pf.Address >= h.dst+uintptr(h.r.size) {
		h.fail(fmt.Errorf("fault outside dst [%#x, %#x): %v", h.dst, h.dst+uintptr(h.r.size), m))
		return false
	}
	page := pf.Address &^ (ps - 1)
	switch {
	case pf.Flags&uffd.FaultMinor != 0:
		h.fail(fmt.Errorf("unexpected minor fault: %v", m))
	case pf.Flags&uffd.FaultWP != 0:
		h.wp[i].Add(1)
		if !h.r.wp {
			h.fail(fmt.Errorf("WP fault without WP registration: %v", m))
		}
		if err := h.fd.Writeprotect(page, ps, 0); err != nil {
			h.fail(fmt.Errorf("unprotect: %w", err))
		}
	default:
		h.msgs[i].Add(1)
		if c := h.perPage[(page-h.dst)/ps].Add(1); c == stressMaxMsgs {
			h.fail(fmt.Errorf("page %#x faulted %d times in one bounce: COPY does not resolve it", page, c))
		}
		ok, err := h.copyPage(page)
		if err != nil {
			h.fail(fmt.Errorf("handler %d: %w", i, err))
		}
		if ok {
			h.missing[i].Add(1)
		}
		// A locker's first access to a page is a read of its lock word, and a page once
		// installed stays for the whole bounce, so a MISSING fault is never a write: the
		// write (the lock CAS) comes after the read found the page present.
		//
		// One exception, on shmem-private with WP only. UFFDIO_WRITEPROTECT (a handler
		// unprotecting a page after another racing locker's WP fault, or a background
		// thread protecting its slice) rewrites a present PTE by clearing it and setting
		// the new value under the page-table lock (ptep_modify_prot_start/commit). A CAS in
		// that window faults on a none PTE. anon decides MISSING under the page-table lock
		// (do_anonymous_page) and hugetlb rechecks the PTE (hugetlb_pte_stable), so they
		// see the page; shmem (MAP_SHARED) finds the page in the page cache. On a private
		// shmem mapping the copied page is anonymous and the page cache is empty, so
		// shmem_fault reports MISSING|WRITE. handle_userfault queues the message before it
		// rechecks the PTE; finding it present again, the locker retries without sleeping
		// (or sleeps until our WAKE), but a handler may already have read the message. The
		// page is present, so our COPY answers EEXIST (and WAKEs). A COPY that succeeds
		// means the page really was missing when written, and that is still an error, for
		// every kind. (Measured on 6.18: in about half the shmem-private runs, nearly all in
		// racing bounces, the lock CAS being the faulting instruction; never with WP off.)
		if pf.Flags&uffd.FaultWrite != 0 {
			switch {
			case ok || !h.r.transientMissing:
				h.fail(fmt.Errorf("unexpected write fault: %v (installed by this COPY: %v)", m, ok))
			case err == nil: // EEXIST: the page was present
				h.transient.Add(1)
			}
		}
	}
	return false
}

// background is the selftest's background thread for one slice: copy the first half, protect
// the slice, copy the second half.
func (h *stressHandler) background(cpu int) {
	perCPU := h.r.nrPages / h.r.nrPar
	start, end := cpu*perCPU, (cpu+1)*perCPU
	mid := (start + end) / 2
	ps := uintptr(h.r.ps)
	cp := func(nr int) {
		ok, err := h.copyPage(h.dst + uintptr(nr)*ps)
		if err != nil {
			h.fail(fmt.Errorf("background %d: %w", cpu, err))
		}
		if ok {
			h.bgCopies.Add(1)
		}
	}
	for nr := start; nr < mid; nr++ {
		cp(nr)
	}
	if h.r.wp {
		if err := h.fd.Writeprotect(h.dst+uintptr(start)*ps, uintptr(perCPU)*ps, uffd.WriteprotectWP); err != nil {
			h.fail(fmt.Errorf("background %d: protect slice: %w", cpu, err))
		}
	}
	for nr := mid; nr < end; nr++ {
		cp(nr)
	}
}

func stressWait(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

func (r *stressRun) call(req puppet.Request) puppet.Reply {
	r.t.Helper()
	c, err := r.p.Go(req)
	if err != nil {
		r.t.Fatalf("%s: %v", req.Op, err)
	}
	rep, _, err := c.Wait(stressTimeout)
	if err != nil {
		r.t.Fatalf("%s: %v", req.Op, err)
	}
	return rep
}

func stressSum(v []atomic.Int64) (int64, string) {
	var tot int64
	parts := make([]string, len(v))
	for i := range v {
		n := v[i].Load()
		tot += n
		parts[i] = fmt.Sprint(n)
	}
	return tot, strings.Join(parts, "+")
}

// bounce runs one bounce of the given mode (the number of bounces left).
func (r *stressRun) bounce(mode int, tot *stressTotals) {
	t := r.t
	poll := mode&puppet.StressPoll != 0
	regMode := uffd.ModeMissing
	want := uffd.IoctlWake | uffd.IoctlCopy
	if r.wp {
		regMode |= uffd.ModeWP
		want |= uffd.IoctlWriteprotect
	}
	// Child: snapshot src into the mailbox, register dst, empty it.
	rep := r.call(puppet.Request{Op: "stress-prepare", Ints: []int64{r.sid}, Mode: uint64(regMode)})
	if got := uffd.Ioctls(rep.Ioctls); got&want != want {
		t.Fatalf("register %v answered ioctls %v, want at least %v", regMode, got, want)
	}
	dst := uintptr(rep.Ints[1])

	dup, err := unix.FcntlInt(uintptr(r.base), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := uffd.NewFD(dup, !poll)
	if err != nil {
		unix.Close(dup)
		t.Fatal(err)
	}
	defer fd.Close()
	h := &stressHandler{
		r: r, fd: fd, dst: dst, mailbox: addrOf(r.mailbox),
		missing: make([]atomic.Int64, r.nrPar), msgs: make([]atomic.Int64, r.nrPar), wp: make([]atomic.Int64, r.nrPar),
		perPage: make([]atomic.Int32, r.nrPages),
	}
	if r.wp {
		h.copyMode = uffd.CopyWP
	}
	for i := range r.nrPar {
		h.wg.Add(1)
		go h.serve(i, poll)
	}
	fatal := func(format string, a ...any) {
		t.Helper()
		if err := h.errors(); err != nil {
			t.Errorf("%v", err)
		}
		// Let poll handlers go; blocking readers stay in read(2) until the process exits.
		h.stop.Store(true)
		fd.SetReadDeadline(time.Now())
		t.Fatalf(format, a...)
	}
	// call runs a child command; on failure the handler's errors are reported too, as they
	// usually explain a child blocked on a fault.
	call := func(req puppet.Request) puppet.Reply {
		t.Helper()
		c, err := r.p.Go(req)
		if err != nil {
			fatal("%s: %v", req.Op, err)
		}
		rep, _, err := c.Wait(stressTimeout)
		if err != nil {
			fatal("%s: %v", req.Op, err)
		}
		return rep
	}

	// The lockers start first (as in the selftest, which creates each locker before its
	// background thread), so their first faults are pending when the background copies begin;
	// from then on both race.
	call(puppet.Request{Op: "stress-lock", Ints: []int64{r.sid, int64(mode), int64(r.nrPar)}})
	var bg sync.WaitGroup
	for cpu := range r.nrPar {
		bg.Add(1)
		go func() {
			defer bg.Done()
			h.background(cpu)
		}()
	}
	if !stressWait(&bg, stressTimeout) {
		fatal("background copies did not finish within %v", stressTimeout)
	}
	// Every page is in place: release src, stop the lockers (they may still wait on faults the
	// handlers have read, so the handlers keep running until the lockers are joined).
	fin := call(puppet.Request{Op: "stress-finish", Ints: []int64{r.sid}})

	h.stop.Store(true)
	if poll {
		fd.SetReadDeadline(time.Now())
		if !stressWait(&h.wg, stressTimeout) {
			fatal("poll handlers did not stop")
		}
	} else {
		ring, err := r.p.Go(puppet.Request{Op: "stress-ring", Ints: []int64{int64(r.bellArea), int64(r.nrPar)}})
		if err != nil {
			fatal("ring: %v", err)
		}
		if !stressWait(&h.wg, stressTimeout) {
			fatal("read handlers did not stop on the doorbell")
		}
		// A reader may have taken a duplicate doorbell message and left another unread.
		for i := range r.nrPar {
			pg := r.bell + uintptr(i*r.bellPS)
			if _, err := fd.Zeropage(pg, uintptr(r.bellPS), 0); err != nil && !errors.Is(err, uffd.ErrExist) {
				fatal("doorbell zeropage: %v", err)
			}
		}
		if err := fd.Wake(r.bell, uintptr(r.nrPar*r.bellPS)); err != nil {
			fatal("doorbell wake: %v", err)
		}
		if _, _, err := ring.Wait(stressTimeout); err != nil {
			fatal("ring: %v", err)
		}
	}

	// Clear the write protection on the whole of dst, unregister, verify, swap.
	if r.wp {
		if err := fd.Writeprotect(dst, uintptr(r.size), 0); err != nil {
			fatal("unprotect dst: %v", err)
		}
	}
	end := call(puppet.Request{Op: "stress-end", Ints: []int64{r.sid, int64(mode & puppet.StressVerify)}})
	// UNREGISTER wakes the faults pending before it takes its locks, and may miss one racing
	// with it; none should be pending now, and a WAKE makes sure.
	if err := fd.Wake(dst, uintptr(r.size)); err != nil {
		fatal("wake dst: %v", err)
	}

	missing, missingParts := stressSum(h.missing)
	msgs, _ := stressSum(h.msgs)
	wp, wpParts := stressSum(h.wp)
	t.Logf("bounces: %d, mode:%s, userfaults: %d missing (%s), %d wp (%s); %d missing messages (%d transient write-missing), %d background copies, %d increments",
		mode, stressModeString(mode), missing, missingParts, wp, wpParts, msgs, h.transient.Load(), h.bgCopies.Load(), fin.Ints[0])
	tot.missing += missing
	tot.missingMsgs += msgs
	tot.wp += wp
	tot.incs += fin.Ints[0]
	tot.bgCopies += h.bgCopies.Load()
	tot.transient += h.transient.Load()

	if err := h.errors(); err != nil {
		t.Errorf("bounce %d: %v", mode, err)
	}
	if fin.Ints[1] != 0 {
		t.Errorf("bounce %d: lockers saw %d wrong counters; first: %s", mode, fin.Ints[1], fin.Str)
	}
	if fin.Ints[0] < int64(r.nrPar) {
		t.Errorf("bounce %d: %d increments, want at least one per locker (%d)", mode, fin.Ints[0], r.nrPar)
	}
	if mode&puppet.StressVerify != 0 {
		if end.Ints[0] != int64(r.nrPages) || end.Ints[1] != 0 {
			t.Errorf("bounce %d: verify checked %d of %d pages, %d wrong; first: %s", mode, end.Ints[0], r.nrPages, end.Ints[1], end.Str)
		}
	}
	// Every page was installed exactly once, by a background copy or by a handler.
	if got := missing + h.bgCopies.Load(); got != int64(r.nrPages) {
		t.Errorf("bounce %d: %d pages installed (%d by handlers, %d in background), want %d",
			mode, got, missing, h.bgCopies.Load(), r.nrPages)
	}
}
