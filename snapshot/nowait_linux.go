package snapshot

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// readNoWait reads len(b) bytes at off if they are all in the page cache (preadv2 with
// RWF_NOWAIT), without waiting for the disk; false otherwise, b's contents then undefined. The
// one iovec is on the stack: unix.Preadv2 would allocate its iovec array on every call, and
// this runs for faults.
func (oc *openChunk) readNoWait(b []byte, off int64) bool {
	if len(b) == 0 {
		return true
	}
	iov := unix.Iovec{Base: &b[0]}
	iov.SetLen(len(b))
	// preadv2 takes the offset as two words, low then high (the high one 0 on 64-bit).
	lo, hi := uintptr(off), uintptr(uint64(off)>>(wordBits/2)>>(wordBits/2))
	n, _, errno := unix.Syscall6(unix.SYS_PREADV2, oc.f.Fd(), uintptr(unsafe.Pointer(&iov)), 1, lo, hi, unix.RWF_NOWAIT)
	return errno == 0 && int(n) == len(b)
}

const wordBits = 32 << (^uintptr(0) >> 63)
