//go:build linux

package uffd_test

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// quietRemote is newRemote with a child whose Go runtime sends its threads no preemption
// signals. A thread blocked on a user-mode fault sleeps interruptibly: each SIGURG the runtime
// sends it makes it return to user space and fault again (about 50 duplicate messages a second
// here) — and after a DONTWAKE resolve or an UNREGISTER the retry succeeds on its own, which
// would hide whether the kernel woke it.
func quietRemote(t *testing.T, o remoteOpts) *remote {
	t.Helper()
	t.Setenv("GODEBUG", strings.TrimPrefix(os.Getenv("GODEBUG")+",asyncpreemptoff=1", ","))
	return newRemote(t, o)
}

// readFault reads the next message from r's uffd, waiting up to 10 s, and checks that it is a
// page fault with the given flags at addr.
func readFault(t *testing.T, r *remote, rd *uffd.Reader, addr uintptr, flags uffd.FaultFlags) {
	t.Helper()
	msgs := make([]uffd.Msg, 1)
	r.fd.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer r.fd.SetReadDeadline(time.Time{})
	if _, err := rd.Read(msgs); err != nil {
		t.Fatalf("no fault message: %v", err)
	}
	if err := msgs[0].Check(); err != nil {
		t.Fatal(err)
	}
	pf := msgs[0].Pagefault()
	if msgs[0].Event() != uffd.EventPagefault || pf.Address != addr || pf.Flags != flags {
		t.Fatalf("message %v, want a %v fault at %#x", &msgs[0], flags, addr)
	}
}

// stillBlocked checks for a while that the child's command has not finished: the faulting
// thread is still asleep. It is a liveness check (the thread must not run), not a timing one.
func stillBlocked(t *testing.T, c *puppet.Call, what string) {
	t.Helper()
	for end := time.Now().Add(200 * time.Millisecond); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if c.Done() {
			rep, _, err := c.Wait(time.Second)
			t.Fatalf("the faulting thread ran on after %s (reply %+v, %v)", what, rep, err)
		}
	}
}

// Waking is separate from resolving: after COPY with DONTWAKE the faulting thread sleeps on,
// a WAKE of another page leaves it asleep, a WAKE of its page lets it run and see the data.
func TestWakeAfterDontWake(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := quietRemote(t, remoteOpts{kind: k, size: 2 * ps, mode: uffd.ModeMissing})
		src := source(t, r.size, 11)
		rd, err := r.fd.NewReader()
		if err != nil {
			t.Fatal(err)
		}
		c := r.start(puppet.Request{Op: "touch", Len: ps, Verify: "pattern", Seed: 11})
		defer r.fd.Wake(r.addr, uintptr(r.size)) // never leave the child stuck on a failure
		readFault(t, r, rd, r.addr, 0)

		n, err := r.fd.Copy(r.addr, addrOf(src), uintptr(ps), uffd.CopyDontWake)
		if err != nil || n != uintptr(ps) {
			t.Fatalf("COPY DONTWAKE = %d, %v; want %d", n, err, ps)
		}
		stillBlocked(t, c, "COPY with DONTWAKE")
		if err := r.fd.Wake(r.addr+uintptr(ps), uintptr(ps)); err != nil {
			t.Fatal(err)
		}
		stillBlocked(t, c, "a WAKE of another page")
		if err := r.fd.Wake(r.addr, uintptr(ps)); err != nil {
			t.Fatal(err)
		}
		rep, _, err := c.Wait(10 * time.Second)
		if err != nil {
			t.Fatalf("the faulting thread did not run after WAKE of its page: %v", err)
		}
		if rep.Mismatch != 0 || rep.Sigbus != 0 || rep.Pages != 1 {
			t.Fatalf("child read %d pages, %d wrong, %d SIGBUS", rep.Pages, rep.Mismatch, rep.Sigbus)
		}
	})
}

// UNREGISTER wakes the MISSING faults pending in the range: they retry without the uffd and
// find an empty page.
func TestUnregisterWakesMissing(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := quietRemote(t, remoteOpts{kind: k, size: ps, mode: uffd.ModeMissing})
		rd, err := r.fd.NewReader()
		if err != nil {
			t.Fatal(err)
		}
		c := r.start(puppet.Request{Op: "touch", Len: ps, Verify: "zero"})
		defer r.fd.Wake(r.addr, uintptr(r.size))
		readFault(t, r, rd, r.addr, 0)
		if err := r.fd.Unregister(r.addr, uintptr(ps)); err != nil {
			t.Fatal(err)
		}
		rep, _, err := c.Wait(10 * time.Second)
		if err != nil {
			t.Fatalf("the faulting thread was not woken by UNREGISTER: %v", err)
		}
		if rep.Mismatch != 0 || rep.Sigbus != 0 {
			t.Fatalf("after UNREGISTER the child read %d non-zero pages, %d SIGBUS", rep.Mismatch, rep.Sigbus)
		}
		if n, err := rd.TryRead(make([]uffd.Msg, 4)); n != 0 || err != nil {
			t.Fatalf("%d more messages (%v) after UNREGISTER woke the fault", n, err)
		}
	})
}

// UNREGISTER does not wake a pending WP fault; WAKE does (always WAKE after UNREGISTER).
func TestUnregisterLeavesWPAsleep(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := quietRemote(t, remoteOpts{kind: k, size: 2 * ps})
		// Populate both pages (first word of each = its offset), then protect them.
		if rep := r.do(puppet.Request{Op: "touch", Write: true}); rep.Pages != 2 {
			t.Fatalf("populate: %+v", rep)
		}
		io := r.register(0, 0, uffd.ModeWP)
		if !io.Has(uffd.IoctlWriteprotect) {
			t.Fatalf("WP registration answered %v", io)
		}
		if err := r.fd.Writeprotect(r.addr, uintptr(r.size), uffd.WriteprotectWP); err != nil {
			t.Fatal(err)
		}
		rd, err := r.fd.NewReader()
		if err != nil {
			t.Fatal(err)
		}
		// Increment the first word of page 1, which holds ps.
		c := r.start(puppet.Request{Op: "touch", Write: true, Off: ps, Len: ps, Verify: "counter", Expect: ps})
		defer r.fd.Wake(r.addr, uintptr(r.size))
		readFault(t, r, rd, r.addr+uintptr(ps), uffd.FaultWP|uffd.FaultWrite)

		if err := r.fd.Unregister(r.addr, uintptr(r.size)); err != nil {
			t.Fatal(err)
		}
		if got := uffdFlags(t, r); got != "" {
			t.Fatalf("after UNREGISTER VmFlags show %q", got)
		}
		stillBlocked(t, c, "UNREGISTER of a WP range")
		if err := r.fd.Wake(r.addr+uintptr(ps), uintptr(ps)); err != nil {
			t.Fatal(err)
		}
		rep, _, err := c.Wait(10 * time.Second)
		if err != nil {
			t.Fatalf("the writer did not run after WAKE: %v", err)
		}
		if rep.Mismatch != 0 || rep.Sigbus != 0 {
			t.Fatalf("writer saw %d wrong counters, %d SIGBUS", rep.Mismatch, rep.Sigbus)
		}
		// UNREGISTER dropped the protection: the retried write went through without a message.
		if n, err := rd.TryRead(make([]uffd.Msg, 4)); n != 0 || err != nil {
			t.Fatalf("%d more messages (%v) after WAKE", n, err)
		}
	})
}

// zeroPages maps n zero bytes in this process (the source of "copy zeros").
func zeroPages(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// Port of the selftest "zeropage": ZEROPAGE maps zeros on anonymous and shmem memory and is
// EEXIST the second time; hugetlb does not offer it (the register answer lacks it) and refuses
// it with EINVAL after looking at the range. The child then reads zeros.
func TestZeropage(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := newRemote(t, remoteOpts{kind: k, size: ps})
		io := r.register(0, 0, uffd.ModeMissing)
		a, n := r.addr, uintptr(ps)
		if k.Huge() {
			if io.Has(uffd.IoctlZeropage) {
				t.Fatalf("hugetlb register answer %v offers ZEROPAGE", io)
			}
			got, err := r.fd.Zeropage(a, n, 0)
			if got != 0 || !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) {
				t.Fatalf("ZEROPAGE on hugetlb = %d, %v; want ErrInvalid and EINVAL", got, err)
			}
			if res, errno := uffd.ResolveRaw(r.fd, "ZEROPAGE", uint64(a), 0, uint64(n), 0); errno != unix.EINVAL || res != -int64(unix.EINVAL) {
				t.Fatalf("raw ZEROPAGE on hugetlb: result %d errno %v, want -EINVAL written", res, errno)
			}
			// Fill the page another way so the child has something to read.
			if got, err := r.fd.Copy(a, addrOf(zeroPages(t, ps)), n, 0); err != nil || got != n {
				t.Fatalf("COPY zeros = %d, %v", got, err)
			}
		} else {
			if !io.Has(uffd.IoctlZeropage) {
				t.Fatalf("register answer %v lacks ZEROPAGE", io)
			}
			if got, err := r.fd.Zeropage(a, n, 0); err != nil || got != n {
				t.Fatalf("ZEROPAGE = %d, %v; want %d", got, err, n)
			}
			got, err := r.fd.Zeropage(a, n, 0)
			if got != 0 || !errors.Is(err, uffd.ErrExist) || !errors.Is(err, unix.EEXIST) {
				t.Fatalf("second ZEROPAGE = %d, %v; want ErrExist and EEXIST", got, err)
			}
			if oe := opError(t, err); oe.Done != 0 || oe.Op != "UFFDIO_ZEROPAGE" {
				t.Fatalf("second ZEROPAGE: %+v", oe)
			}
			if res, errno := uffd.ResolveRaw(r.fd, "ZEROPAGE", uint64(a), 0, uint64(n), 0); errno != unix.EEXIST || res != -int64(unix.EEXIST) {
				t.Fatalf("raw second ZEROPAGE: result %d errno %v, want -EEXIST written", res, errno)
			}
		}
		c := r.start(puppet.Request{Op: "touch", Len: ps, Verify: "zero"})
		rep, _, err := c.Wait(10 * time.Second)
		if err != nil {
			t.Fatalf("child reading the page: %v", err)
		}
		if rep.Pages != 1 || rep.Mismatch != 0 || rep.Sigbus != 0 {
			t.Fatalf("child read %d pages, %d not zero, %d SIGBUS", rep.Pages, rep.Mismatch, rep.Sigbus)
		}
	})
}

// Port of the selftest "poison": a handler COPYs zeros into odd pages and POISONs even ones;
// the child reading all four takes exactly two SIGBUS and reads zeros elsewhere. POISON over
// poison is EEXIST.
func TestPoison(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := newRemote(t, remoteOpts{kind: k, size: 4 * ps})
		io := r.register(0, 0, uffd.ModeMissing)
		if !io.Has(uffd.IoctlCopy | uffd.IoctlPoison) {
			t.Fatalf("register answer %v lacks COPY or POISON", io)
		}
		zeros := zeroPages(t, ps)
		h := newHandler(t, r, nil)
		h.resolve = func(h *handler, pf uffd.Pagefault) error {
			if pf.Flags&(uffd.FaultWP|uffd.FaultMinor) != 0 {
				return fmt.Errorf("unexpected fault %v", pf.Flags)
			}
			p := uintptr(h.pageSize)
			addr := pf.Address &^ (p - 1)
			var n uintptr
			var err error
			if (addr-h.base)/p%2 == 1 {
				n, err = h.fd.Copy(addr, addrOf(zeros), p, 0)
			} else {
				n, err = h.fd.Poison(addr, p, 0)
			}
			switch {
			case errors.Is(err, uffd.ErrExist): // a repeated fault: already resolved
				return h.fd.Wake(addr, p)
			case err != nil:
				return err
			case n != p:
				return fmt.Errorf("resolved %d bytes at %#x, want %d", n, addr, p)
			}
			return nil
		}
		h.run()
		defer h.close()
		c := r.start(puppet.Request{Op: "touch", Verify: "zero"})
		rep, _, err := c.Wait(20 * time.Second)
		if err != nil {
			t.Fatalf("child reading the pages: %v", err)
		}
		if rep.Pages != 4 || rep.Sigbus != 2 || rep.Mismatch != 0 {
			t.Fatalf("child read %d pages: %d SIGBUS (want 2), %d not zero", rep.Pages, rep.Sigbus, rep.Mismatch)
		}
		if h.missing.Load() < 4 || h.wp.Load() != 0 || h.minor.Load() != 0 {
			t.Fatalf("handler saw %d missing, %d wp, %d minor faults", h.missing.Load(), h.wp.Load(), h.minor.Load())
		}
		if !k.Huge() { // whole pages through "read" (a huge page is too big for one reply)
			for i := 0; i < 4; i++ {
				rep := r.do(puppet.Request{Op: "read", Off: i * ps, Len: ps})
				if want := 1 - i%2; rep.Sigbus != want {
					t.Fatalf("read of page %d: %d SIGBUS, want %d", i, rep.Sigbus, want)
				}
				if i%2 == 1 && (len(rep.Data) != ps || strings.Trim(string(rep.Data), "\x00") != "") {
					t.Fatalf("page %d: %d bytes, not all zero", i, len(rep.Data))
				}
			}
		}
		_, err = r.fd.Poison(r.addr, uintptr(ps), 0)
		if !errors.Is(err, uffd.ErrExist) || !errors.Is(err, unix.EEXIST) {
			t.Fatalf("POISON over poison: %v, want ErrExist and EEXIST", err)
		}
		if res, errno := uffd.ResolveRaw(r.fd, "POISON", uint64(r.addr), 0, uint64(ps), 0); errno != unix.EEXIST || res != -int64(unix.EEXIST) {
			t.Fatalf("raw POISON over poison: result %d errno %v, want -EEXIST written", res, errno)
		}
		// POISON over a mapped page is EEXIST too.
		if _, err = r.fd.Poison(r.addr+uintptr(ps), uintptr(ps), 0); !errors.Is(err, uffd.ErrExist) {
			t.Fatalf("POISON over a mapped page: %v, want ErrExist", err)
		}
	})
}
