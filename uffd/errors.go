package uffd

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
)

// Errors callers branch on with errors.Is. Every error returned by an [FD] operation is an
// [*OpError] that matches one of these (where one applies) and also the raw syscall.Errno.
var (
	// ErrPartial: the operation did part of the range (OpError.Done bytes) and stopped; resume
	// at OpError.Resume(). The kernel reports this as EAGAIN with a positive result field.
	ErrPartial = errors.New("uffd: stopped part-way")
	// ErrEventsPending: a non-cooperative event (REMOVE, UNMAP, REMAP, FORK) is in flight and the
	// memory layout may be changing; read the pending events and retry. The kernel keeps
	// refusing until the thread that raised the event runs again, a little after the event is
	// read: retry after each read, never spin without reading. The kernel reports this as EAGAIN
	// with the result field set to -EAGAIN, or (WRITEPROTECT) with no result field.
	ErrEventsPending = errors.New("uffd: events pending, layout changing")
	// ErrExist: the first page of the range is already mapped (EEXIST). For a fault handler this
	// means the fault is resolved: wake the range and move on.
	ErrExist = errors.New("uffd: page already mapped")
	// ErrNotRegistered: the range is not (or no longer) registered with this userfaultfd, or is
	// unmapped (ENOENT). After it, wake the range: a thread may sleep on a fault that raced with
	// the unregistration.
	ErrNotRegistered = errors.New("uffd: range not registered")
	// ErrProcessGone: the process whose memory this userfaultfd serves has exited (ESRCH, or
	// ENOMEM from REGISTER/UNREGISTER).
	ErrProcessGone = errors.New("uffd: process gone")
	// ErrInvalid: the kernel rejected the arguments (EINVAL); OpError.Detail says what was wrong.
	ErrInvalid = errors.New("uffd: invalid argument")
	// ErrUnsupported: this kernel does not offer what was asked (an unknown feature bit, an ioctl
	// or mode the memory type does not support).
	ErrUnsupported = errors.New("uffd: not supported by this kernel or memory type")
	// ErrPermission: the caller lacks the privilege (EPERM/EACCES); OpError.Detail gives advice.
	ErrPermission = errors.New("uffd: permission denied")
	// ErrClosed: the FD was closed (an *OpError of a closed FD also matches unix.EBADF).
	ErrClosed = os.ErrClosed
)

// OpError describes a failed userfaultfd operation: which one, on which range, how far it got
// and why. It matches the package's sentinel errors and the underlying syscall.Errno with errors.Is.
type OpError struct {
	Op    string        // the ioctl, e.g. "UFFDIO_COPY"
	Start uintptr       // the destination range
	Len   uintptr       //
	Done  uintptr       // bytes completed before the failure (partial progress)
	Errno syscall.Errno // the errno as the kernel returned it
	// Detail explains the failure where the package can tell more than the errno: which
	// argument was invalid, whether the kernel ran the operation at all, advice on privileges.
	Detail string
	kind   error // one of the sentinels, or nil
}

func (e *OpError) Error() string {
	var b strings.Builder
	b.WriteString("uffd: ")
	b.WriteString(e.Op)
	if e.Len != 0 || e.Start != 0 {
		fmt.Fprintf(&b, " [%#x, %#x)", e.Start, e.Start+e.Len)
	}
	if e.Done != 0 {
		fmt.Fprintf(&b, ": %d of %d bytes done, resume at %#x", e.Done, e.Len, e.Start+e.Done)
	}
	b.WriteString(": ")
	b.WriteString(e.Errno.Error())
	if e.Detail != "" {
		b.WriteString(" (")
		b.WriteString(e.Detail)
		b.WriteString(")")
	}
	return b.String()
}

// Unwrap lets errors.Is match both the sentinel (ErrExist, ...) and the errno (unix.EEXIST, ...).
func (e *OpError) Unwrap() []error {
	if e.kind == nil {
		return []error{e.Errno}
	}
	return []error{e.kind, e.Errno}
}

// Resume is the address at which to retry after partial progress.
func (e *OpError) Resume() uintptr { return e.Start + e.Done }
