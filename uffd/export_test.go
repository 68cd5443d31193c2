//go:build linux

package uffd

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Hooks for the external tests (package uffd_test). Add new ones at the end.

// APIRaw issues UFFDIO_API with an arbitrary api number and returns the struct as the kernel
// left it (api, features, ioctls) and the errno.
func APIRaw(f *FD, api uint64, features Feature) (uint64, uint64, uint64, error) {
	a, errno := f.apiRaw(api, features)
	if errno != 0 {
		return a.api, a.features, a.ioctls, errno
	}
	return a.api, a.features, a.ioctls, nil
}

// ResultUntouched is the sentinel preset in result fields.
const ResultUntouched = resultUntouched

// ResolveRaw issues one resolving ioctl (op "COPY", "ZEROPAGE", "CONTINUE", "POISON" or "MOVE")
// with the given fields and the result field preset to ResultUntouched, and returns the result
// field as the kernel left it and the errno (0 on success). dst is the range start of the range
// ioctls; src is used by COPY and MOVE only. All zeros gives the kernel selftests' all-zero struct.
func ResolveRaw(f *FD, op string, dst, src, length, mode uint64) (int64, unix.Errno) {
	switch op {
	case "COPY":
		a := copyArg{dst: dst, src: src, length: length, mode: mode, copy: resultUntouched}
		errno := f.ioctl(reqCopy, unsafe.Pointer(&a))
		return a.copy, errno
	case "ZEROPAGE":
		a := zeropageArg{rng: rangeArg{dst, length}, mode: mode, zeropage: resultUntouched}
		errno := f.ioctl(reqZeropage, unsafe.Pointer(&a))
		return a.zeropage, errno
	case "CONTINUE":
		a := continueArg{rng: rangeArg{dst, length}, mode: mode, mapped: resultUntouched}
		errno := f.ioctl(reqContinue, unsafe.Pointer(&a))
		return a.mapped, errno
	case "POISON":
		a := poisonArg{rng: rangeArg{dst, length}, mode: mode, updated: resultUntouched}
		errno := f.ioctl(reqPoison, unsafe.Pointer(&a))
		return a.updated, errno
	case "MOVE":
		a := moveArg{dst: dst, src: src, length: length, mode: mode, move: resultUntouched}
		errno := f.ioctl(reqMove, unsafe.Pointer(&a))
		return a.move, errno
	}
	panic("ResolveRaw: unknown op " + op)
}
