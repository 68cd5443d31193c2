//go:build linux

package uffd_test

import (
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

// checkOpError checks that err is an *uffd.OpError for op over [start, start+n) that matches
// the sentinel and the errno, and that its text names the op and the range.
func checkOpError(t *testing.T, err error, op string, start, n uintptr, sentinel error, errno unix.Errno) *uffd.OpError {
	t.Helper()
	if err == nil {
		t.Fatalf("%s [%#x, %#x) succeeded, want %v", op, start, start+n, errno)
	}
	oe := opError(t, err)
	if sentinel != nil && !errors.Is(err, sentinel) {
		t.Fatalf("%v does not match %v", err, sentinel)
	}
	if !errors.Is(err, errno) || oe.Errno != errno {
		t.Fatalf("%v: errno %v, want %v", err, oe.Errno, errno)
	}
	if oe.Op != op || oe.Start != start || oe.Len != n {
		t.Fatalf("%v: op %q range [%#x, +%#x), want %q [%#x, +%#x)", err, oe.Op, oe.Start, oe.Len, op, start, n)
	}
	text := err.Error()
	if !strings.Contains(text, op) {
		t.Fatalf("error %q does not name %s", text, op)
	}
	if n != 0 && !strings.Contains(text, fmt.Sprintf("[%#x, %#x)", start, start+n)) {
		t.Fatalf("error %q does not name the range [%#x, %#x)", text, start, start+n)
	}
	return oe
}

// The result-field contract of the resolving ioctls, as errors: partial
// progress, EEXIST on the first page, ENOENT outside a registration, EINVAL from validation (the
// kernel did not run) and from the range (it ran). Everything is issued from this process on
// the child's memory, where nothing faults.
func TestErrorContract(t *testing.T) {
	const pages = 20
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: pages * os.Getpagesize(), mode: uffd.ModeMissing})
	ps := uintptr(r.pageSize)
	src := source(t, r.size, 3)
	page := func(i int) uintptr { return r.addr + uintptr(i)*ps }
	from := func(i int) uintptr { return addrOf(src) + uintptr(i)*ps }
	// Pages 2, 6 and 18 are mapped; the rest are missing.
	for _, i := range []int{2, 6, 18} {
		if n, err := r.fd.Copy(page(i), from(i), ps, 0); err != nil || n != ps {
			t.Fatalf("COPY page %d = %d, %v", i, n, err)
		}
	}

	t.Run("partial", func(t *testing.T) {
		// COPY of pages 0-3 stops at page 2, already mapped, after two pages.
		n, err := r.fd.Copy(page(0), from(0), 4*ps, 0)
		oe := checkOpError(t, err, "UFFDIO_COPY", page(0), 4*ps, uffd.ErrPartial, unix.EAGAIN)
		if n != 2*ps || oe.Done != 2*ps || oe.Resume() != page(2) {
			t.Fatalf("partial COPY: n %#x Done %#x Resume %#x, want %#x %#x %#x", n, oe.Done, oe.Resume(), 2*ps, 2*ps, page(2))
		}
		if errors.Is(err, uffd.ErrEventsPending) || errors.Is(err, uffd.ErrExist) {
			t.Fatalf("partial COPY %v also matches another sentinel", err)
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("resume at %#x", page(2))) {
			t.Fatalf("error %q does not say where to resume", err)
		}
		// Resuming there is EEXIST: the page that stopped the copy is mapped.
		_, err = r.fd.Copy(oe.Resume(), from(2), 2*ps, 0)
		checkOpError(t, err, "UFFDIO_COPY", page(2), 2*ps, uffd.ErrExist, unix.EEXIST)
		// The same as the kernel writes it: a positive byte count with EAGAIN.
		res, errno := uffd.ResolveRaw(r.fd, "COPY", uint64(page(4)), uint64(from(4)), uint64(4*ps), 0)
		if errno != unix.EAGAIN || res != int64(2*ps) {
			t.Fatalf("raw partial COPY: result %d errno %v, want %d and EAGAIN", res, errno, 2*ps)
		}
		// ZEROPAGE stops the same way.
		n, err = r.fd.Zeropage(page(16), 4*ps, 0)
		oe = checkOpError(t, err, "UFFDIO_ZEROPAGE", page(16), 4*ps, uffd.ErrPartial, unix.EAGAIN)
		if n != 2*ps || oe.Resume() != page(18) {
			t.Fatalf("partial ZEROPAGE: n %#x Resume %#x, want %#x %#x", n, oe.Resume(), 2*ps, page(18))
		}
	})

	t.Run("exist", func(t *testing.T) {
		n, err := r.fd.Copy(page(2), from(2), 2*ps, 0)
		oe := checkOpError(t, err, "UFFDIO_COPY", page(2), 2*ps, uffd.ErrExist, unix.EEXIST)
		if n != 0 || oe.Done != 0 || oe.Resume() != page(2) {
			t.Fatalf("EEXIST: n %d Done %d, want 0", n, oe.Done)
		}
		if errors.Is(err, uffd.ErrPartial) {
			t.Fatalf("EEXIST on the first page matches ErrPartial: %v", err)
		}
		if res, errno := uffd.ResolveRaw(r.fd, "COPY", uint64(page(2)), uint64(from(2)), uint64(ps), 0); errno != unix.EEXIST || res != -int64(unix.EEXIST) {
			t.Fatalf("raw COPY over a mapped page: result %d errno %v, want -EEXIST written", res, errno)
		}
		_, err = r.fd.Zeropage(page(6), ps, 0)
		checkOpError(t, err, "UFFDIO_ZEROPAGE", page(6), ps, uffd.ErrExist, unix.EEXIST)
		_, err = r.fd.Poison(page(6), ps, 0)
		checkOpError(t, err, "UFFDIO_POISON", page(6), ps, uffd.ErrExist, unix.EEXIST)
	})

	t.Run("not-registered", func(t *testing.T) {
		if err := r.fd.Unregister(page(12), 4*ps); err != nil {
			t.Fatal(err)
		}
		_, err := r.fd.Copy(page(13), from(13), ps, 0)
		oe := checkOpError(t, err, "UFFDIO_COPY", page(13), ps, uffd.ErrNotRegistered, unix.ENOENT)
		if !strings.Contains(oe.Detail, "wake") {
			t.Fatalf("ENOENT detail %q does not advise a wake", oe.Detail)
		}
		if res, errno := uffd.ResolveRaw(r.fd, "COPY", uint64(page(13)), uint64(from(13)), uint64(ps), 0); errno != unix.ENOENT || res != -int64(unix.ENOENT) {
			t.Fatalf("raw COPY outside the registration: result %d errno %v, want -ENOENT written", res, errno)
		}
		_, err = r.fd.Zeropage(page(12), ps, 0)
		checkOpError(t, err, "UFFDIO_ZEROPAGE", page(12), ps, uffd.ErrNotRegistered, unix.ENOENT)
		_, err = r.fd.Poison(page(12), ps, 0)
		checkOpError(t, err, "UFFDIO_POISON", page(12), ps, uffd.ErrNotRegistered, unix.ENOENT)
		// The whole range must lie in one registered mapping: a COPY from registered pages
		// into unregistered ones does nothing (ENOENT, no partial progress).
		n, err := r.fd.Copy(page(10), from(10), 4*ps, 0)
		oe = checkOpError(t, err, "UFFDIO_COPY", page(10), 4*ps, uffd.ErrNotRegistered, unix.ENOENT)
		if n != 0 || oe.Done != 0 {
			t.Fatalf("COPY across the end of the registration did %#x bytes", n)
		}
		if res, errno := uffd.ResolveRaw(r.fd, "COPY", uint64(page(10)), uint64(from(10)), uint64(4*ps), 0); errno != unix.ENOENT || res != -int64(unix.ENOENT) {
			t.Fatalf("raw COPY across the end of the registration: result %d errno %v, want -ENOENT written", res, errno)
		}
		// WRITEPROTECT on a MISSING-only range is ENOENT too.
		err = r.fd.Writeprotect(page(0), ps, uffd.WriteprotectWP)
		oe = checkOpError(t, err, "UFFDIO_WRITEPROTECT", page(0), ps, uffd.ErrNotRegistered, unix.ENOENT)
		if !strings.Contains(oe.Detail, "ModeWP") {
			t.Fatalf("WRITEPROTECT ENOENT detail %q does not name the missing mode", oe.Detail)
		}
	})

	t.Run("invalid", func(t *testing.T) {
		a := page(8)
		for _, tc := range []struct {
			name   string
			call   func() error
			op     string
			start  uintptr
			n      uintptr
			detail string
			raw    []uint64 // COPY fields for ResolveRaw: dst, src, len, mode; nil: skip
		}{
			{"unaligned start", func() error { _, err := r.fd.Copy(a+8, from(8), ps, 0); return err },
				"UFFDIO_COPY", a + 8, ps, fmt.Sprintf("start %#x is not page-aligned", a+8), []uint64{uint64(a + 8), uint64(from(8)), uint64(ps), 0}},
			{"zero length", func() error { _, err := r.fd.Copy(a, from(8), 0, 0); return err },
				"UFFDIO_COPY", a, 0, "length is zero", []uint64{uint64(a), uint64(from(8)), 0, 0}},
			{"unaligned length", func() error { _, err := r.fd.Copy(a, from(8), ps+1, 0); return err },
				"UFFDIO_COPY", a, ps + 1, fmt.Sprintf("length %#x is not a multiple of the page size", ps+1), []uint64{uint64(a), uint64(from(8)), uint64(ps + 1), 0}},
			{"unknown mode bits", func() error { _, err := r.fd.Copy(a, from(8), ps, 1<<7|uffd.CopyDontWake); return err },
				"UFFDIO_COPY", a, ps, "unknown mode bits 0x80", []uint64{uint64(a), uint64(from(8)), uint64(ps), 1<<7 | 1}},
			{"zeropage mode", func() error { _, err := r.fd.Zeropage(a, ps, 1<<1); return err },
				"UFFDIO_ZEROPAGE", a, ps, "unknown mode bits 0x2", nil},
			{"poison mode", func() error { _, err := r.fd.Poison(a, ps, 1<<1); return err },
				"UFFDIO_POISON", a, ps, "unknown mode bits 0x2", nil},
			{"register mode", func() error { _, err := r.fd.Register(a, ps, 1<<3); return err },
				"UFFDIO_REGISTER", a, ps, "unknown mode bits 0x8", nil},
			{"register no mode", func() error { _, err := r.fd.Register(a, ps, 0); return err },
				"UFFDIO_REGISTER", a, ps, "", nil},
			{"wake unaligned", func() error { return r.fd.Wake(a+1, ps) },
				"UFFDIO_WAKE", a + 1, ps, fmt.Sprintf("start %#x is not page-aligned", a+1), nil},
			{"unregister zero length", func() error { return r.fd.Unregister(a, 0) },
				"UFFDIO_UNREGISTER", a, 0, "length is zero", nil},
			{"writeprotect WP|DONTWAKE", func() error { return r.fd.Writeprotect(a, ps, uffd.WriteprotectWP|uffd.WriteprotectDontWake) },
				"UFFDIO_WRITEPROTECT", a, ps, "WP and DONTWAKE together", nil},
		} {
			t.Run(tc.name, func(t *testing.T) {
				oe := checkOpError(t, tc.call(), tc.op, tc.start, tc.n, uffd.ErrInvalid, unix.EINVAL)
				if oe.Detail == "" || !strings.Contains(oe.Detail, tc.detail) {
					t.Fatalf("detail %q, want it to contain %q", oe.Detail, tc.detail)
				}
				if tc.raw != nil {
					// Validation fails before the operation runs: the result field is untouched.
					res, errno := uffd.ResolveRaw(r.fd, "COPY", tc.raw[0], tc.raw[1], tc.raw[2], tc.raw[3])
					if errno != unix.EINVAL || res != uffd.ResultUntouched {
						t.Fatalf("raw COPY: result %d errno %v, want the field untouched and EINVAL", res, errno)
					}
				}
			})
		}
		// COPY_MODE_WP on a range registered without WP: the kernel runs it and refuses the
		// range, writing -EINVAL.
		_, err := r.fd.Copy(page(9), from(9), ps, uffd.CopyWP)
		oe := checkOpError(t, err, "UFFDIO_COPY", page(9), ps, uffd.ErrInvalid, unix.EINVAL)
		if !strings.Contains(oe.Detail, "rejected for this range") {
			t.Fatalf("COPY_MODE_WP detail %q, want the one for an operation that ran", oe.Detail)
		}
		if res, errno := uffd.ResolveRaw(r.fd, "COPY", uint64(page(9)), uint64(from(9)), uint64(ps), uint64(uffd.CopyWP)); errno != unix.EINVAL || res != -int64(unix.EINVAL) {
			t.Fatalf("raw COPY_MODE_WP: result %d errno %v, want -EINVAL written", res, errno)
		}
		// CONTINUE on anonymous memory: ran, EINVAL.
		_, err = r.fd.Continue(page(9), ps, 0)
		oe = checkOpError(t, err, "UFFDIO_CONTINUE", page(9), ps, uffd.ErrInvalid, unix.EINVAL)
		if !strings.Contains(oe.Detail, "rejected for this range") {
			t.Fatalf("CONTINUE on anon detail %q, want the one for an operation that ran", oe.Detail)
		}
	})

	// Nothing above mapped a page it should not have: 2, 6 and 18 from the setup, 0-1, 4-5 and
	// 16-17 from the partial copies; none of the failed calls mapped anything.
	rep := r.do(puppet.Request{Op: "pagemap", Len: pages * r.pageSize})
	var present []int
	for i, e := range rep.Pagemap {
		if e&(1<<63) != 0 {
			present = append(present, i)
		}
	}
	if want := "[0 1 2 4 5 6 16 17 18]"; fmt.Sprint(present) != want {
		t.Fatalf("present pages %v, want %s", present, want)
	}
}

// When the process owning the memory has exited, the resolving ioctls and WRITEPROTECT fail
// with ESRCH (result field untouched), REGISTER and UNREGISTER with ENOMEM — all ErrProcessGone
// — and WAKE still succeeds.
func TestErrorProcessGone(t *testing.T) {
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 * os.Getpagesize(), mode: uffd.ModeMissing | uffd.ModeWP})
	ps := uintptr(r.pageSize)
	src := source(t, r.size, 1)
	r.p.Kill()

	_, err := r.fd.Copy(r.addr, addrOf(src), ps, 0)
	checkOpError(t, err, "UFFDIO_COPY", r.addr, ps, uffd.ErrProcessGone, unix.ESRCH)
	if res, errno := uffd.ResolveRaw(r.fd, "COPY", uint64(r.addr), uint64(addrOf(src)), uint64(ps), 0); errno != unix.ESRCH || res != uffd.ResultUntouched {
		t.Fatalf("raw COPY after exit: result %d errno %v, want the field untouched and ESRCH", res, errno)
	}
	_, err = r.fd.Zeropage(r.addr, ps, 0)
	checkOpError(t, err, "UFFDIO_ZEROPAGE", r.addr, ps, uffd.ErrProcessGone, unix.ESRCH)
	_, err = r.fd.Poison(r.addr, ps, 0)
	checkOpError(t, err, "UFFDIO_POISON", r.addr, ps, uffd.ErrProcessGone, unix.ESRCH)
	err = r.fd.Writeprotect(r.addr, ps, uffd.WriteprotectWP)
	checkOpError(t, err, "UFFDIO_WRITEPROTECT", r.addr, ps, uffd.ErrProcessGone, unix.ESRCH)

	_, err = r.fd.Register(r.addr, ps, uffd.ModeMissing)
	oe := checkOpError(t, err, "UFFDIO_REGISTER", r.addr, ps, uffd.ErrProcessGone, unix.ENOMEM)
	if !strings.Contains(oe.Detail, "exited") {
		t.Fatalf("REGISTER ENOMEM detail %q does not mention the exit", oe.Detail)
	}
	err = r.fd.Unregister(r.addr, ps)
	checkOpError(t, err, "UFFDIO_UNREGISTER", r.addr, ps, uffd.ErrProcessGone, unix.ENOMEM)

	if err := r.fd.Wake(r.addr, uintptr(r.size)); err != nil {
		t.Fatalf("WAKE after the process exited: %v, want nil", err)
	}
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	if n, err := rd.TryRead(make([]uffd.Msg, 4)); n != 0 || err != nil {
		t.Fatalf("TryRead after the process exited = %d, %v; want nothing", n, err)
	}
}
