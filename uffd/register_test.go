//go:build linux

package uffd_test

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// tryRegister registers [off, off+n) of the child's area in the child with its current uffd and
// returns the errno (0 on success), the ioctls answered and the error text.
func tryRegister(t *testing.T, r *remote, off, n int, mode uffd.RegisterMode) (unix.Errno, uffd.Ioctls, string) {
	t.Helper()
	rep := r.do(puppet.Request{Op: "basic-register", Off: off, Len: n, Mode: uint64(mode)})
	if len(rep.Ints) != 2 {
		t.Fatalf("basic-register replied %v", rep.Ints)
	}
	return unix.Errno(rep.Ints[0]), uffd.Ioctls(rep.Ints[1]), rep.Str
}

// vmFlags returns the VmFlags of the child's mapping that contains addr, from /proc/<pid>/smaps.
func vmFlags(t *testing.T, pid int, addr uintptr) map[string]bool {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if !strings.HasSuffix(fields[0], ":") { // a mapping's header: "lo-hi perms offset dev inode path"
			var lo, hi uintptr
			if _, err := fmt.Sscanf(fields[0], "%x-%x", &lo, &hi); err != nil {
				t.Fatalf("smaps header %q: %v", line, err)
			}
			in = lo <= addr && addr < hi
			continue
		}
		if v, ok := strings.CutPrefix(line, "VmFlags:"); ok && in {
			flags := map[string]bool{}
			for _, fl := range strings.Fields(v) {
				flags[fl] = true
			}
			return flags
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	t.Fatalf("no mapping of pid %d contains %#x", pid, addr)
	return nil
}

// uffdFlags is the userfaultfd part of a mapping's VmFlags: "um" (MISSING), "uw" (WP),
// "ui" (MINOR), in that order.
func uffdFlags(t *testing.T, r *remote) string {
	t.Helper()
	fl := vmFlags(t, r.pid, r.addr)
	var out []string
	for _, k := range []string{"um", "uw", "ui"} {
		if fl[k] {
			out = append(out, k)
		}
	}
	return strings.Join(out, " ")
}

func modeFlags(m uffd.RegisterMode) string {
	var out []string
	for _, x := range []struct {
		m uffd.RegisterMode
		f string
	}{{uffd.ModeMissing, "um"}, {uffd.ModeWP, "uw"}, {uffd.ModeMinor, "ui"}} {
		if m&x.m != 0 {
			out = append(out, x.f)
		}
	}
	return strings.Join(out, " ")
}

// registerMatrix is what UFFDIO_REGISTER answers on 6.18 for every mode 0..7 (index = mode),
// per class of memory, as measured on that kernel; 0 means EINVAL.
var registerMatrix = map[string][8]uffd.Ioctls{
	//          0  MISSING  WP     M|WP   MINOR  M|MINOR WP|MINOR all
	"anon":    {0, 0x13c, 0x17c, 0x17c, 0, 0, 0, 0},
	"shmem":   {0, 0x13c, 0x17c, 0x17c, 0x1bc, 0x1bc, 0x1fc, 0x1fc},
	"hugetlb": {0, 0x10c, 0x14c, 0x14c, 0x18c, 0x18c, 0x1cc, 0x1cc},
}

func memClass(k memory.Kind) string {
	switch {
	case k == memory.Anon:
		return "anon"
	case k.Huge():
		return "hugetlb"
	}
	return "shmem"
}

// Port of the selftest "register-ioctls": every combination of modes on one page of every kind
// of memory, registered in the child. Mode 0 and MINOR on anonymous memory are EINVAL; otherwise
// the answer holds WAKE, COPY with MISSING, WRITEPROTECT with WP and CONTINUE with MINOR, and is
// exactly the 6.18 matrix. The mapping's VmFlags show the modes.
func TestRegisterIoctls(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := newRemote(t, remoteOpts{kind: k, size: ps})
		want := registerMatrix[memClass(k)]
		for m := uffd.RegisterMode(0); m < 8; m++ {
			errno, io, text := tryRegister(t, r, 0, ps, m)
			if want[m] == 0 {
				if errno != unix.EINVAL {
					t.Errorf("register %v on %v: errno %v ioctls %v, want EINVAL", m, k, errno, io)
				} else if !strings.Contains(text, "UFFDIO_REGISTER") {
					t.Errorf("register %v on %v: error %q does not name the op", m, k, text)
				}
				if got := uffdFlags(t, r); got != "" {
					t.Errorf("after the refused register %v VmFlags show %q", m, got)
				}
				continue
			}
			if errno != 0 {
				t.Errorf("register %v on %v: %s", m, k, text)
				continue
			}
			// The selftest's check...
			need := uffd.IoctlWake
			if m&uffd.ModeMissing != 0 {
				need |= uffd.IoctlCopy
			}
			if m&uffd.ModeWP != 0 {
				need |= uffd.IoctlWriteprotect
			}
			if m&uffd.ModeMinor != 0 {
				need |= uffd.IoctlContinue
			}
			if !io.Has(need) {
				t.Errorf("register %v on %v answered %v, lacks %v", m, k, io, need&^io)
			}
			// ...and the exact 6.18 answer.
			if io != want[m] {
				t.Errorf("register %v on %v answered %v (%#x), want %v (%#x)", m, k, io, uint64(io), want[m], uint64(want[m]))
			}
			if got := uffdFlags(t, r); got != modeFlags(m) {
				t.Errorf("register %v on %v: VmFlags show %q, want %q", m, k, got, modeFlags(m))
			}
			r.do(puppet.Request{Op: "unregister", Off: 0, Len: ps})
			if got := uffdFlags(t, r); got != "" {
				t.Errorf("after unregister VmFlags still show %q", got)
			}
		}
	})
}

// Registering a registered range again on the same uffd replaces its modes — unless the new
// modes are a subset of the old ones: then the kernel leaves the mapping as it is (it skips
// mappings that already have every requested mode), though it answers for the requested modes.
// Unregistering clears them all.
func TestRegisterReplacesMode(t *testing.T) {
	const (
		M  = uffd.ModeMissing
		WP = uffd.ModeWP
		MI = uffd.ModeMinor
	)
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := newRemote(t, remoteOpts{kind: k, size: 2 * ps})
		type step struct {
			mode  uffd.RegisterMode
			flags string // VmFlags afterwards
		}
		seq := []step{
			{M, "um"},
			{WP, "uw"}, // replaced, not added
			{M, "um"},  // replaced
			{M | WP, "um uw"},
			{M, "um uw"},  // a subset: left as it was
			{WP, "um uw"}, // a subset: left as it was
		}
		if k != memory.Anon {
			seq = append(seq,
				step{MI, "ui"},
				step{WP | MI, "uw ui"},
				step{MI, "uw ui"}, // a subset
				step{M, "um"},
				step{M | MI, "um ui"},
			)
		}
		for i, s := range seq {
			io := r.register(0, 0, s.mode)
			if got := uffdFlags(t, r); got != s.flags {
				t.Fatalf("step %d, registering %v: VmFlags %q, want %q", i, s.mode, got, s.flags)
			}
			if want := registerMatrix[memClass(k)][s.mode]; io != want {
				t.Fatalf("step %d, registering %v answered %v, want %v", i, s.mode, io, want)
			}
		}
		// The mapping kept WP from an earlier registration, so WRITEPROTECT works although the
		// last answers did not offer it.
		if k == memory.Anon {
			if err := r.fd.Writeprotect(r.addr, uintptr(ps), uffd.WriteprotectWP); err != nil {
				t.Fatalf("WRITEPROTECT on a mapping that kept WP: %v", err)
			}
		}
		if err := r.fd.Unregister(r.addr, uintptr(r.size)); err != nil {
			t.Fatal(err)
		}
		if got := uffdFlags(t, r); got != "" {
			t.Fatalf("after unregister VmFlags still show %q", got)
		}
		// Unregistering again is not an error.
		if err := r.fd.Unregister(r.addr, uintptr(r.size)); err != nil {
			t.Fatalf("second unregister: %v", err)
		}
		// After a fresh MISSING registration WRITEPROTECT is refused: no mapping has WP.
		r.register(0, 0, M)
		err = r.fd.Writeprotect(r.addr, uintptr(ps), uffd.WriteprotectWP)
		if !errors.Is(err, uffd.ErrNotRegistered) || !errors.Is(err, unix.ENOENT) {
			t.Fatalf("WRITEPROTECT on a MISSING-only range: %v, want ErrNotRegistered (ENOENT)", err)
		}
	})
}

// A mapping belongs to one userfaultfd at a time: registering it with a second one is EBUSY
// until the first one lets go of it.
func TestRegisterBusy(t *testing.T) {
	kindsFor(t, []memory.Kind{memory.Anon, memory.Shmem, memory.Hugetlb}, func(t *testing.T, k memory.Kind) {
		ps, err := memory.PageSize(k)
		if err != nil {
			t.Fatal(err)
		}
		r := newRemote(t, remoteOpts{kind: k, size: 2 * ps, mode: uffd.ModeMissing})
		// A second uffd in the child. The child closes its copy of the first one, which stays
		// alive (and keeps the registration) because this process holds it.
		_, fds, err := r.p.Do(puppet.Request{Op: "uffd"})
		for _, fd := range fds {
			unix.Close(fd)
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := uffdFlags(t, r); got != "um" {
			t.Fatalf("first uffd's registration gone: VmFlags %q", got)
		}
		errno, _, text := tryRegister(t, r, 0, 0, uffd.ModeMissing)
		if errno != unix.EBUSY {
			t.Fatalf("second uffd registering the same range: errno %v (%s), want EBUSY", errno, text)
		}
		if !strings.Contains(text, "another userfaultfd") {
			t.Errorf("EBUSY error %q does not explain itself", text)
		}
		// Part of the range is enough to conflict.
		if errno, _, text = tryRegister(t, r, ps, ps, uffd.ModeWP); errno != unix.EBUSY {
			t.Fatalf("second uffd registering part of the range: errno %v (%s), want EBUSY", errno, text)
		}
		// Closing the last reference to the first uffd unregisters everything it had.
		r.fd.Close()
		if got := uffdFlags(t, r); got != "" {
			t.Fatalf("after closing the first uffd VmFlags show %q", got)
		}
		errno, io, text := tryRegister(t, r, 0, 0, uffd.ModeMissing)
		if errno != 0 || !io.Has(uffd.IoctlCopy) {
			t.Fatalf("second uffd after the first was closed: errno %v ioctls %v (%s)", errno, io, text)
		}
	})
}

// REGISTER needs at least one mapping in the range; holes between mappings are allowed.
func TestRegisterNothingMapped(t *testing.T) {
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 * os.Getpagesize()})
	ps := uintptr(r.pageSize)
	r.do(puppet.Request{Op: "munmap", Off: 3 * r.pageSize, Len: r.pageSize})
	hole := r.addr + 3*ps

	_, err := r.fd.Register(hole, ps, uffd.ModeMissing)
	if !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("register where nothing is mapped: %v, want ErrInvalid and EINVAL", err)
	}
	oe := opError(t, err)
	if oe.Op != "UFFDIO_REGISTER" || oe.Start != hole || oe.Len != ps || !strings.Contains(oe.Detail, "no mapping in range") {
		t.Fatalf("register where nothing is mapped: %+v, want op, range and a detail naming the missing mapping", oe)
	}
	if want := fmt.Sprintf("[%#x, %#x)", hole, hole+ps); !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "UFFDIO_REGISTER") {
		t.Fatalf("error %q lacks the op or the range %s", err, want)
	}
	if err := r.fd.Unregister(hole, ps); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("unregister where nothing is mapped: %v, want EINVAL", err)
	}

	// A range that covers the hole and a mapping registers the mapping.
	io, err := r.fd.Register(r.addr+2*ps, 2*ps, uffd.ModeMissing)
	if err != nil || io != registerMatrix["anon"][uffd.ModeMissing] {
		t.Fatalf("register over a mapping and a hole: %v, %v", io, err)
	}
	if fl := vmFlags(t, r.pid, r.addr+2*ps); !fl["um"] {
		t.Fatal("page before the hole not registered")
	}
	if fl := vmFlags(t, r.pid, r.addr); fl["um"] {
		t.Fatal("page outside the range registered")
	}
}
