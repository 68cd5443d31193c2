//go:build linux

package uffd

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// resultUntouched is written into an ioctl's result field before the call. The kernel writes
// either a byte count or a negative errno there once the operation ran; finding the sentinel
// afterwards means the kernel failed before running it (validation, ESRCH, mmap_changing on
// WRITEPROTECT). No byte count or errno can equal it.
const resultUntouched = -1 << 62

// resolveErr turns the outcome of a resolving ioctl (COPY, ZEROPAGE, CONTINUE, POISON, MOVE) into
// an OpError, following the kernel's result-field contract:
//   - EAGAIN and result > 0: partial progress of result bytes;
//   - EAGAIN and result == -EAGAIN: events pending (mmap_changing);
//   - result untouched: the kernel failed before running (validation, ESRCH);
//   - result == -errno: it ran and failed on the first page.
func resolveErr(op string, start, length uintptr, mode, knownModes uint64, errno unix.Errno, result int64) *OpError {
	e := &OpError{Op: op, Start: start, Len: length, Errno: errno}
	if result > 0 {
		e.Done = uintptr(result)
	}
	ran := result != resultUntouched
	switch errno {
	case unix.EAGAIN:
		if result > 0 {
			e.kind = ErrPartial
			e.Detail = "the rest of the range needs another call"
		} else {
			e.kind = ErrEventsPending
			e.Detail = "read pending events, then retry"
		}
	case unix.EEXIST:
		e.kind = ErrExist
	case unix.EBADF:
		e.kind = ErrClosed // FD.ioctl's answer once Close has begun
	case unix.ENOENT:
		if op == "UFFDIO_MOVE" && ran {
			// For MOVE the kernel's ENOENT is a hole in the source, not a registration problem.
			e.Detail = "a source page is not mapped (MoveAllowSrcHoles counts holes as moved)"
			break
		}
		e.kind = ErrNotRegistered
		e.Detail = "not registered with this userfaultfd, or unmapped; wake the range"
	case unix.ESRCH:
		e.kind = ErrProcessGone
	case unix.EINVAL:
		e.kind = ErrInvalid
		e.Detail = invalidDetail(start, length, mode, knownModes, ran)
	case unix.EFAULT:
		if ran {
			e.Detail = "source unreadable, or no page in the page cache (CONTINUE)"
		}
	case unix.EBUSY:
		e.Detail = "source page shared (fork, KSM) or pinned"
	case unix.EINTR:
		if result > 0 {
			e.kind = ErrPartial
		}
	}
	return e
}

// invalidDetail names what was wrong with arguments the kernel answered EINVAL to. It runs only
// on the error path.
func invalidDetail(start, length uintptr, mode, knownModes uint64, ran bool) string {
	pg := uintptr(os.Getpagesize())
	switch {
	case length == 0:
		return "length is zero"
	case start%pg != 0:
		return fmt.Sprintf("start %#x is not page-aligned", start)
	case length%pg != 0:
		return fmt.Sprintf("length %#x is not a multiple of the page size", length)
	case mode&^knownModes != 0:
		return fmt.Sprintf("unknown mode bits %#x", mode&^knownModes)
	case ran:
		return "rejected for this range: huge page alignment, a mode the registration lacks (WP), " +
			"or an operation this memory type does not support"
	default:
		return "range outside the address space, or mode not allowed"
	}
}

// rangeErr builds the error of a range ioctl without a result field (REGISTER, UNREGISTER, WAKE,
// WRITEPROTECT).
func rangeErr(op string, start, length uintptr, mode, knownModes uint64, errno unix.Errno) *OpError {
	e := &OpError{Op: op, Start: start, Len: length, Errno: errno}
	switch errno {
	case unix.EBADF:
		e.kind = ErrClosed // FD.ioctl's answer once Close has begun
	case unix.EINVAL:
		e.kind = ErrInvalid
		e.Detail = invalidDetail(start, length, mode, knownModes, false)
		if op == "UFFDIO_REGISTER" && e.Detail == "range outside the address space, or mode not allowed" {
			e.Detail = "no mapping in range, a memory type this mode does not support " +
				"(MINOR on anonymous memory, regular files), or hugetlb range not huge-page aligned"
		}
		if op == "UFFDIO_WRITEPROTECT" && WriteprotectMode(mode) == WriteprotectWP|WriteprotectDontWake {
			e.Detail = "WP and DONTWAKE together"
		}
	case unix.ENOENT:
		e.kind = ErrNotRegistered
		if op == "UFFDIO_WRITEPROTECT" {
			e.Detail = "part of the range is not registered with ModeWP (the part before it may have changed)"
		}
	case unix.ESRCH:
		e.kind = ErrProcessGone
	case unix.ENOMEM:
		if op == "UFFDIO_REGISTER" || op == "UFFDIO_UNREGISTER" {
			e.kind = ErrProcessGone
			e.Detail = "the process owning the memory has exited (or out of memory)"
		}
	case unix.EAGAIN:
		e.kind = ErrEventsPending
	case unix.EBUSY:
		e.Detail = "a mapping in the range is registered with another userfaultfd"
	case unix.EPERM:
		e.kind = ErrPermission
		e.Detail = "a mapping in the range is not writable (MAP_SHARED of a read-only file, sealed memfd)"
	}
	return e
}
