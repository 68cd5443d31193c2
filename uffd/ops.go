//go:build linux

package uffd

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Register registers [start, start+length) in the given modes and returns the ioctls usable on
// the range (which depend on the memory type: hugetlb offers no ZEROPAGE or MOVE). Registering a
// range again on the same fd replaces its modes, except that a mapping which already has every
// requested mode is left as it is (MISSING|WP, then MISSING, keeps WP, though the answer lacks
// WRITEPROTECT): unregister first to drop a mode. Holes inside the range are allowed; at least
// one mapping must be there.
func (f *FD) Register(start, length uintptr, mode RegisterMode) (Ioctls, error) {
	a := registerArg{rng: rangeArg{uint64(start), uint64(length)}, mode: uint64(mode)}
	if errno := f.ioctl(reqRegister, unsafe.Pointer(&a)); errno != 0 {
		return 0, rangeErr("UFFDIO_REGISTER", start, length, uint64(mode), registerModes, errno)
	}
	return Ioctls(a.ioctls), nil
}

// Unregister removes the registration of [start, start+length). The kernel wakes the faults
// pending in mappings registered with ModeMissing (whatever their other modes), not those of
// mappings registered only WP or MINOR, and may miss a fault racing with it: follow it with
// [FD.Wake] on the range.
func (f *FD) Unregister(start, length uintptr) error {
	a := rangeArg{uint64(start), uint64(length)}
	if errno := f.ioctl(reqUnregister, unsafe.Pointer(&a)); errno != 0 {
		return rangeErr("UFFDIO_UNREGISTER", start, length, 0, 0, errno)
	}
	return nil
}

// Wake wakes the threads waiting on faults in [start, start+length), after resolving ioctls with
// a DONTWAKE mode, or to release threads whose fault was resolved another way.
func (f *FD) Wake(start, length uintptr) error {
	a := rangeArg{uint64(start), uint64(length)}
	if errno := f.ioctl(reqWake, unsafe.Pointer(&a)); errno != 0 {
		return rangeErr("UFFDIO_WAKE", start, length, 0, 0, errno)
	}
	return nil
}

// Copy atomically fills the missing pages [dst, dst+length) with bytes read from src in the
// caller's address space (which need not be the address space of dst) and wakes the faulting
// threads. It returns the bytes installed; on ErrPartial resume at OpError.Resume.
func (f *FD) Copy(dst, src, length uintptr, mode CopyMode) (uintptr, error) {
	a := copyArg{dst: uint64(dst), src: uint64(src), length: uint64(length), mode: uint64(mode), copy: resultUntouched}
	if errno := f.ioctl(reqCopy, unsafe.Pointer(&a)); errno != 0 {
		e := resolveErr("UFFDIO_COPY", dst, length, uint64(mode), copyModes, errno, a.copy)
		return e.Done, e
	}
	return uintptr(a.copy), nil
}

// Zeropage maps zero pages over the missing pages [start, start+length) (not on hugetlb).
func (f *FD) Zeropage(start, length uintptr, mode ZeropageMode) (uintptr, error) {
	a := zeropageArg{rng: rangeArg{uint64(start), uint64(length)}, mode: uint64(mode), zeropage: resultUntouched}
	if errno := f.ioctl(reqZeropage, unsafe.Pointer(&a)); errno != 0 {
		e := resolveErr("UFFDIO_ZEROPAGE", start, length, uint64(mode), zeropageModes, errno, a.zeropage)
		return e.Done, e
	}
	return uintptr(a.zeropage), nil
}

// Writeprotect protects [start, start+length) (mode WriteprotectWP) or removes the protection and
// wakes the writers waiting on it (mode 0). The range must be registered with ModeWP; the kernel
// applies it mapping by mapping, so on ErrNotRegistered the part before the failure has changed.
func (f *FD) Writeprotect(start, length uintptr, mode WriteprotectMode) error {
	a := writeprotectArg{rng: rangeArg{uint64(start), uint64(length)}, mode: uint64(mode)}
	if errno := f.ioctl(reqWriteprotect, unsafe.Pointer(&a)); errno != 0 {
		return rangeErr("UFFDIO_WRITEPROTECT", start, length, uint64(mode), writeprotectModes, errno)
	}
	return nil
}

// Continue maps the pages [start, start+length) that are already in the page cache (resolving
// MINOR faults) and wakes the faulting threads.
func (f *FD) Continue(start, length uintptr, mode ContinueMode) (uintptr, error) {
	a := continueArg{rng: rangeArg{uint64(start), uint64(length)}, mode: uint64(mode), mapped: resultUntouched}
	if errno := f.ioctl(reqContinue, unsafe.Pointer(&a)); errno != 0 {
		e := resolveErr("UFFDIO_CONTINUE", start, length, uint64(mode), continueModes, errno, a.mapped)
		return e.Done, e
	}
	return uintptr(a.mapped), nil
}

// Poison marks the missing pages [start, start+length) as hardware-poisoned: any later access
// raises SIGBUS (in a KVM guest, a machine check).
func (f *FD) Poison(start, length uintptr, mode PoisonMode) (uintptr, error) {
	a := poisonArg{rng: rangeArg{uint64(start), uint64(length)}, mode: uint64(mode), updated: resultUntouched}
	if errno := f.ioctl(reqPoison, unsafe.Pointer(&a)); errno != 0 {
		e := resolveErr("UFFDIO_POISON", start, length, uint64(mode), poisonModes, errno, a.updated)
		return e.Done, e
	}
	return uintptr(a.updated), nil
}

// Move moves the pages [src, src+length) to [dst, dst+length) without copying. Both must be
// private anonymous memory of the process that owns the fd, and the caller must be that process:
// from another process the kernel refuses with EINVAL.
func (f *FD) Move(dst, src, length uintptr, mode MoveMode) (uintptr, error) {
	a := moveArg{dst: uint64(dst), src: uint64(src), length: uint64(length), mode: uint64(mode), move: resultUntouched}
	if errno := f.ioctl(reqMove, unsafe.Pointer(&a)); errno != 0 {
		e := resolveErr("UFFDIO_MOVE", dst, length, uint64(mode), moveModes, errno, a.move)
		if e.Errno == unix.EINVAL && a.move == resultUntouched && e.Detail == "range outside the address space, or mode not allowed" {
			e.Detail = "MOVE must be issued by the process owning the memory; both ranges private anonymous"
		}
		return e.Done, e
	}
	return uintptr(a.move), nil
}
