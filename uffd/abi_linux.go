//go:build linux

package uffd

// Argument structs of the ioctls, laid out as the kernel's (all 64-bit fields, no padding, so the
// layout is the same on 32-bit and 64-bit architectures). Result fields are signed: a positive
// count of bytes done or a negative errno.
type (
	apiArg struct {
		api      uint64
		features uint64
		ioctls   uint64
	}
	rangeArg struct {
		start  uint64
		length uint64
	}
	registerArg struct {
		rng    rangeArg
		mode   uint64
		ioctls uint64
	}
	copyArg struct {
		dst    uint64
		src    uint64
		length uint64
		mode   uint64
		copy   int64
	}
	zeropageArg struct {
		rng      rangeArg
		mode     uint64
		zeropage int64
	}
	writeprotectArg struct {
		rng  rangeArg
		mode uint64
	}
	continueArg struct {
		rng    rangeArg
		mode   uint64
		mapped int64
	}
	poisonArg struct {
		rng     rangeArg
		mode    uint64
		updated int64
	}
	moveArg struct {
		dst    uint64
		src    uint64
		length uint64
		mode   uint64
		move   int64
	}
)

// Sizes of the argument structs (the kernel's sizeof), part of every ioctl number.
const (
	sizeofAPI          = 24
	sizeofRange        = 16
	sizeofRegister     = 32
	sizeofCopy         = 40
	sizeofZeropage     = 32
	sizeofWriteprotect = 24
	sizeofContinue     = 32
	sizeofPoison       = 32
	sizeofMove         = 40
)

// The ioctl request numbers, computed with this architecture's _IOC encoding (ioctl_*.go).
// UNREGISTER and WAKE are _IOR although the kernel reads them: frozen ABI since 2015.
var (
	reqAPI          = iowr(nrAPI, sizeofAPI)
	reqRegister     = iowr(nrRegister, sizeofRegister)
	reqUnregister   = ior(nrUnregister, sizeofRange)
	reqWake         = ior(nrWake, sizeofRange)
	reqCopy         = iowr(nrCopy, sizeofCopy)
	reqZeropage     = iowr(nrZeropage, sizeofZeropage)
	reqMove         = iowr(nrMove, sizeofMove)
	reqWriteprotect = iowr(nrWriteprotect, sizeofWriteprotect)
	reqContinue     = iowr(nrContinue, sizeofContinue)
	reqPoison       = iowr(nrPoison, sizeofPoison)
	reqNew          = uintptr(RequestNew)
)

// RequestNew and RequestPagemapScan are the request numbers of USERFAULTFD_IOC_NEW (on
// /dev/userfaultfd; its argument is the open flags, by value) and PAGEMAP_SCAN (on
// /proc/<pid>/pagemap), in this architecture's _IOC layout, for callers that issue them
// without an [FD] or a [Pagemap] (package probe does).
const (
	RequestNew         = iocNone<<iocDirShift | uffdioMagic<<8
	RequestPagemapScan = (iocRead|iocWrite)<<iocDirShift | sizeofPMScanArg<<iocSizeShift | pagemapMagic<<8 | nrPagemapScan
)

const uffdioMagic = 0xAA

func iowr(nr, size uintptr) uintptr { return ioc(iocRead|iocWrite, uffdioMagic, nr, size) }
func ior(nr, size uintptr) uintptr  { return ioc(iocRead, uffdioMagic, nr, size) }

func ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<iocDirShift | size<<iocSizeShift | typ<<8 | nr
}

const iocSizeShift = 16
