//go:build linux

package probe

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// Run reports what userfaultfd can do here: the kernel, the ways this caller can create a
// userfaultfd, the features the kernel offers, which register modes each kind of memory accepts
// and the ioctls the kernel then offers, the hugepage pool, THP, PAGEMAP_SCAN, and advice for
// whatever is missing.
//
// Every handshake happens on a throwaway fd (UFFDIO_API works once per fd). The registration
// matrix maps a fresh area per memory kind in this process, registers it on a throwaway fd in
// each mode, unregisters and unmaps it; the area is never read or written, so no fault can
// happen. Hugetlb areas are mapped MAP_NORESERVE, so this works with an empty pool. Run keeps
// no state and leaves no fd open; each call probes afresh.
//
// Failures of the things tried are part of the report, not errors: Run returns an error only
// when the report cannot be made at all.
func Run() (*Support, error) {
	s := &Support{Advice: []string{}}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return nil, fmt.Errorf("probe: uname: %w", err)
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
	c.SyscallUserModeOnly = try(unix.O_CLOEXEC | unix.O_NONBLOCK | uffd.FlagUserModeOnly)
	if b, err := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			c.UnprivilegedUserfaultfd = &v
		}
	}
	c.CapSysPtrace = hasCapEff(unix.CAP_SYS_PTRACE)
	return c
}

func probeDevice() DeviceProbe {
	d := DeviceProbe{Path: uffd.DevicePath, MiscMinor: miscMinor("userfaultfd")}
	st, err := os.Stat(uffd.DevicePath)
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
	dev, err := unix.Open(uffd.DevicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		d.Open = attempt(&os.PathError{Op: "open", Path: uffd.DevicePath, Err: err})
		d.New = Attempt{Error: "device not opened"}
		return d
	}
	defer unix.Close(dev)
	d.Open = Attempt{OK: true}
	fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), uffd.RequestNew, uintptr(unix.O_CLOEXEC|unix.O_NONBLOCK))
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
func openThrowaway() (*uffd.FD, error) {
	return uffd.Open(uffd.Options{FallbackUserModeOnly: true, Blocking: true})
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
	_, err = f.API(uffd.FeatureEventFork)
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
		for _, mode := range Modes {
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
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uffd.RequestPagemapScan, uintptr(unsafe.Pointer(&arg)))
	p := PagemapScanProbe{Supported: errno == unix.EINVAL}
	if errno != 0 {
		p.Errno = errnoName(errno)
	}
	return p
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
