//go:build linux

package uffd

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
)

// Support is what [Probe] found out about userfaultfd on this machine, for this caller. It
// marshals to JSON with stable snake_case field names; feature and ioctl sets appear as a list
// of names plus the hex value.
type Support struct {
	Kernel   KernelInfo   `json:"kernel"`
	Creation Creation     `json:"creation"`
	Features FeatureProbe `json:"features"`
	// Register is the registration matrix: every memory kind (anon, shmem, shmem-private,
	// hugetlb, hugetlb-private) crossed with every register mode (MISSING, WP, MINOR,
	// MISSING|WP, MINOR|WP), in that order.
	Register    []RegisterResult `json:"register"`
	HugePages   HugePageInfo     `json:"hugepages"`
	THP         THPInfo          `json:"thp"`
	PagemapScan PagemapScanProbe `json:"pagemap_scan"`
	// Advice lists concrete next steps for whatever is missing; empty when nothing is.
	Advice []string `json:"advice"`
}

// KernelInfo identifies the running kernel.
type KernelInfo struct {
	Release      string `json:"release"` // uname -r
	Machine      string `json:"machine"` // uname -m
	PageSize     int    `json:"page_size"`
	HugePageSize int    `json:"huge_page_size"` // default hugetlb page size; 0 if unknown
}

// Attempt is the outcome of one thing Probe tried.
type Attempt struct {
	OK    bool   `json:"ok"`
	Errno string `json:"errno,omitempty"` // the errno's name ("EPERM") when it failed with one
	Error string `json:"error,omitempty"` // the full error when it failed
}

func attempt(err error) Attempt {
	if err == nil {
		return Attempt{OK: true}
	}
	a := Attempt{Error: err.Error()}
	var errno unix.Errno
	if errors.As(err, &errno) {
		a.Errno = errnoName(errno)
	}
	return a
}

func errnoName(e unix.Errno) string {
	if n := unix.ErrnoName(e); n != "" {
		return n
	}
	return "errno " + strconv.Itoa(int(e))
}

// Creation tells which ways of creating a userfaultfd work for this caller.
type Creation struct {
	Device DeviceProbe `json:"device"`
	// Syscall is userfaultfd(O_CLOEXEC|O_NONBLOCK): a full fd, which also reports faults
	// raised inside the kernel.
	Syscall Attempt `json:"syscall"`
	// SyscallUserModeOnly is the same with UFFD_USER_MODE_ONLY.
	SyscallUserModeOnly Attempt `json:"syscall_user_mode_only"`
	// UnprivilegedUserfaultfd is the sysctl vm.unprivileged_userfaultfd; nil if the kernel has
	// none (before 5.2) or it cannot be read.
	UnprivilegedUserfaultfd *int `json:"unprivileged_userfaultfd"`
	EUID                    int  `json:"euid"`
	// CapSysPtrace: CAP_SYS_PTRACE is in the effective set (bit 19 of CapEff).
	CapSysPtrace bool `json:"cap_sys_ptrace"`
}

// Full reports whether this caller can create a full (not user-mode-only) userfaultfd, through
// the device or the system call.
func (c Creation) Full() bool { return c.Device.New.OK || c.Syscall.OK }

// Any reports whether this caller can create any userfaultfd at all.
func (c Creation) Any() bool { return c.Full() || c.SyscallUserModeOnly.OK }

// DeviceProbe describes /dev/userfaultfd.
type DeviceProbe struct {
	Path   string `json:"path"`
	Exists bool   `json:"exists"`
	Mode   string `json:"mode,omitempty"` // as ls prints it: "crw-------"
	Perm   string `json:"perm,omitempty"` // octal: "0600"
	UID    int    `json:"uid"`
	GID    int    `json:"gid"`
	// Open is open(2) of the device read-write.
	Open Attempt `json:"open"`
	// New is USERFAULTFD_IOC_NEW on the opened device: a full fd, whatever the sysctl says.
	New Attempt `json:"ioc_new"`
	// MiscMinor is the device's minor number in /proc/misc (major 10), or -1 if the kernel
	// lists none: with it a missing node can be created with mknod.
	MiscMinor int `json:"misc_minor"`
}

// FeatureProbe is the handshake on a throwaway fd.
type FeatureProbe struct {
	// Handshake is UFFDIO_API with no features on a throwaway fd.
	Handshake Attempt `json:"handshake"`
	// FD says how that fd was made: "/dev/userfaultfd" or "userfaultfd(2)".
	FD           string `json:"fd,omitempty"`
	UserModeOnly bool   `json:"user_mode_only"`
	// Supported is every feature the kernel offers.
	Supported FeatureSet `json:"supported"`
	// Ioctls are the ioctls the handshake reports usable on the fd itself.
	Ioctls IoctlSet `json:"ioctls"`
	// EventFork is UFFDIO_API requesting EVENT_FORK on another throwaway fd: EPERM without
	// CAP_SYS_PTRACE.
	EventFork Attempt `json:"event_fork"`
}

// RegisterResult is the outcome of UFFDIO_REGISTER on a fresh, never-touched area of one
// memory kind in one mode.
type RegisterResult struct {
	Kind     string       `json:"kind"`      // as memory.Kind prints it: "anon", "hugetlb-private"
	Mode     string       `json:"mode"`      // "MISSING|WP"
	ModeBits RegisterMode `json:"mode_bits"` // the same as a number
	Attempt
	// Ioctls the kernel answered: the ioctls usable on the range.
	Ioctls IoctlSet `json:"ioctls"`
}

// HugePageInfo is the default-size hugetlb pool.
type HugePageInfo struct {
	Size  int    `json:"size"`
	Total int    `json:"total"`
	Free  int    `json:"free"`
	Error string `json:"error,omitempty"`
}

// THPInfo is the transparent huge page policy: the bracketed word of
// /sys/kernel/mm/transparent_hugepage/{enabled,shmem_enabled}, empty if unreadable.
type THPInfo struct {
	Enabled      string `json:"enabled"`
	ShmemEnabled string `json:"shmem_enabled"`
}

// PagemapScanProbe tells whether /proc/pid/pagemap answers the PAGEMAP_SCAN ioctl (6.7), the
// way to read the dirty set of WP_ASYNC memory.
type PagemapScanProbe struct {
	Supported bool `json:"supported"`
	// Errno is the answer to a PAGEMAP_SCAN with a wrong struct size: EINVAL from a kernel that
	// has the ioctl, ENOTTY from one that has not.
	Errno string `json:"errno,omitempty"`
	Error string `json:"error,omitempty"` // /proc/self/pagemap could not be opened
}

// FeatureSet is a Feature set that marshals to JSON as {"names": [...], "hex": "0x..."}.
type FeatureSet struct{ Feature }

func (s FeatureSet) MarshalJSON() ([]byte, error) {
	names := []string{}
	s.Each(func(f Feature) { names = append(names, f.Name()) })
	return json.Marshal(bitsJSON{Names: names, Hex: fmt.Sprintf("%#x", uint64(s.Feature))})
}

func (s *FeatureSet) UnmarshalJSON(b []byte) error {
	v, err := unmarshalBits(b)
	s.Feature = Feature(v)
	return err
}

// IoctlSet is an Ioctls set that marshals to JSON as {"names": [...], "hex": "0x..."}.
type IoctlSet struct{ Ioctls }

func (s IoctlSet) MarshalJSON() ([]byte, error) {
	names := []string{}
	for v := uint64(s.Ioctls); v != 0; v &= v - 1 {
		names = append(names, Ioctls(v&-v).String())
	}
	return json.Marshal(bitsJSON{Names: names, Hex: fmt.Sprintf("%#x", uint64(s.Ioctls))})
}

func (s *IoctlSet) UnmarshalJSON(b []byte) error {
	v, err := unmarshalBits(b)
	s.Ioctls = Ioctls(v)
	return err
}

type bitsJSON struct {
	Names []string `json:"names"`
	Hex   string   `json:"hex"`
}

// unmarshalBits reads the hex field, which is authoritative (names of bits unknown to this
// package are themselves hex).
func unmarshalBits(b []byte) (uint64, error) {
	var j bitsJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return 0, err
	}
	return strconv.ParseUint(j.Hex, 0, 64)
}

// ProbeModes are the register modes [Probe] tries on every memory kind.
var ProbeModes = []RegisterMode{ModeMissing, ModeWP, ModeMinor, ModeMissing | ModeWP, ModeMinor | ModeWP}

// Registration returns the matrix entry for a memory kind (as memory.Kind prints it) and mode.
func (s *Support) Registration(kind string, mode RegisterMode) (RegisterResult, bool) {
	for _, r := range s.Register {
		if r.Kind == kind && r.ModeBits == mode {
			return r, true
		}
	}
	return RegisterResult{}, false
}

// Probe reports what userfaultfd can do here: the kernel, the ways this caller can create a
// userfaultfd, the features the kernel offers, which register modes each kind of memory accepts
// and the ioctls the kernel then offers, the hugepage pool, THP, PAGEMAP_SCAN, and advice for
// whatever is missing.
//
// Every handshake happens on a throwaway fd (UFFDIO_API works once per fd). The registration
// matrix maps a fresh area per memory kind in this process, registers it on a throwaway fd in
// each mode, unregisters and unmaps it; the area is never read or written, so no fault can
// happen. Hugetlb areas are mapped MAP_NORESERVE, so this works with an empty pool. Probe keeps
// no state and leaves no fd open; each call probes afresh.
//
// Failures of the things tried are part of the report, not errors: Probe returns an error only
// when the report cannot be made at all.
func Probe() (*Support, error) {
	s := &Support{Advice: []string{}}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return nil, fmt.Errorf("uffd: probe: uname: %w", err)
	}
	s.Kernel = KernelInfo{
		Release:  unix.ByteSliceToString(uts.Release[:]),
		Machine:  unix.ByteSliceToString(uts.Machine[:]),
		PageSize: os.Getpagesize(),
	}
	s.Kernel.HugePageSize, _ = memory.HugePageSize()

	s.Creation = probeCreation()
	s.Features = probeFeatures()
	s.Register = probeRegister()

	if h, err := memory.ReadHugePages(); err != nil {
		s.HugePages.Error = err.Error()
	} else {
		s.HugePages = HugePageInfo{Size: h.Size, Total: h.Total, Free: h.Free}
	}
	s.THP = THPInfo{
		Enabled:      readBracketed("/sys/kernel/mm/transparent_hugepage/enabled"),
		ShmemEnabled: readBracketed("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
	}
	s.PagemapScan = probePagemapScan()
	s.Advice = advise(s)
	return s, nil
}

func probeCreation() Creation {
	c := Creation{EUID: os.Geteuid(), Device: probeDevice()}
	try := func(flags int) Attempt {
		fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
		if errno != 0 {
			return attempt(os.NewSyscallError("userfaultfd", errno))
		}
		unix.Close(int(fd))
		return Attempt{OK: true}
	}
	c.Syscall = try(unix.O_CLOEXEC | unix.O_NONBLOCK)
	c.SyscallUserModeOnly = try(unix.O_CLOEXEC | unix.O_NONBLOCK | userModeOnlyFlag)
	if b, err := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			c.UnprivilegedUserfaultfd = &v
		}
	}
	c.CapSysPtrace = hasCapEff(unix.CAP_SYS_PTRACE)
	return c
}

func probeDevice() DeviceProbe {
	d := DeviceProbe{Path: DevicePath, MiscMinor: miscMinor("userfaultfd")}
	st, err := os.Stat(DevicePath)
	if err != nil {
		d.Open = attempt(err)
		d.New = Attempt{Error: "no device"}
		return d
	}
	d.Exists = true
	mode := st.Mode()
	ls := []byte(mode.Perm().String())
	switch {
	case mode&os.ModeCharDevice != 0:
		ls[0] = 'c'
	case mode&os.ModeDevice != 0:
		ls[0] = 'b'
	}
	d.Mode = string(ls)
	d.Perm = fmt.Sprintf("%04o", uint32(mode.Perm()))
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		d.UID, d.GID = int(sys.Uid), int(sys.Gid)
	}
	dev, err := unix.Open(DevicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		d.Open = attempt(&os.PathError{Op: "open", Path: DevicePath, Err: err})
		d.New = Attempt{Error: "device not opened"}
		return d
	}
	defer unix.Close(dev)
	d.Open = Attempt{OK: true}
	fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), reqNew, uintptr(unix.O_CLOEXEC|unix.O_NONBLOCK))
	if errno != 0 {
		d.New = attempt(os.NewSyscallError("USERFAULTFD_IOC_NEW", errno))
		return d
	}
	unix.Close(int(fd))
	d.New = Attempt{OK: true}
	return d
}

// miscMinor finds a misc device's minor number in /proc/misc ("257 userfaultfd"), or -1.
func miscMinor(name string) int {
	b, err := os.ReadFile("/proc/misc")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 2 && f[1] == name {
			if n, err := strconv.Atoi(f[0]); err == nil {
				return n
			}
		}
	}
	return -1
}

// hasCapEff reads the effective capability set of this process from /proc/self/status.
func hasCapEff(capability int) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && eff&(1<<capability) != 0
		}
	}
	return false
}

// openThrowaway creates a userfaultfd for one handshake: full if this caller may, else
// user-mode-only. It is blocking so that it never touches the netpoller.
func openThrowaway() (*FD, error) {
	return Open(Options{FallbackUserModeOnly: true, Blocking: true})
}

func probeFeatures() FeatureProbe {
	var p FeatureProbe
	f, err := openThrowaway()
	if err != nil {
		p.Handshake = attempt(err)
		p.EventFork = Attempt{Error: "no userfaultfd"}
		return p
	}
	p.FD, p.UserModeOnly = f.Origin(), f.UserModeOnly()
	r, err := f.API(0)
	f.Close()
	p.Handshake = attempt(err)
	p.Supported = FeatureSet{r.Supported}
	p.Ioctls = IoctlSet{r.Ioctls}

	if f, err = openThrowaway(); err != nil {
		p.EventFork = attempt(err)
		return p
	}
	_, err = f.API(FeatureEventFork)
	f.Close()
	p.EventFork = attempt(err)
	return p
}

func probeRegister() []RegisterResult {
	var out []RegisterResult
	f, fdErr := openThrowaway()
	if fdErr == nil {
		if _, err := f.API(0); err != nil {
			fdErr = err
		}
		defer f.Close()
	}
	for _, k := range memory.Kinds {
		var area *memory.Area
		mapErr := fdErr
		if mapErr == nil {
			if area, mapErr = memory.Map(k, 1, false); mapErr != nil {
				mapErr = fmt.Errorf("map %v: %w", k, mapErr)
			}
		}
		for _, mode := range ProbeModes {
			r := RegisterResult{Kind: k.String(), Mode: mode.String(), ModeBits: mode}
			if mapErr != nil {
				r.Attempt = attempt(mapErr)
				out = append(out, r)
				continue
			}
			// The area is never touched: registering memory of this process is safe as long
			// as nothing can fault on it.
			io, err := f.Register(area.Addr(), uintptr(len(area.Mem)), mode)
			r.Attempt = attempt(err)
			r.Ioctls = IoctlSet{io}
			if err == nil {
				if err := f.Unregister(area.Addr(), uintptr(len(area.Mem))); err != nil {
					r.Attempt = attempt(err)
				}
			}
			out = append(out, r)
		}
		if area != nil {
			area.Unmap()
		}
	}
	return out
}

// readBracketed returns the selected word of a sysfs policy file ("always [madvise] never").
func readBracketed(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	s := string(b)
	if i := strings.IndexByte(s, '['); i >= 0 {
		if j := strings.IndexByte(s[i:], ']'); j > 0 {
			return s[i+1 : i+j]
		}
	}
	return strings.TrimSpace(s)
}

// probePagemapScan issues PAGEMAP_SCAN with a struct whose size field is 0 instead of 96: a
// kernel with the ioctl checks the size first and answers EINVAL without doing anything; one
// without it answers ENOTTY.
func probePagemapScan() PagemapScanProbe {
	fd, err := unix.Open("/proc/self/pagemap", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return PagemapScanProbe{Error: (&os.PathError{Op: "open", Path: "/proc/self/pagemap", Err: err}).Error()}
	}
	defer unix.Close(fd)
	var arg [12]uint64 // struct pm_scan_arg, size left 0
	req := ioc(iocRead|iocWrite, 'f', 16, unsafe.Sizeof(arg))
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&arg)))
	p := PagemapScanProbe{Supported: errno == unix.EINVAL}
	if errno != 0 {
		p.Errno = errnoName(errno)
	}
	return p
}

// sinceLinux is the kernel release that introduced each feature bit.
var sinceLinux = [...]string{
	"5.7", "4.11", "4.11", "4.11", "4.11", "4.11", "4.11", "4.14", "4.14", "5.13", "5.14",
	"5.18", "5.19", "6.4", "6.6", "6.7", "6.8",
}

// featureConfigs are the kernel options without which a recent kernel still leaves out some
// features.
var featureConfigs = []struct {
	features Feature
	config   string
	what     string
}{
	{FeaturePagefaultFlagWP, "CONFIG_HAVE_ARCH_USERFAULTFD_WP", "WP mode on anonymous memory"},
	{FeatureMinorHugetlbfs | FeatureMinorShmem, "CONFIG_HAVE_ARCH_USERFAULTFD_MINOR", "MINOR mode and CONTINUE"},
	{FeatureWPHugetlbfsShmem | FeatureWPUnpopulated | FeatureWPAsync, "CONFIG_PTE_MARKER_UFFD_WP", "WP on shmem/hugetlbfs, WP_UNPOPULATED and WP_ASYNC"},
}

// advise turns what is missing in s into next steps.
func advise(s *Support) []string {
	adv := []string{}
	add := func(format string, args ...any) { adv = append(adv, fmt.Sprintf(format, args...)) }
	c := s.Creation

	if c.Syscall.Errno == "ENOSYS" || c.SyscallUserModeOnly.Errno == "ENOSYS" {
		add("userfaultfd(2) fails with ENOSYS: the kernel is built without CONFIG_USERFAULTFD, or a seccomp " +
			"filter (e.g. a container runtime's default profile) blocks the syscall; use a kernel with " +
			"CONFIG_USERFAULTFD=y and allow userfaultfd in the seccomp profile")
	}
	if !c.Full() && c.SyscallUserModeOnly.OK {
		why := "no CAP_SYS_PTRACE"
		if c.UnprivilegedUserfaultfd != nil {
			why = fmt.Sprintf("vm.unprivileged_userfaultfd=%d and %s", *c.UnprivilegedUserfaultfd, why)
		}
		if c.Device.Exists {
			why += ", " + DevicePath + " not accessible"
			if c.Device.Open.Errno != "" {
				why += " (" + c.Device.Open.Errno + ")"
			}
		}
		add("only user-mode-only fds (%s): faults raised inside the kernel (syscalls, KVM) fail with EFAULT "+
			"instead of being reported, so VMM guest memory cannot be served; set sysctl "+
			"vm.unprivileged_userfaultfd=1, or grant access to %s (chmod/ACL/udev rule), or run with CAP_SYS_PTRACE",
			why, DevicePath)
	}
	if !c.Device.Exists {
		if c.Device.MiscMinor >= 0 {
			add("%s is missing but the kernel has the device (misc 10:%d): mknod -m 0600 %s c 10 %d "+
				"(in a container, pass the device through)", DevicePath, c.Device.MiscMinor, DevicePath, c.Device.MiscMinor)
		} else {
			add("%s does not exist: the kernel (%s) is older than 6.1 or built without it (CONFIG_USERFAULTFD); "+
				"create fds with userfaultfd(2) instead", DevicePath, s.Kernel.Release)
		}
	} else if c.Device.Open.OK && !c.Device.New.OK {
		add("USERFAULTFD_IOC_NEW on %s failed (%s): the node may not be the userfaultfd misc device", DevicePath, c.Device.New.Error)
	}

	f := s.Features
	switch {
	case !f.Handshake.OK && c.Any():
		add("the UFFDIO_API handshake failed (%s): report this kernel (%s)", f.Handshake.Error, s.Kernel.Release)
	case f.Handshake.OK:
		missing := KnownFeatures &^ f.Supported.Feature
		for _, fc := range featureConfigs {
			if m := missing & fc.features; m != 0 {
				add("features %v missing, so no %s: the kernel needs %s (and Linux %s or later)",
					m, fc.what, fc.config, sinceLinux[bits.Len64(uint64(m))-1])
				missing &^= fc.features
			}
		}
		if missing != 0 {
			newest := sinceLinux[bits.Len64(uint64(missing))-1]
			add("features %v missing: the kernel (%s) is older than Linux %s", missing, s.Kernel.Release, newest)
		}
		if f.Supported.Has(FeatureEventFork) && !f.EventFork.OK {
			add("EVENT_FORK cannot be enabled (%s): it needs CAP_SYS_PTRACE at handshake; without it the "+
				"fork() children of registered memory are not followed", f.EventFork.Errno)
		}
	}

	unmappable := map[string]bool{}
	for _, r := range s.Register {
		if !r.OK && strings.HasPrefix(r.Error, "map ") && !unmappable[r.Kind] {
			unmappable[r.Kind] = true
			add("%s memory cannot be mapped (%s)", r.Kind, r.Error)
		}
	}

	h := s.HugePages
	switch {
	case h.Error != "":
		add("hugepage pool unreadable (%s): hugetlb memory is probably unsupported (CONFIG_HUGETLBFS)", h.Error)
	case h.Free == 0:
		add("no free huge pages (total %d, free %d): hugetlb memory cannot be filled (UFFDIO_COPY fails "+
			"with EEXIST); reserve some: echo N > /proc/sys/vm/nr_hugepages (N pages of %d KiB)",
			h.Total, h.Free, h.Size>>10)
	}

	if !s.PagemapScan.Supported && s.PagemapScan.Error == "" {
		add("PAGEMAP_SCAN is missing (%s): reading the dirty set of WP_ASYNC memory needs Linux 6.7", s.PagemapScan.Errno)
	}
	return adv
}
