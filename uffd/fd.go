//go:build linux

package uffd

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FD is a userfaultfd. It owns the file descriptor: Close closes it, which also wakes every
// thread blocked on a fault it was serving (they retry without it).
//
// The methods may be called from any goroutine, concurrently, Close included: an ioctl never
// runs on a closed fd, nor on another file that got the fd number after Close (it fails with
// ErrClosed instead).
type FD struct {
	file         *os.File
	fd           int
	blocking     bool
	userModeOnly bool
	origin       string
	life         fdLife
	handshaken   atomic.Bool
}

// Open creates a userfaultfd with O_CLOEXEC (and O_NONBLOCK unless opts.Blocking), trying
// /dev/userfaultfd first and the system call second. The fd still needs its handshake, [FD.API].
func Open(opts Options) (*FD, error) {
	flags := unix.O_CLOEXEC
	if !opts.Blocking {
		flags |= unix.O_NONBLOCK
	}
	if opts.UserModeOnly {
		flags |= FlagUserModeOnly
	}
	fd, origin, err := create(flags, opts.NoDevice)
	if err != nil && opts.FallbackUserModeOnly && !opts.UserModeOnly && errors.Is(err, ErrPermission) {
		fd, origin, err = create(flags|FlagUserModeOnly, opts.NoDevice)
		if err == nil {
			opts.UserModeOnly = true
		}
	}
	if err != nil {
		return nil, err
	}
	f := newFD(fd, origin, opts.Blocking)
	f.userModeOnly = opts.UserModeOnly
	return f, nil
}

func create(flags int, noDevice bool) (int, string, error) {
	var devErr error
	if !noDevice {
		dev, err := unix.Open(DevicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), reqNew, uintptr(flags))
			unix.Close(dev)
			if errno == 0 {
				return int(fd), DevicePath, nil
			}
			devErr = errno
		} else {
			devErr = err
		}
	}
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if errno == 0 {
		return int(fd), "userfaultfd(2)", nil
	}
	e := &OpError{Op: "userfaultfd", Errno: errno}
	switch errno {
	case unix.EPERM, unix.EACCES:
		e.kind = ErrPermission
		e.Detail = "needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, access to " + DevicePath +
			", or UFFD_USER_MODE_ONLY"
	case unix.ENOSYS:
		e.kind = ErrUnsupported
		e.Detail = "kernel built without CONFIG_USERFAULTFD, or blocked by seccomp"
	case unix.EINVAL:
		e.kind = ErrInvalid
		e.Detail = fmt.Sprintf("flags %#x refused", flags)
	}
	if devErr != nil {
		e.Detail += "; " + DevicePath + ": " + devErr.Error()
	}
	return -1, "", e
}

func newFD(fd int, origin string, blocking bool) *FD {
	f := &FD{fd: fd, origin: origin, blocking: blocking}
	f.life = newFDLife(blocking, f.closeNow)
	return f
}

// closeNow closes the fd once no call holds it.
func (f *FD) closeNow() error {
	if f.file == nil {
		return unix.Close(f.fd)
	}
	return f.file.Close()
}

// initFile wraps the fd in an *os.File once the handshake is done. os.NewFile registers a
// non-blocking fd with the netpoller, so Read parks the goroutine instead of a thread and Close
// wakes it. It must not happen earlier: until UFFDIO_API the kernel reports the fd as EPOLLERR,
// and the netpoller keeps that error, failing reads with "not pollable", until the fd's next event.
func (f *FD) initFile() {
	if f.file == nil {
		f.file = os.NewFile(uintptr(f.fd), "userfaultfd")
	}
}

// NewFD takes ownership of fd, an existing userfaultfd: one received from another process over
// SCM_RIGHTS (as Firecracker sends it), inherited, or from a fork event. It switches the open
// file description to non-blocking (shared with every other holder of it) unless blocking is
// true. The handshake must have been done, as it is for fds received from a VMM; an fd without
// it is refused.
func NewFD(fd int, blocking bool) (*FD, error) {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return nil, fmt.Errorf("uffd: fd %d: %w", fd, err)
	}
	if link != "anon_inode:[userfaultfd]" {
		return nil, fmt.Errorf("uffd: fd %d is %q, not a userfaultfd", fd, link)
	}
	// A peer may send an fd it never handshook: nothing could be read from it (and the
	// netpoller would keep its EPOLLERR), so refuse it here with the reason.
	if b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd)); err == nil {
		if in, err := parseFDInfo(string(b)); err == nil && !in.Initialized {
			return nil, &OpError{Op: "NewFD", Errno: unix.EINVAL, kind: ErrInvalid,
				Detail: fmt.Sprintf("fd %d: the userfaultfd's handshake (UFFDIO_API) was never done", fd)}
		}
	}
	if err := unix.SetNonblock(fd, !blocking); err != nil {
		return nil, fmt.Errorf("uffd: fd %d: set O_NONBLOCK: %w", fd, err)
	}
	f := newFD(fd, "received", blocking)
	f.handshaken.Store(true)
	f.initFile()
	return f, nil
}

// Fd returns the file descriptor number. It stays owned by f; after Close the number may belong
// to another file.
func (f *FD) Fd() int { return f.fd }

// UserModeOnly reports whether f was created with UFFD_USER_MODE_ONLY.
func (f *FD) UserModeOnly() bool { return f.userModeOnly }

// Origin says how the fd came to be: "/dev/userfaultfd", "userfaultfd(2)" or "received".
func (f *FD) Origin() string { return f.origin }

// Close closes the userfaultfd. Threads blocked on its faults are woken and retry without it (if
// no other process holds the fd); a goroutine blocked in Read of a non-blocking fd returns
// ErrClosed, and every later call fails with ErrClosed. Calls in flight finish first: on a
// non-blocking fd Close waits for them (ioctls take microseconds), on a blocking fd the last of
// them closes the fd (a Read may wait for a message indefinitely) and Close returns nil at once.
// Closing twice returns nil.
func (f *FD) Close() error { return f.life.close() }

// API performs the UFFDIO_API handshake, enabling the features requested. It must be the first
// ioctl on a new fd and can be done once per fd: to learn what the kernel supports before
// choosing, use [SupportedFeatures], which asks on a throwaway fd.
func (f *FD) API(features Feature) (APIResult, error) {
	// The fd is wrapped in its os.File under the same reference as the ioctl, so that a racing
	// Close either closes the bare number before the handshake or the file after it.
	if !f.life.acquire() {
		return APIResult{}, &OpError{Op: "UFFDIO_API", Errno: unix.EBADF, kind: ErrClosed}
	}
	defer f.life.release()
	a := apiArg{api: APIVersion, features: uint64(features)}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(f.fd), reqAPI, uintptr(unsafe.Pointer(&a)))
	if errno != 0 {
		e := &OpError{Op: "UFFDIO_API", Errno: errno}
		switch errno {
		case unix.EINVAL:
			e.kind = ErrInvalid
			switch {
			case f.handshaken.Load():
				e.Detail = "the handshake is allowed once per fd"
			default:
				if sup, err := SupportedFeatures(); err == nil && features&^sup != 0 {
					e.kind = ErrUnsupported
					e.Detail = fmt.Sprintf("features %v not supported by this kernel", features&^sup)
				} else {
					e.Detail = "the handshake is allowed once per fd"
				}
			}
		case unix.EPERM:
			e.kind = ErrPermission
			e.Detail = "EVENT_FORK needs CAP_SYS_PTRACE"
		}
		return APIResult{}, e
	}
	f.handshaken.Store(true)
	f.initFile()
	return APIResult{Supported: Feature(a.features), Ioctls: Ioctls(a.ioctls)}, nil
}

// apiRaw issues UFFDIO_API with an arbitrary api number; tests use it to pin the kernel's checks.
func (f *FD) apiRaw(api uint64, features Feature) (apiArg, unix.Errno) {
	a := apiArg{api: api, features: uint64(features)}
	errno := f.ioctl(reqAPI, unsafe.Pointer(&a))
	return a, errno
}

// SupportedFeatures asks the kernel which features it supports, on a throwaway fd (the handshake
// works once per fd). It needs no privilege: the throwaway fd is user-mode-only where need be.
func SupportedFeatures() (Feature, error) {
	f, err := Open(Options{FallbackUserModeOnly: true})
	if err != nil {
		return 0, err
	}
	defer f.Close()
	r, err := f.API(0)
	if err != nil {
		return 0, err
	}
	return r.Supported, nil
}

// ioctl issues one ioctl on the fd, holding it open across the call; EBADF means Close has
// begun (the kernel never sees a closed number). The argument must stay alive across the call.
func (f *FD) ioctl(req uintptr, arg unsafe.Pointer) unix.Errno {
	if !f.life.acquire() {
		return unix.EBADF
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(f.fd), req, uintptr(arg))
	f.life.release() // also keeps f, and so its os.File's finalizer, alive until here
	return errno
}

// Info reads the fd's state from /proc/self/fdinfo — the only place the kernel shows the
// enabled feature set (UFFDIO_API answers with the supported set).
func (f *FD) Info() (Info, error) {
	if !f.life.acquire() {
		return Info{}, ErrClosed // the number may belong to another file by now
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", f.fd))
	f.life.release()
	if err != nil {
		return Info{}, fmt.Errorf("uffd: read fdinfo: %w", err)
	}
	return parseFDInfo(string(b))
}

// ctxInitialized is the bit the kernel keeps in ctx->features once the handshake is done.
const ctxInitialized = 1 << 31

// parseFDInfo parses the userfaultfd part of an fdinfo file:
//
//	pending:	0
//	total:	0
//	API:	aa:80000002:8000000000000003
func parseFDInfo(s string) (Info, error) {
	var in Info
	var sawAPI bool
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "pending":
			if _, err := fmt.Sscan(v, &in.Pending); err != nil {
				return Info{}, fmt.Errorf("uffd: fdinfo pending %q: %w", v, err)
			}
		case "total":
			if _, err := fmt.Sscan(v, &in.Total); err != nil {
				return Info{}, fmt.Errorf("uffd: fdinfo total %q: %w", v, err)
			}
		case "API":
			parts := strings.Split(v, ":")
			if len(parts) != 3 {
				return Info{}, fmt.Errorf("uffd: fdinfo API line %q", v)
			}
			var api, feat, ioctls uint64
			for i, p := range []*uint64{&api, &feat, &ioctls} {
				if _, err := fmt.Sscanf(parts[i], "%x", p); err != nil {
					return Info{}, fmt.Errorf("uffd: fdinfo API field %q: %w", parts[i], err)
				}
			}
			if api != APIVersion {
				return Info{}, fmt.Errorf("uffd: fdinfo API %#x, want %#x", api, APIVersion)
			}
			in.Initialized = feat&ctxInitialized != 0
			in.Enabled = Feature(feat &^ ctxInitialized)
			in.Ioctls = Ioctls(ioctls)
			sawAPI = true
		}
	}
	if !sawAPI {
		return Info{}, errors.New("uffd: fdinfo has no API line: not a userfaultfd")
	}
	return in, nil
}

var _ syscall.Conn = (*FD)(nil)

// SyscallConn gives raw access to the fd for polling it alongside other fds.
func (f *FD) SyscallConn() (syscall.RawConn, error) {
	if f.file == nil {
		return nil, errNoHandshake("SyscallConn")
	}
	return f.file.SyscallConn()
}

// errNoHandshake is the error of polling or reading an fd before its handshake.
func errNoHandshake(op string) error {
	return &OpError{Op: op, Errno: unix.EINVAL, kind: ErrInvalid, Detail: "handshake (UFFDIO_API) not done"}
}
