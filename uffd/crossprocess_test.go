//go:build linux

package uffd_test

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// Cross-process behaviour of a userfaultfd held by another process than the one owning the
// memory — the VMM / page-server split.

const pmPresent = 1 << 63 // pagemap: page present

// xpPagemap returns the puppet's pagemap entry for the first small page at off of its area.
func xpPagemap(t testing.TB, r *remote, off int) uint64 {
	t.Helper()
	rep := r.do(puppet.Request{Op: "pagemap", Off: off, Len: 4096})
	if len(rep.Pagemap) != 1 {
		t.Fatalf("%d pagemap entries", len(rep.Pagemap))
	}
	return rep.Pagemap[0]
}

// xpFreeInBoth returns a size-aligned address where [addr, addr+size) is unmapped both in this
// process and in pid, judging by their /proc/<pid>/maps: the highest such gap below the stack.
func xpFreeInBoth(t testing.TB, pid int, size uintptr) uintptr {
	t.Helper()
	type span struct{ start, end uintptr }
	var used []span
	for _, who := range []string{"self", fmt.Sprint(pid)} {
		b, err := os.ReadFile("/proc/" + who + "/maps")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			var s span
			if _, err := fmt.Sscanf(l, "%x-%x", &s.start, &s.end); err == nil {
				used = append(used, s)
			}
		}
	}
	slices.SortFunc(used, func(a, b span) int { return cmp.Compare(b.start, a.start) }) // highest first
	// Well below the stack and vsyscall on 64-bit; the search is meaningless on 32-bit, where
	// these tests do not run, but must compile.
	var floor64, top64 uint64 = 1 << 32, 1<<47 - 1<<32
	floor, top := uintptr(floor64), uintptr(top64)
	for _, s := range used {
		if s.start >= top {
			top = min(top, s.start)
			continue
		}
		if s.end < top {
			if a := (top - size) &^ (size - 1); a >= s.end && a >= floor {
				return a
			}
		}
		top = min(top, s.start)
	}
	t.Fatal("no gap free in both address spaces")
	return 0
}

// TestCrossProcessCopySource: UFFDIO_COPY reads src in the address space of the process calling
// it, not in the one owning the userfaultfd. This process maps its own bytes at an address where
// the puppet has different bytes; the puppet receives this process's.
func TestCrossProcessCopySource(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		const seedChild, seedHere = 31, 32
		ps := evPageSize(t, k)
		r := newRemote(t, remoteOpts{kind: k, size: 2 * ps, mode: uffd.ModeMissing})

		// A page of this process's bytes in a memfd, to be mapped at an address of the puppet.
		mfd, err := unix.MemfdCreate("faultline-xp-src", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		mf := os.NewFile(uintptr(mfd), "xp-src")
		defer mf.Close()
		here := make([]byte, ps)
		puppet.Fill(here, seedHere, 0)
		if _, err := mf.WriteAt(here, 0); err != nil {
			t.Fatal(err)
		}

		// Pick an address free in both processes, map the memfd there, and have the puppet map
		// its own bytes (pattern seedChild) at the same address. Either process may map
		// something there meanwhile: then try again.
		var x uintptr
		var theirs int // the puppet's area at x
		for try := 0; x == 0; try++ {
			if try == 8 {
				t.Fatal("no address free in both processes after 8 tries")
			}
			a := xpFreeInBoth(t, r.pid, uintptr(ps))
			gotp, err := unix.MmapPtr(mfd, 0, *(*unsafe.Pointer)(unsafe.Pointer(&a)), uintptr(ps), unix.PROT_READ,
				unix.MAP_SHARED|unix.MAP_FIXED_NOREPLACE)
			if err == unix.EEXIST {
				continue
			}
			if got := uintptr(gotp); err != nil || got != a {
				t.Fatalf("mmap memfd at %#x: %#x, %v", a, got, err)
			}
			rep, _, err := r.p.Do(puppet.Request{Op: "ev-map-at", Addr: uint64(a), Size: ps, Seed: seedChild})
			switch {
			case err == nil:
				x, theirs = a, rep.Area
			case strings.Contains(err.Error(), unix.EEXIST.Error()):
				unix.Syscall(unix.SYS_MUNMAP, a, uintptr(ps), 0)
			default:
				t.Fatal(err)
			}
		}
		mapped := true
		unmap := func() {
			if mapped {
				unix.Syscall(unix.SYS_MUNMAP, x, uintptr(ps), 0)
				mapped = false
			}
		}
		defer unmap()

		if n, err := r.fd.Copy(r.addr, x, uintptr(ps), 0); err != nil || n != uintptr(ps) {
			t.Fatalf("COPY from %#x: %d, %v", x, n, err)
		}
		rep := r.do(puppet.Request{Op: "touch", Off: 0, Len: ps, Verify: "pattern", Seed: seedHere})
		if rep.Mismatch != 0 || rep.Sigbus != 0 {
			t.Fatalf("puppet's page: %d mismatches (first at %d), %d SIGBUS; want this process's bytes", rep.Mismatch, rep.FirstBad, rep.Sigbus)
		}
		rep, _, err = r.p.Do(puppet.Request{Op: "read", Area: theirs, Off: 0, Len: 64})
		want := make([]byte, 64)
		puppet.Fill(want, seedChild, 0)
		if err != nil || string(rep.Data) != string(want) {
			t.Fatalf("the puppet's own bytes at %#x: % x (%v), want its pattern", x, rep.Data, err)
		}

		// Unmapped here, still mapped in the puppet: COPY now fails reading src (EFAULT) and
		// the destination stays missing.
		unmap()
		_, err = r.fd.Copy(r.addr+uintptr(ps), x, uintptr(ps), 0)
		if !errors.Is(err, unix.EFAULT) {
			t.Fatalf("COPY from an address unmapped here but mapped in the puppet: %v, want EFAULT", err)
		}
		if pm := xpPagemap(t, r, ps); pm&pmPresent != 0 {
			t.Fatalf("page 1 present (pagemap %#x) after a failed COPY", pm)
		}
	})
}

// TestCrossProcessOwnerGone: once the process owning the memory has exited, the userfaultfd it
// sent away answers ESRCH to the resolving ioctls, ENOMEM to (un)registration, accepts WAKE, and
// has nothing to read.
func TestCrossProcessOwnerGone(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps := uintptr(evPageSize(t, k))
		r := newRemote(t, remoteOpts{kind: k, size: 2 * int(ps), mode: uffd.ModeMissing | uffd.ModeWP})
		src := source(t, int(ps), 1)
		if err := r.p.Exit(0); err != nil {
			t.Fatalf("puppet exit: %v", err)
		}

		gone := func(op string, n uintptr, err error, errno unix.Errno) {
			t.Helper()
			var oe *uffd.OpError
			if !errors.Is(err, uffd.ErrProcessGone) || !errors.Is(err, errno) || !errors.As(err, &oe) {
				t.Errorf("%s after the owner exited: %v, want ErrProcessGone (%v)", op, err, errno)
				return
			}
			if n != 0 || oe.Done != 0 {
				t.Errorf("%s after the owner exited: %d bytes done, want 0", op, n)
			}
		}
		n, err := r.fd.Copy(r.addr, addrOf(src), ps, 0)
		gone("COPY", n, err, unix.ESRCH)
		n, err = r.fd.Zeropage(r.addr, ps, 0)
		gone("ZEROPAGE", n, err, unix.ESRCH)
		gone("WRITEPROTECT", 0, r.fd.Writeprotect(r.addr, ps, uffd.WriteprotectWP), unix.ESRCH)
		gone("WRITEPROTECT(0)", 0, r.fd.Writeprotect(r.addr, ps, 0), unix.ESRCH)
		n, err = r.fd.Poison(r.addr, ps, 0)
		gone("POISON", n, err, unix.ESRCH)
		_, err = r.fd.Register(r.addr, ps, uffd.ModeMissing)
		gone("REGISTER", 0, err, unix.ENOMEM)
		gone("UNREGISTER", 0, r.fd.Unregister(r.addr, ps), unix.ENOMEM)
		if err := r.fd.Wake(r.addr, ps); err != nil {
			t.Errorf("WAKE after the owner exited: %v, want nil", err)
		}
		rd, err := r.fd.NewReader()
		if err != nil {
			t.Fatal(err)
		}
		if n, err := rd.TryRead(make([]uffd.Msg, 4)); n != 0 || err != nil {
			t.Errorf("read after the owner exited: %d messages, %v; want none", n, err)
		}
		if in, err := r.fd.Info(); err != nil || !in.Initialized || in.Total != 0 {
			t.Errorf("fdinfo after the owner exited: %+v, %v", in, err)
		}
	})
}

// TestCrossProcessMoveRefused: UFFDIO_MOVE works only from inside the process owning the memory;
// from here the kernel refuses it before reading the arguments (EINVAL, result field untouched —
// which is what lets the package name the cause), and nothing moves.
func TestCrossProcessMoveRefused(t *testing.T) {
	const ps = 4096
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 2 * ps, mode: uffd.ModeMissing})
	src := source(t, ps, 5)
	n, err := r.fd.Move(r.addr, addrOf(src), ps, 0)
	var oe *uffd.OpError
	if !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) || !errors.As(err, &oe) {
		t.Fatalf("MOVE from another process: %v, want ErrInvalid (EINVAL)", err)
	}
	if n != 0 || oe.Done != 0 {
		t.Fatalf("MOVE from another process reports %d bytes moved", n)
	}
	if !strings.Contains(oe.Detail, "process owning the memory") {
		t.Fatalf("MOVE error detail %q does not name the owning process (result field not untouched?)", oe.Detail)
	}
	want := make([]byte, ps)
	puppet.Fill(want, 5, 0)
	if string(src) != string(want) {
		t.Fatal("MOVE source changed")
	}
	if pm := xpPagemap(t, r, 0); pm&pmPresent != 0 {
		t.Fatalf("MOVE destination present (pagemap %#x)", pm)
	}
}

// xpUffdFD returns the number of the puppet's userfaultfd, or -1.
func xpUffdFD(t testing.TB, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		link, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if link == "anon_inode:[userfaultfd]" {
			var n int
			fmt.Sscan(e.Name(), &n)
			return n
		}
	}
	return -1
}

// xpPending reads the pending-fault count of fd in pid's fdinfo.
func xpPending(pid, fd int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "pending:"); ok {
			var n int
			_, err := fmt.Sscan(strings.TrimSpace(v), &n)
			return n, err
		}
	}
	return 0, errors.New("no pending: line in fdinfo")
}

// xpVMFlags returns the VmFlags of the mapping of pid that contains addr, from smaps. (Once
// unregistered, the area may have merged with a neighbouring mapping.)
func xpVMFlags(t testing.TB, pid int, addr uintptr) []string {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := sc.Text()
		if f := strings.Fields(l); len(f) > 0 && !strings.HasSuffix(f[0], ":") { // a mapping's header line
			var start, end uintptr
			fmt.Sscanf(f[0], "%x-%x", &start, &end)
			in = start <= addr && addr < end
		}
		if v, ok := strings.CutPrefix(l, "VmFlags:"); ok && in {
			return strings.Fields(v)
		}
	}
	t.Fatalf("no mapping contains %#x in /proc/%d/smaps", addr, pid)
	return nil
}

func xpHasFlag(flags []string, f string) bool {
	for _, x := range flags {
		if x == f {
			return true
		}
	}
	return false
}

// TestCrossProcessCloseWakes: closing the last reference to a userfaultfd unregisters its memory
// and wakes every thread blocked on its faults, which then retry without it (anonymous memory
// reads zeros). The puppet holds a reference too: while it does, closing ours wakes nobody.
func TestCrossProcessCloseWakes(t *testing.T) {
	const ps, threads = 4096, 2
	for _, order := range []string{"owner-closed-first", "handler-closed-first"} {
		t.Run(order, func(t *testing.T) {
			r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 * ps, mode: uffd.ModeMissing})
			childFD := xpUffdFD(t, r.pid)
			if childFD < 0 {
				t.Fatal("the puppet holds no userfaultfd")
			}
			if order == "owner-closed-first" {
				r.do(puppet.Request{Op: "close-uffd"})
				if fd := xpUffdFD(t, r.pid); fd >= 0 {
					t.Fatalf("the puppet still holds a userfaultfd (fd %d) after close-uffd", fd)
				}
			}
			// One blocked read per page, each on its own thread, faulting inside a system call
			// (write(2) of the page into a pipe): a thread blocked on a fault in Go code keeps
			// its P, and with all Ps held the puppet could not obey close-uffd.
			var reads []*puppet.Call
			for i := 0; i < threads; i++ {
				reads = append(reads, r.start(puppet.Request{Op: "ev-pipe-read", Off: i * ps, Len: 64}))
			}
			evWaitFor(t, "both threads to block on their faults", 10*time.Second, func() bool {
				in, err := r.fd.Info()
				return err == nil && in.Pending >= threads
			})
			if !xpHasFlag(xpVMFlags(t, r.pid, r.addr), "um") {
				t.Fatal("area not registered (no um in VmFlags) while faults are pending")
			}
			if err := r.fd.Close(); err != nil {
				t.Fatal(err)
			}
			if order == "handler-closed-first" {
				// Not the last reference: the threads are still blocked, the area still registered.
				evWaitFor(t, "the puppet's userfaultfd to show the faults still pending", 5*time.Second, func() bool {
					n, err := xpPending(r.pid, childFD)
					return err == nil && n >= 1
				})
				for _, c := range reads {
					if c.Done() {
						t.Fatal("a faulting thread went on although the puppet still holds the userfaultfd")
					}
				}
				if !xpHasFlag(xpVMFlags(t, r.pid, r.addr), "um") {
					t.Fatal("area unregistered although the puppet still holds the userfaultfd")
				}
				r.do(puppet.Request{Op: "close-uffd"})
			}
			for i, c := range reads {
				rep, _, err := c.Wait(10 * time.Second)
				if err != nil {
					t.Fatalf("blocked thread %d not woken by the last close: %v", i, err)
				}
				if string(rep.Data) != string(make([]byte, 64)) {
					t.Fatalf("woken thread %d read % x; want zeros", i, rep.Data)
				}
			}
			if xpHasFlag(xpVMFlags(t, r.pid, r.addr), "um") {
				t.Fatal("area still registered (um in VmFlags) after the last close")
			}
		})
	}
}

// TestCrossProcessExactAddressThreadID: with EXACT_ADDRESS the fault address keeps its in-page
// offset (else it is aligned to the page, the huge page on hugetlb); with THREAD_ID the message
// names the faulting thread of the puppet (else 0).
func TestCrossProcessExactAddressThreadID(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		for _, features := range []uffd.Feature{0, uffd.FeatureExactAddress | uffd.FeatureThreadID} {
			name := "plain"
			if features != 0 {
				name = "exact-address+thread-id"
			}
			t.Run(name, func(t *testing.T) {
				const seed = 41
				ps := evPageSize(t, k)
				r := newRemote(t, remoteOpts{kind: k, size: 2 * ps, mode: uffd.ModeMissing, features: features})
				src := source(t, 2*ps, seed)
				rd, err := r.fd.NewReader()
				if err != nil {
					t.Fatal(err)
				}
				off := ps + ps/2 + 77
				c := r.start(puppet.Request{Op: "ev-write-tid", Off: off, Data: []byte{0xab}})

				r.fd.SetReadDeadline(time.Now().Add(10 * time.Second))
				msgs := make([]uffd.Msg, 8)
				n, err := rd.Read(msgs)
				r.fd.SetReadDeadline(time.Time{})
				if err != nil {
					t.Fatalf("no fault message: %v", err)
				}
				pf := msgs[0].Pagefault()
				if msgs[0].Event() != uffd.EventPagefault || pf.Flags != uffd.FaultWrite {
					t.Fatalf("message %v, want a MISSING write fault", &msgs[0])
				}
				wantAddr := r.addr + uintptr(ps)
				if features&uffd.FeatureExactAddress != 0 {
					wantAddr = r.addr + uintptr(off)
				}
				if pf.Address != wantAddr {
					t.Errorf("fault address %#x, want %#x (page at %#x, offset %d)", pf.Address, wantAddr, r.addr+uintptr(ps), off-ps)
				}
				if features&uffd.FeatureThreadID == 0 {
					if pf.TID != 0 {
						t.Errorf("TID %d without THREAD_ID, want 0", pf.TID)
					}
				} else if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", r.pid, pf.TID)); pf.TID == 0 || err != nil {
					t.Errorf("TID %d is not a thread of the puppet %d: %v", pf.TID, r.pid, err)
				}

				if _, err := r.fd.Copy(r.addr+uintptr(ps), addrOf(src)+uintptr(ps), uintptr(ps), 0); err != nil {
					t.Fatal(err)
				}
				rep, _, err := c.Wait(10 * time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if rep.Sigbus != 0 || len(rep.Ints) != 1 {
					t.Fatalf("write: %d SIGBUS, ints %v", rep.Sigbus, rep.Ints)
				}
				// A signal may have made the thread fault again: every message is the same fault.
				m, _ := rd.TryRead(msgs[n:])
				for _, msg := range msgs[:n+m] {
					if got := msg.Pagefault(); got.Address != pf.Address || got.TID != pf.TID {
						t.Errorf("message %v differs from the first fault %v", &msg, &msgs[0])
					}
				}
				if features&uffd.FeatureThreadID != 0 && int64(pf.TID) != rep.Ints[0] {
					t.Errorf("TID %d, but the puppet wrote from thread %d", pf.TID, rep.Ints[0])
				}
				rep = r.do(puppet.Request{Op: "read", Off: off - 1, Len: 3})
				if want := []byte{src[off-1], 0xab, src[off+1]}; string(rep.Data) != string(want) {
					t.Errorf("bytes around the write: % x, want % x", rep.Data, want)
				}
			})
		}
	})
}
