//go:build linux

package uffd_test

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// The creation paths of a userfaultfd: the system call and the misc device.
var creationPaths = []struct {
	name     string
	noDevice bool
	origin   string
}{
	{"syscall", true, "userfaultfd(2)"},
	{"device", false, uffd.DevicePath},
}

// openFD opens a userfaultfd in this process and closes it at the end of the test.
func openFD(t *testing.T, o uffd.Options) *uffd.FD {
	t.Helper()
	f, err := uffd.Open(o)
	if err != nil {
		requireKernel(t, "cannot create a userfaultfd: "+err.Error())
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// localPages maps n private anonymous pages in this process, unmapped at the end of the test.
// Tests may register them only where nothing in this process touches them.
func localPages(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n*os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// opError returns err as an *uffd.OpError or fails the test.
func opError(t *testing.T, err error) *uffd.OpError {
	t.Helper()
	var oe *uffd.OpError
	if !errors.As(err, &oe) {
		t.Fatalf("error %v (%T) is not an *uffd.OpError", err, err)
	}
	return oe
}

// Port of the selftests' "UFFDIO_API (with syscall)" and "UFFDIO_API (with /dev/userfaultfd)":
// a wrong api number and an unknown feature fail without using up the handshake, features 0
// succeeds, and a second handshake fails.
func TestAPI(t *testing.T) {
	for _, cp := range creationPaths {
		t.Run(cp.name, func(t *testing.T) {
			f := openFD(t, uffd.Options{NoDevice: cp.noDevice})
			if got := f.Origin(); got != cp.origin {
				t.Fatalf("Origin() = %q, want %q", got, cp.origin)
			}
			if f.UserModeOnly() {
				t.Fatal("UserModeOnly() = true for a default fd")
			}
			info, err := f.Info()
			if err != nil {
				t.Fatal(err)
			}
			if info.Initialized || info.Enabled != 0 {
				t.Fatalf("before the handshake fdinfo says %+v, want not initialized", info)
			}

			// api != UFFD_API: EINVAL and the kernel zeroes the whole struct.
			api, feat, ioctls, err := uffd.APIRaw(f, 0xab, 0)
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("UFFDIO_API with api 0xab: %v, want EINVAL", err)
			}
			if api != 0 || feat != 0 || ioctls != 0 {
				t.Fatalf("UFFDIO_API with api 0xab left api %#x features %#x ioctls %#x, want all zero", api, feat, ioctls)
			}

			// A feature bit the kernel does not know: EINVAL, struct zeroed.
			api, feat, ioctls, err = uffd.APIRaw(f, uffd.APIVersion, 1<<63)
			if !errors.Is(err, unix.EINVAL) {
				t.Fatalf("UFFDIO_API with features 1<<63: %v, want EINVAL", err)
			}
			if api != 0 || feat != 0 || ioctls != 0 {
				t.Fatalf("UFFDIO_API with features 1<<63 left api %#x features %#x ioctls %#x, want all zero", api, feat, ioctls)
			}
			for _, bad := range []uffd.Feature{1 << 63, uffd.KnownFeatures + 1} {
				_, err = f.API(bad)
				if !errors.Is(err, uffd.ErrUnsupported) && !errors.Is(err, uffd.ErrInvalid) {
					t.Fatalf("API(%v) = %v, want ErrUnsupported or ErrInvalid", bad, err)
				}
				if !errors.Is(err, unix.EINVAL) {
					t.Fatalf("API(%v) = %v, want it to match unix.EINVAL", bad, err)
				}
				if oe := opError(t, err); oe.Op != "UFFDIO_API" || oe.Detail == "" {
					t.Fatalf("API(%v): Op %q Detail %q, want UFFDIO_API and a detail", bad, oe.Op, oe.Detail)
				}
			}
			if info, err = f.Info(); err != nil || info.Initialized {
				t.Fatalf("after failed handshakes fdinfo says %+v (%v), want not initialized", info, err)
			}

			res, err := f.API(0)
			if err != nil {
				t.Fatalf("API(0): %v", err)
			}
			if !res.Supported.Has(uffd.KnownFeatures) {
				t.Fatalf("supported features %v lack %v (this machine runs 6.18)", res.Supported, uffd.KnownFeatures&^res.Supported)
			}
			if want := uffd.IoctlRegister | uffd.IoctlUnregister | uffd.IoctlAPI; res.Ioctls != want {
				t.Fatalf("API ioctls %v (%#x), want %v", res.Ioctls, uint64(res.Ioctls), want)
			}
			if info, err = f.Info(); err != nil || !info.Initialized || info.Enabled != 0 {
				t.Fatalf("after API(0) fdinfo says %+v (%v), want initialized with nothing enabled", info, err)
			}

			// Once per fd, even with features 0 (the selftest asks for PAGEFAULT_FLAG_WP).
			for _, again := range []uffd.Feature{0, uffd.FeaturePagefaultFlagWP} {
				_, err = f.API(again)
				if !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) {
					t.Fatalf("second API(%v) = %v, want ErrInvalid and EINVAL", again, err)
				}
				if d := opError(t, err).Detail; !strings.Contains(d, "once per fd") {
					t.Fatalf("second API(%v): detail %q does not say the handshake is once per fd", again, d)
				}
			}
			api, feat, ioctls, err = uffd.APIRaw(f, uffd.APIVersion, 0)
			if !errors.Is(err, unix.EINVAL) || api != 0 || feat != 0 || ioctls != 0 {
				t.Fatalf("raw second UFFDIO_API: %v, api %#x features %#x ioctls %#x; want EINVAL and a zeroed struct", err, api, feat, ioctls)
			}
		})
	}
}

// UFFD_USER_MODE_ONLY fds work on both paths, and they turn a fault raised inside the kernel
// into EFAULT instead of a message; a full fd reports the same fault and waits for it.
func TestAPIUserModeOnly(t *testing.T) {
	for _, cp := range creationPaths {
		t.Run(cp.name, func(t *testing.T) {
			for _, umo := range []bool{true, false} {
				f := openFD(t, uffd.Options{NoDevice: cp.noDevice, UserModeOnly: umo})
				if f.UserModeOnly() != umo || f.Origin() != cp.origin {
					t.Fatalf("UserModeOnly() %v Origin() %q, want %v %q", f.UserModeOnly(), f.Origin(), umo, cp.origin)
				}
				if _, err := f.API(0); err != nil {
					t.Fatalf("API(0) on user-mode-only=%v fd: %v", umo, err)
				}
				mem := localPages(t, 1)
				ps := uintptr(len(mem))
				if _, err := f.Register(addrOf(mem), ps, uffd.ModeMissing); err != nil {
					t.Fatal(err)
				}
				zero, err := os.Open("/dev/zero")
				if err != nil {
					t.Fatal(err)
				}
				defer zero.Close()
				// read(2) into the missing page faults inside the kernel (clear_user). The
				// goroutine is in a system call, so this process is not stalled by it.
				type result struct {
					n   int
					err error
				}
				done := make(chan result, 1)
				go func() {
					n, err := unix.Read(int(zero.Fd()), mem)
					done <- result{n, err}
				}()
				if umo {
					select {
					case res := <-done:
						if res.err != unix.EFAULT {
							t.Fatalf("read(2) into a registered missing page on a user-mode-only fd: n=%d err=%v, want EFAULT", res.n, res.err)
						}
					case <-time.After(10 * time.Second):
						f.Zeropage(addrOf(mem), ps, 0)
						<-done
						t.Fatal("read(2) into a registered page blocked on a user-mode-only fd")
					}
					if info, err := f.Info(); err != nil || info.Pending != 0 || info.Total != 0 {
						t.Fatalf("user-mode-only fd queued a fault: %+v (%v)", info, err)
					}
					continue
				}
				rd, err := f.NewReader()
				if err != nil {
					t.Fatal(err)
				}
				f.SetReadDeadline(time.Now().Add(10 * time.Second))
				msgs := make([]uffd.Msg, 1)
				if _, err := rd.Read(msgs); err != nil {
					f.Zeropage(addrOf(mem), ps, 0)
					<-done
					t.Fatalf("no fault message for a kernel access on a full fd: %v", err)
				}
				pf := msgs[0].Pagefault()
				if msgs[0].Event() != uffd.EventPagefault || pf.Address != addrOf(mem) || pf.Flags != uffd.FaultWrite {
					t.Fatalf("message %v, want a MISSING|WRITE fault at %#x", &msgs[0], addrOf(mem))
				}
				if _, err := f.Zeropage(addrOf(mem), ps, 0); err != nil {
					t.Fatal(err)
				}
				if res := <-done; res.err != nil || res.n != len(mem) {
					t.Fatalf("read(2) after the fault was resolved: n=%d err=%v", res.n, res.err)
				}
			}
		})
	}
}

// fdinfo shows the enabled feature set (what was requested, plus what the kernel implies),
// while UFFDIO_API answers with everything supported.
func TestAPIInfoEnabled(t *testing.T) {
	for _, tc := range []struct {
		request, enabled uffd.Feature
	}{
		{0, 0},
		{uffd.FeatureEventRemove | uffd.FeatureThreadID, uffd.FeatureEventRemove | uffd.FeatureThreadID},
		{uffd.FeatureWPAsync, uffd.FeatureWPAsync | uffd.FeatureWPUnpopulated},
		{uffd.FeatureSigbus | uffd.FeatureExactAddress | uffd.FeatureEventUnmap, uffd.FeatureSigbus | uffd.FeatureExactAddress | uffd.FeatureEventUnmap},
		// Capability bits are kept in the context as requested.
		{uffd.FeatureMissingShmem | uffd.FeaturePoison, uffd.FeatureMissingShmem | uffd.FeaturePoison},
	} {
		t.Run(tc.request.String(), func(t *testing.T) {
			f := openFD(t, uffd.Options{})
			res, err := f.API(tc.request)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Supported.Has(uffd.KnownFeatures) {
				t.Fatalf("API answered %v, want the supported set %v", res.Supported, uffd.KnownFeatures)
			}
			info, err := f.Info()
			if err != nil {
				t.Fatal(err)
			}
			if !info.Initialized || info.Enabled != tc.enabled {
				t.Fatalf("fdinfo: initialized %v enabled %v, want true and exactly %v", info.Initialized, info.Enabled, tc.enabled)
			}
			if info.Pending != 0 || info.Total != 0 {
				t.Fatalf("fresh fd has pending %d total %d", info.Pending, info.Total)
			}
		})
	}
}

// Before the handshake read(2) and every ioctl but UFFDIO_API fail with EINVAL.
func TestAPIBeforeHandshake(t *testing.T) {
	for _, cp := range creationPaths {
		t.Run(cp.name, func(t *testing.T) {
			f := openFD(t, uffd.Options{NoDevice: cp.noDevice})
			rd, err := f.NewReader()
			if err != nil {
				t.Fatal(err)
			}
			msgs := make([]uffd.Msg, 4)
			if n, err := rd.TryRead(msgs); n != 0 || !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) {
				t.Fatalf("TryRead before the handshake = %d, %v; want ErrInvalid and EINVAL", n, err)
			}
			f.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := rd.Read(msgs); n != 0 || !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) {
				t.Fatalf("Read before the handshake = %d, %v; want ErrInvalid and EINVAL", n, err)
			}
			f.SetReadDeadline(time.Time{})

			mem := localPages(t, 2)
			a, ps := addrOf(mem), uintptr(os.Getpagesize())
			src := source(t, int(ps), 1)
			calls := []struct {
				op  string
				err func() error
			}{
				{"UFFDIO_REGISTER", func() error { _, err := f.Register(a, ps, uffd.ModeMissing); return err }},
				{"UFFDIO_UNREGISTER", func() error { return f.Unregister(a, ps) }},
				{"UFFDIO_WAKE", func() error { return f.Wake(a, ps) }},
				{"UFFDIO_COPY", func() error { _, err := f.Copy(a, addrOf(src), ps, 0); return err }},
				{"UFFDIO_ZEROPAGE", func() error { _, err := f.Zeropage(a, ps, 0); return err }},
				{"UFFDIO_WRITEPROTECT", func() error { return f.Writeprotect(a, ps, uffd.WriteprotectWP) }},
				{"UFFDIO_CONTINUE", func() error { _, err := f.Continue(a, ps, 0); return err }},
				{"UFFDIO_POISON", func() error { _, err := f.Poison(a, ps, 0); return err }},
				{"UFFDIO_MOVE", func() error { _, err := f.Move(a, a+ps, ps, 0); return err }},
			}
			for _, c := range calls {
				err := c.err()
				if !errors.Is(err, unix.EINVAL) || !errors.Is(err, uffd.ErrInvalid) {
					t.Errorf("%s before the handshake: %v, want EINVAL", c.op, err)
					continue
				}
				if oe := opError(t, err); oe.Op != c.op {
					t.Errorf("%s before the handshake reported op %q", c.op, oe.Op)
				}
			}
			// The failed ioctls did not use up the handshake.
			if _, err := f.API(0); err != nil {
				t.Fatalf("API(0) after the refused ioctls: %v", err)
			}
		})
	}
}

func TestFeatureString(t *testing.T) {
	for _, tc := range []struct {
		f    uffd.Feature
		want string
	}{
		{0, "0"},
		{uffd.FeaturePagefaultFlagWP, "PAGEFAULT_FLAG_WP"},
		{uffd.FeatureEventRemove | uffd.FeatureThreadID, "EVENT_REMOVE|THREAD_ID"},
		{uffd.FeatureWPAsync | uffd.FeatureWPUnpopulated, "WP_UNPOPULATED|WP_ASYNC"},
		{uffd.FeatureMove, "MOVE"},
		{1 << 17, "0x20000"},
		{1 << 20, "0x100000"},
		{uffd.FeatureMove | 1<<20 | 1<<63, "MOVE|0x8000000000100000"},
		{uffd.KnownFeatures, "PAGEFAULT_FLAG_WP|EVENT_FORK|EVENT_REMAP|EVENT_REMOVE|MISSING_HUGETLBFS|" +
			"MISSING_SHMEM|EVENT_UNMAP|SIGBUS|THREAD_ID|MINOR_HUGETLBFS|MINOR_SHMEM|EXACT_ADDRESS|" +
			"WP_HUGETLBFS_SHMEM|WP_UNPOPULATED|POISON|WP_ASYNC|MOVE"},
	} {
		if got := tc.f.String(); got != tc.want {
			t.Errorf("Feature(%#x).String() = %q, want %q", uint64(tc.f), got, tc.want)
		}
	}
	if got := uffd.Feature(1 << 20).Name(); got != "0x100000" {
		t.Errorf("Name of unknown bit 20 = %q, want 0x100000", got)
	}
	if got := (uffd.FeatureSigbus | uffd.FeatureMove).Name(); got != "0x10080" {
		t.Errorf("Name of two bits = %q, want their hex value", got)
	}
}

func TestFeatureByName(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 17; i++ {
		f := uffd.Feature(1) << i
		name := f.Name()
		if strings.HasPrefix(name, "0x") || seen[name] {
			t.Fatalf("bit %d has name %q (unnamed or duplicate)", i, name)
		}
		seen[name] = true
		for _, spelling := range []string{name, "UFFD_FEATURE_" + name, strings.ToLower(name), "uffd_feature_" + strings.ToLower(name)} {
			got, ok := uffd.FeatureByName(spelling)
			if !ok || got != f {
				t.Errorf("FeatureByName(%q) = %v, %v; want %v", spelling, got, ok, f)
			}
		}
		if f.String() != name {
			t.Errorf("bit %d: String %q differs from Name %q", i, f.String(), name)
		}
	}
	for _, bad := range []string{"", "NOPE", "0x20000", "MOVE|POISON", "UFFD_FEATURE_"} {
		if got, ok := uffd.FeatureByName(bad); ok {
			t.Errorf("FeatureByName(%q) = %v, true; want not found", bad, got)
		}
	}
}

// A reader on an fd made by Open waits for messages after the handshake (regression: the fd
// joined Go's netpoller while the kernel still reported it EPOLLERR, and reads failed with "not
// pollable" until the first message arrived). Readers made before the handshake work too.
func TestAPIReadAfterHandshake(t *testing.T) {
	for _, cp := range creationPaths {
		t.Run(cp.name, func(t *testing.T) {
			f := openFD(t, uffd.Options{NoDevice: cp.noDevice})
			early, err := f.NewReader()
			if err != nil {
				t.Fatal(err)
			}
			if err := f.SetReadDeadline(time.Now()); !errors.Is(err, uffd.ErrInvalid) {
				t.Fatalf("SetReadDeadline before the handshake = %v, want ErrInvalid", err)
			}
			if _, err := f.API(0); err != nil {
				t.Fatal(err)
			}
			time.Sleep(5 * time.Millisecond) // let the netpoller run
			late, err := f.NewReader()
			if err != nil {
				t.Fatal(err)
			}
			msgs := make([]uffd.Msg, 1)
			for _, rd := range []*uffd.Reader{early, late} {
				if err := f.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
					t.Fatal(err)
				}
				if n, err := rd.Read(msgs); !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("Read with nothing pending = %d, %v; want os.ErrDeadlineExceeded", n, err)
				}
			}
			f.Close()
			if n, err := late.Read(msgs); n != 0 || !errors.Is(err, uffd.ErrClosed) {
				t.Fatalf("Read after Close = %d, %v; want ErrClosed", n, err)
			}
		})
	}
}

// NewFD refuses a userfaultfd whose handshake was never done: nothing could ever be read from it.
func TestNewFDRefusesNoHandshake(t *testing.T) {
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dup, err := unix.Dup(f.Fd())
	if err != nil {
		t.Fatal(err)
	}
	g, err := uffd.NewFD(dup, false)
	if err == nil {
		g.Close()
		t.Fatal("NewFD accepted a userfaultfd without handshake")
	}
	unix.Close(dup)
	if !errors.Is(err, uffd.ErrInvalid) || !strings.Contains(err.Error(), "UFFDIO_API") {
		t.Fatalf("NewFD: %v", err)
	}
}
