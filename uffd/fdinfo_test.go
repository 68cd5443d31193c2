//go:build linux

package uffd_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/uffd"
)

// allIoctls is what 6.18 prints as the ioctl set in fdinfo: UFFD_API_IOCTLS |
// UFFD_API_RANGE_IOCTLS.
const allIoctls = uffd.Ioctls(0x80000000000001ff)

func TestParseFDInfo(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want uffd.Info
	}{
		{
			// The uffd lines of a 6.18 fdinfo alone; EVENT_FORK enabled, initialized.
			name: "abi-sample",
			in:   "pending:\t0\ntotal:\t0\nAPI:\taa:80000002:80000000000001ff\n",
			want: uffd.Info{Enabled: uffd.FeatureEventFork, Initialized: true, Ioctls: allIoctls},
		},
		{
			// A whole file as 6.18 prints it, before the handshake.
			name: "full-uninitialized",
			in:   "pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t28391\npending:\t0\ntotal:\t0\nAPI:\taa:0:80000000000001ff\n",
			want: uffd.Info{Ioctls: allIoctls},
		},
		{
			// WP_ASYNC|THREAD_ID requested: the kernel adds WP_UNPOPULATED.
			name: "full-wp-async",
			in:   "pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t28391\npending:\t3\ntotal:\t5\nAPI:\taa:8000a100:80000000000001ff\n",
			want: uffd.Info{
				Enabled:     uffd.FeatureThreadID | uffd.FeatureWPUnpopulated | uffd.FeatureWPAsync,
				Initialized: true, Pending: 3, Total: 5, Ioctls: allIoctls,
			},
		},
		{
			// No trailing newline, upper-case hex, unknown lines around.
			name: "variations",
			in:   "eventfd-count: 1\npending:\t12\ntotal:\t12\nAPI:\tAA:8001FFFF:8000000000000003",
			want: uffd.Info{Enabled: uffd.KnownFeatures, Initialized: true, Pending: 12, Total: 12, Ioctls: 0x8000000000000003},
		},
		{
			// Feature bits newer than this package are kept.
			name: "future-feature",
			in:   "pending:\t0\ntotal:\t0\nAPI:\taa:80020000:1\n",
			want: uffd.Info{Enabled: 1 << 17, Initialized: true, Ioctls: 1},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := uffd.ParseFDInfo(tc.in)
			if err != nil {
				t.Fatalf("ParseFDInfo(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("ParseFDInfo(%q) =\n%+v, want\n%+v", tc.in, got, tc.want)
			}
		})
	}
}

func TestParseFDInfoMalformed(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"empty", "", "no API line"},
		// An eventfd's fdinfo: not a userfaultfd.
		{"eventfd", "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\neventfd-count:                0\neventfd-id: 1\n", "no API line"},
		{"api-two-fields", "pending:\t0\ntotal:\t0\nAPI:\taa:80000000\n", "API line"},
		{"api-four-fields", "API:\taa:0:1ff:0\n", "API line"},
		{"api-empty", "API:\n", "API line"},
		{"api-wrong-version", "pending:\t0\ntotal:\t0\nAPI:\tab:80000000:1ff\n", "want 0xaa"},
		{"api-not-hex", "API:\taa:zz:1ff\n", "API field"},
		{"api-empty-field", "API:\taa::1ff\n", "API field"},
		{"api-overflow", "API:\taa:0:1ffffffffffffffff\n", "API field"},
		{"pending-not-number", "pending:\tmany\ntotal:\t0\nAPI:\taa:0:1ff\n", "pending"},
		{"pending-negative", "pending:\t-1\ntotal:\t0\nAPI:\taa:0:1ff\n", "pending"},
		{"pending-empty", "pending:\ntotal:\t0\nAPI:\taa:0:1ff\n", "pending"},
		{"total-not-number", "pending:\t0\ntotal:\tx\nAPI:\taa:0:1ff\n", "total"},
		{"total-overflow", "pending:\t0\ntotal:\t18446744073709551616\nAPI:\taa:0:1ff\n", "total"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := uffd.ParseFDInfo(tc.in)
			if err == nil {
				t.Fatalf("ParseFDInfo(%q) = %+v, want an error", tc.in, got)
			}
			if got != (uffd.Info{}) {
				t.Errorf("ParseFDInfo(%q) returned %+v with the error, want the zero Info", tc.in, got)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ParseFDInfo(%q) = %q, want it to mention %q", tc.in, err, tc.want)
			}
		})
	}
}

// formatFDInfo prints an Info the way the kernel does.
func formatFDInfo(in uffd.Info) string {
	feat := uint64(in.Enabled)
	if in.Initialized {
		feat |= 1 << 31
	}
	return fmt.Sprintf("pending:\t%d\ntotal:\t%d\nAPI:\taa:%x:%x\n", in.Pending, in.Total, feat, uint64(in.Ioctls))
}

func FuzzFDInfo(f *testing.F) {
	f.Add("pending:\t0\ntotal:\t0\nAPI:\taa:80000002:80000000000001ff\n")
	f.Add("pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t28391\npending:\t0\ntotal:\t0\nAPI:\taa:0:80000000000001ff\n")
	f.Add("pending:\t3\ntotal:\t5\nAPI:\taa:8000a100:80000000000001ff\n")
	f.Add("API:\taa:zz:1ff\n")
	f.Add("API:aa:1:2\nAPI:aa:3:4")
	f.Add("pending:\t-1\n")
	f.Fuzz(func(t *testing.T, s string) {
		in, err := uffd.ParseFDInfo(s)
		if err != nil {
			if in != (uffd.Info{}) {
				t.Fatalf("error %v with non-zero Info %+v", err, in)
			}
			return
		}
		// Whatever parsed prints back, as the kernel would, to something that parses the same.
		again, err := uffd.ParseFDInfo(formatFDInfo(in))
		if err != nil {
			t.Fatalf("re-parse of %+v: %v", in, err)
		}
		if again != in {
			t.Fatalf("round trip %+v -> %+v", in, again)
		}
	})
}

// Info on a real fd before and after the handshake: before it the kernel prints features 0
// (no "initialized" bit 31), which parses as Initialized false without an error.
func TestInfoHandshake(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    uffd.Options
		request uffd.Feature
		enabled uffd.Feature
	}{
		{name: "none", request: 0, enabled: 0},
		{name: "remove-threadid", request: uffd.FeatureEventRemove | uffd.FeatureThreadID,
			enabled: uffd.FeatureEventRemove | uffd.FeatureThreadID},
		// Capability bits requested are recorded as given.
		{name: "capabilities", request: uffd.FeatureMissingShmem | uffd.FeatureMove,
			enabled: uffd.FeatureMissingShmem | uffd.FeatureMove},
		// WP_ASYNC brings WP_UNPOPULATED with it (the kernel sets it at handshake).
		{name: "wp-async", request: uffd.FeatureWPAsync, enabled: uffd.FeatureWPAsync | uffd.FeatureWPUnpopulated},
		{name: "blocking-syscall", opts: uffd.Options{Blocking: true, NoDevice: true}, request: uffd.FeatureSigbus,
			enabled: uffd.FeatureSigbus},
		{name: "user-mode-only", opts: uffd.Options{UserModeOnly: true}, request: uffd.FeatureExactAddress,
			enabled: uffd.FeatureExactAddress},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := uffd.Open(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			before, err := f.Info()
			if err != nil {
				t.Fatalf("Info before handshake: %v", err)
			}
			if want := (uffd.Info{Ioctls: allIoctls}); before != want {
				t.Fatalf("Info before handshake = %+v, want %+v", before, want)
			}
			if _, err := f.API(tc.request); err != nil {
				t.Fatal(err)
			}
			after, err := f.Info()
			if err != nil {
				t.Fatalf("Info after handshake: %v", err)
			}
			if want := (uffd.Info{Enabled: tc.enabled, Initialized: true, Ioctls: allIoctls}); after != want {
				t.Fatalf("Info after API(%v) = %+v, want %+v", tc.request, after, want)
			}
		})
	}
}

// Info on a closed FD is ErrClosed, even when the fd number has been reused: it must not
// describe whatever file holds the number now.
func TestInfoAfterClose(t *testing.T) {
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.API(uffd.FeatureThreadID); err != nil {
		t.Fatal(err)
	}
	num := f.Fd()
	f.Close()
	g, err := uffd.Open(uffd.Options{}) // takes the lowest free number: usually num again
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if in, err := f.Info(); !errors.Is(err, uffd.ErrClosed) {
		t.Fatalf("Info of a closed FD (number %d, now fd %d of another uffd): %+v, %v; want ErrClosed", num, g.Fd(), in, err)
	}
}
