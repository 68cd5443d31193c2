//go:build linux

package probe_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/probe"
	"github.com/faultline-go/faultline/uffd"
)

// wantRegister is the registration matrix as Linux 6.18 answers it: the ioctls
// UFFDIO_REGISTER answers per memory kind, for the modes MISSING, WP, MINOR, MISSING|WP and
// MINOR|WP in that order; 0 means the kernel refuses the mode with EINVAL.
var (
	probeModes   = []uffd.RegisterMode{uffd.ModeMissing, uffd.ModeWP, uffd.ModeMinor, uffd.ModeMissing | uffd.ModeWP, uffd.ModeMinor | uffd.ModeWP}
	wantRegister = map[string][5]uffd.Ioctls{
		"anon":            {0x13c, 0x17c, 0, 0x17c, 0},
		"shmem":           {0x13c, 0x17c, 0x1bc, 0x17c, 0x1fc},
		"shmem-private":   {0x13c, 0x17c, 0x1bc, 0x17c, 0x1fc},
		"hugetlb":         {0x10c, 0x14c, 0x18c, 0x14c, 0x1cc},
		"hugetlb-private": {0x10c, 0x14c, 0x18c, 0x14c, 0x1cc},
	}
)

// checkRegisterMatrix compares the probe's matrix with wantRegister, entry by entry.
func checkRegisterMatrix(t *testing.T, s *probe.Support) {
	t.Helper()
	if got, want := len(s.Register), len(memory.Kinds)*len(probeModes); got != want {
		t.Errorf("register matrix has %d entries, want %d", got, want)
	}
	for _, k := range memory.Kinds {
		want, ok := wantRegister[k.String()]
		if !ok {
			t.Fatalf("no expectation for kind %v", k)
		}
		for i, mode := range probeModes {
			r, ok := s.Registration(k.String(), mode)
			switch {
			case !ok:
				t.Errorf("%v %v: not in the report", k, mode)
			case want[i] == 0 && (r.OK || r.Errno != "EINVAL"):
				t.Errorf("%v %v: ok=%v errno=%q ioctls %v, want EINVAL", k, mode, r.OK, r.Errno, r.Ioctls)
			case want[i] != 0 && (!r.OK || r.Ioctls.Ioctls != want[i]):
				t.Errorf("%v %v: ok=%v ioctls %#x (%v) err %q, want %#x", k, mode, r.OK, uint64(r.Ioctls.Ioctls), r.Ioctls, r.Error, uint64(want[i]))
			}
			if ok && r.Mode != mode.String() {
				t.Errorf("%v %v: mode name %q", k, mode, r.Mode)
			}
		}
	}
}

func TestProbe(t *testing.T) {
	if os.Geteuid() != 0 {
		kerneltest.Require(t, "TestProbe expects root (CAP_SYS_PTRACE, access to /dev/userfaultfd)")
	}
	s, err := probe.Run()
	if err != nil {
		t.Fatal(err)
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	if want := unix.ByteSliceToString(uts.Release[:]); s.Kernel.Release != want || want == "" {
		t.Errorf("kernel release %q, want %q", s.Kernel.Release, want)
	}
	if s.Kernel.PageSize != os.Getpagesize() {
		t.Errorf("page size %d, want %d", s.Kernel.PageSize, os.Getpagesize())
	}
	if hs, _ := memory.HugePageSize(); s.Kernel.HugePageSize != hs || s.HugePages.Size != hs {
		t.Errorf("huge page size %d / pool size %d, want %d", s.Kernel.HugePageSize, s.HugePages.Size, hs)
	}

	c := s.Creation
	if !c.Device.Exists || !c.Device.Open.OK || !c.Device.New.OK || c.Device.Mode == "" || c.Device.Mode[0] != 'c' {
		t.Errorf("/dev/userfaultfd not reported usable: %+v", c.Device)
	}
	if c.Device.MiscMinor <= 0 {
		t.Errorf("misc minor %d, want the device's minor from /proc/misc", c.Device.MiscMinor)
	}
	if !c.Syscall.OK || !c.SyscallUserModeOnly.OK {
		t.Errorf("syscall %+v, user-mode-only %+v: want both to work for root", c.Syscall, c.SyscallUserModeOnly)
	}
	if !c.CapSysPtrace || c.EUID != 0 {
		t.Errorf("cap_sys_ptrace %v euid %d, want true 0", c.CapSysPtrace, c.EUID)
	}
	if c.UnprivilegedUserfaultfd == nil {
		t.Error("vm.unprivileged_userfaultfd not reported")
	} else if b, _ := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); strings.TrimSpace(string(b)) != strconv.Itoa(*c.UnprivilegedUserfaultfd) {
		t.Errorf("vm.unprivileged_userfaultfd %d, file says %q", *c.UnprivilegedUserfaultfd, b)
	}

	f := s.Features
	if !f.Handshake.OK || f.FD != uffd.DevicePath || f.UserModeOnly {
		t.Errorf("handshake %+v on %q (user-mode-only %v), want a full fd from %s", f.Handshake, f.FD, f.UserModeOnly, uffd.DevicePath)
	}
	if !f.Supported.Has(uffd.KnownFeatures) {
		t.Errorf("supported %v lacks %v", f.Supported, uffd.KnownFeatures&^f.Supported.Feature)
	}
	if want := uffd.IoctlRegister | uffd.IoctlUnregister | uffd.IoctlAPI; f.Ioctls.Ioctls != want {
		t.Errorf("handshake ioctls %v, want %v", f.Ioctls, want)
	}
	if !f.EventFork.OK {
		t.Errorf("EVENT_FORK not enabled as root: %+v", f.EventFork)
	}

	checkRegisterMatrix(t, s)

	if !s.PagemapScan.Supported || s.PagemapScan.Errno != "EINVAL" {
		t.Errorf("PAGEMAP_SCAN %+v, want supported (EINVAL to a wrong size)", s.PagemapScan)
	}
	if s.THP.Enabled == "" || strings.ContainsAny(s.THP.Enabled, "[] ") {
		t.Errorf("THP mode %q, want the bracketed word", s.THP.Enabled)
	}
	for _, a := range s.Advice {
		if strings.Contains(a, "unprivileged_userfaultfd") || strings.Contains(a, "EVENT_FORK") || strings.Contains(a, "CONFIG_") {
			t.Errorf("advice for root on 6.18 should not say: %s", a)
		}
	}

	// JSON: stable snake_case names, sets as names plus hex, and a lossless round trip.
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var back probe.Support
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&back, s) {
		t.Errorf("JSON round trip changed the report:\n%s", b)
	}
	var raw map[string]json.RawMessage
	json.Unmarshal(b, &raw)
	for _, k := range []string{"kernel", "creation", "features", "register", "hugepages", "thp", "pagemap_scan", "advice"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("JSON lacks %q: %s", k, b)
		}
	}
	var feats struct {
		Supported struct {
			Names []string `json:"names"`
			Hex   string   `json:"hex"`
		} `json:"supported"`
		EventFork struct {
			OK bool `json:"ok"`
		} `json:"event_fork"`
	}
	json.Unmarshal(raw["features"], &feats)
	if len(feats.Supported.Names) < 17 || feats.Supported.Names[0] != "PAGEFAULT_FLAG_WP" || feats.Supported.Names[16] != "MOVE" ||
		feats.Supported.Hex != "0x1ffff" || !feats.EventFork.OK {
		t.Errorf("features JSON: %s", raw["features"])
	}
	if !bytes.Contains(raw["register"], []byte(`{"kind":"anon","mode":"MISSING","mode_bits":1,"ok":true,"ioctls":{"names":["WAKE","COPY","ZEROPAGE","MOVE","POISON"],"hex":"0x13c"}}`)) {
		t.Errorf("register JSON lacks the anon MISSING entry in the documented shape: %s", raw["register"])
	}
}

// Probe keeps no state: after two probes in a row the process has the same fds open and no
// probe mapping left.
func TestProbeNoLeak(t *testing.T) {
	// A first probe may initialise runtime state that stays (the netpoller's epoll fd): count
	// after it.
	if _, err := probe.Run(); err != nil {
		t.Fatal(err)
	}
	before := kerneltest.OpenFDs(t)
	for range 2 {
		if _, err := probe.Run(); err != nil {
			t.Fatal(err)
		}
	}
	after := kerneltest.OpenFDs(t)
	// No fd the probes opened may remain. (An fd of an earlier test may close meanwhile, say a
	// puppet's control socket, so compare sets, not counts.)
	for fd, link := range after {
		if before[fd] != link {
			t.Errorf("fd %s (%s) opened by the probes is still open:\nbefore %v\nafter  %v", fd, link, before, after)
		}
	}
	for fd, link := range after {
		if strings.Contains(link, "userfaultfd") || strings.Contains(link, "faultline-") {
			t.Errorf("fd %s left open: %s", fd, link)
		}
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(maps, []byte("memfd:faultline-")) {
		t.Errorf("a probe mapping is left:\n%s", maps)
	}
}

const probeChildEnv = "FAULTLINE_PROBE_CHILD"
const probeMarker = "FAULTLINE-PROBE-JSON: "

// The probe as an unprivileged user (uid/gid 65534, no capabilities) with the defaults of
// Linux 6.18 (vm.unprivileged_userfaultfd=0, /dev/userfaultfd 0600 root): only user-mode-only
// fds, no EVENT_FORK, the same registration matrix, and advice naming the sysctl.
func TestProbeUnprivileged(t *testing.T) {
	if os.Getenv(probeChildEnv) == "1" {
		// The child: run as uid 65534 by the test below.
		s, err := probe.Run()
		if err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		os.Stdout.WriteString(probeMarker + string(b) + "\n")
		return
	}
	if os.Geteuid() != 0 {
		kerneltest.Require(t, "switching to uid 65534 needs root")
	}
	if b, _ := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); strings.TrimSpace(string(b)) != "0" {
		kerneltest.Require(t, "vm.unprivileged_userfaultfd is not 0 here; the test checks the default policy")
	}
	if st, err := os.Stat(uffd.DevicePath); err != nil || st.Mode().Perm()&0o066 != 0 {
		kerneltest.Require(t, uffd.DevicePath+" is missing or open to non-root users here")
	}

	// go test's binary sits in a directory only root can enter: copy it where uid 65534 can
	// run it.
	dir, err := os.MkdirTemp("", "faultline-probe-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "probe.test")
	copyFile(t, self, bin, 0o755)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^TestProbeUnprivileged$", "-test.count=1")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), probeChildEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("probe as uid 65534: %v\n%s", err, out)
	}
	var s *probe.Support
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if j, ok := strings.CutPrefix(sc.Text(), probeMarker); ok {
			s = new(probe.Support)
			if err := json.Unmarshal([]byte(j), s); err != nil {
				t.Fatalf("child's report: %v\n%s", err, j)
			}
		}
	}
	if s == nil {
		t.Fatalf("child printed no report:\n%s", out)
	}

	c := s.Creation
	if c.EUID != 65534 || c.CapSysPtrace {
		t.Errorf("child ran as euid %d with CAP_SYS_PTRACE %v, want 65534 without", c.EUID, c.CapSysPtrace)
	}
	if c.Syscall.OK || c.Syscall.Errno != "EPERM" {
		t.Errorf("userfaultfd(2) without flags: %+v, want EPERM", c.Syscall)
	}
	if !c.SyscallUserModeOnly.OK {
		t.Errorf("userfaultfd(UFFD_USER_MODE_ONLY): %+v, want it to work", c.SyscallUserModeOnly)
	}
	if !c.Device.Exists || c.Device.Open.OK || c.Device.Open.Errno != "EACCES" || c.Device.New.OK {
		t.Errorf("/dev/userfaultfd: %+v, want present but EACCES", c.Device)
	}
	if c.Full() || !c.Any() {
		t.Errorf("Full %v Any %v, want user-mode-only fds only", c.Full(), c.Any())
	}
	f := s.Features
	if !f.Handshake.OK || !f.UserModeOnly || !f.Supported.Has(uffd.KnownFeatures) {
		t.Errorf("handshake %+v user-mode-only %v supported %v: want a user-mode-only fd with every feature", f.Handshake, f.UserModeOnly, f.Supported)
	}
	if f.EventFork.OK || f.EventFork.Errno != "EPERM" {
		t.Errorf("EVENT_FORK: %+v, want EPERM", f.EventFork)
	}
	checkRegisterMatrix(t, s)
	var sysctl, fork bool
	for _, a := range s.Advice {
		sysctl = sysctl || strings.Contains(a, "vm.unprivileged_userfaultfd=1") && strings.Contains(a, "CAP_SYS_PTRACE") && strings.Contains(a, uffd.DevicePath)
		fork = fork || strings.Contains(a, "EVENT_FORK")
	}
	if !sysctl || !fork {
		t.Errorf("advice should name the sysctl, %s and CAP_SYS_PTRACE (%v), and EVENT_FORK (%v):\n%s", uffd.DevicePath, sysctl, fork, strings.Join(s.Advice, "\n"))
	}
}

func copyFile(t *testing.T, from, to string, perm os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(to, perm); err != nil {
		t.Fatal(err)
	}
}
