// Package probe reports what userfaultfd can do on this machine, for this caller: the ways to
// create a userfaultfd, the features the kernel offers, which register modes each kind of memory
// accepts and the ioctls it then offers, the hugepage pool, THP, PAGEMAP_SCAN, and concrete
// advice for whatever is missing. It is what `faultline probe` prints. The report's types are
// portable; [Run] probes on Linux only and fails with [uffd.ErrUnsupported] elsewhere.
package probe

import (
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/faultline-go/faultline/uffd"
)

// Support is what [Run] found out about userfaultfd on this machine, for this caller. It
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

// Attempt is the outcome of one thing Run tried.
type Attempt struct {
	OK    bool   `json:"ok"`
	Errno string `json:"errno,omitempty"` // the errno's name ("EPERM") when it failed with one
	Error string `json:"error,omitempty"` // the full error when it failed
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
	Kind     string            `json:"kind"`      // as memory.Kind prints it: "anon", "hugetlb-private"
	Mode     string            `json:"mode"`      // "MISSING|WP"
	ModeBits uffd.RegisterMode `json:"mode_bits"` // the same as a number
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

// FeatureSet is a [uffd.Feature] set that marshals to JSON as {"names": [...], "hex": "0x..."}.
type FeatureSet struct{ uffd.Feature }

func (s FeatureSet) MarshalJSON() ([]byte, error) {
	names := []string{}
	s.Each(func(f uffd.Feature) { names = append(names, f.Name()) })
	return json.Marshal(bitsJSON{Names: names, Hex: fmt.Sprintf("%#x", uint64(s.Feature))})
}

func (s *FeatureSet) UnmarshalJSON(b []byte) error {
	v, err := unmarshalBits(b)
	s.Feature = uffd.Feature(v)
	return err
}

// IoctlSet is a [uffd.Ioctls] set that marshals to JSON as {"names": [...], "hex": "0x..."}.
type IoctlSet struct{ uffd.Ioctls }

func (s IoctlSet) MarshalJSON() ([]byte, error) {
	names := []string{}
	for v := uint64(s.Ioctls); v != 0; v &= v - 1 {
		names = append(names, uffd.Ioctls(v&-v).String())
	}
	return json.Marshal(bitsJSON{Names: names, Hex: fmt.Sprintf("%#x", uint64(s.Ioctls))})
}

func (s *IoctlSet) UnmarshalJSON(b []byte) error {
	v, err := unmarshalBits(b)
	s.Ioctls = uffd.Ioctls(v)
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

// Modes are the register modes [Run] tries on every memory kind.
var Modes = []uffd.RegisterMode{uffd.ModeMissing, uffd.ModeWP, uffd.ModeMinor, uffd.ModeMissing | uffd.ModeWP, uffd.ModeMinor | uffd.ModeWP}

// Registration returns the matrix entry for a memory kind (as memory.Kind prints it) and mode.
func (s *Support) Registration(kind string, mode uffd.RegisterMode) (RegisterResult, bool) {
	for _, r := range s.Register {
		if r.Kind == kind && r.ModeBits == mode {
			return r, true
		}
	}
	return RegisterResult{}, false
}
