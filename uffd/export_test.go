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

// ParseFDInfo is the fdinfo parser behind FD.Info.
var ParseFDInfo = parseFDInfo

// Requests are the ioctl request numbers as computed for this GOARCH, by kernel name.
var Requests = map[string]uintptr{
	"UFFDIO_API":          reqAPI,
	"UFFDIO_REGISTER":     reqRegister,
	"UFFDIO_UNREGISTER":   reqUnregister,
	"UFFDIO_WAKE":         reqWake,
	"UFFDIO_COPY":         reqCopy,
	"UFFDIO_ZEROPAGE":     reqZeropage,
	"UFFDIO_MOVE":         reqMove,
	"UFFDIO_WRITEPROTECT": reqWriteprotect,
	"UFFDIO_CONTINUE":     reqContinue,
	"UFFDIO_POISON":       reqPoison,
	"USERFAULTFD_IOC_NEW": reqNew,
}

// IOCLayout is this GOARCH's _IOC layout: the direction values and the direction shift.
var IOCLayout = struct{ None, Read, Write, DirShift, SizeShift uintptr }{iocNone, iocRead, iocWrite, iocDirShift, iocSizeShift}

// IOC is the package's _IOC encoder (with this GOARCH's layout).
var IOC = ioc

// ArgStructs are zero values of the ioctl argument structs by kernel name, for the tests to
// measure with reflect, and SizeofConsts the sizes the package encodes into request numbers.
var (
	ArgStructs = map[string]any{
		"uffdio_api": apiArg{}, "uffdio_range": rangeArg{}, "uffdio_register": registerArg{},
		"uffdio_copy": copyArg{}, "uffdio_zeropage": zeropageArg{}, "uffdio_writeprotect": writeprotectArg{},
		"uffdio_continue": continueArg{}, "uffdio_poison": poisonArg{}, "uffdio_move": moveArg{},
	}
	SizeofConsts = map[string]uintptr{
		"uffdio_api": sizeofAPI, "uffdio_range": sizeofRange, "uffdio_register": sizeofRegister,
		"uffdio_copy": sizeofCopy, "uffdio_zeropage": sizeofZeropage, "uffdio_writeprotect": sizeofWriteprotect,
		"uffdio_continue": sizeofContinue, "uffdio_poison": sizeofPoison, "uffdio_move": sizeofMove,
	}
)

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
