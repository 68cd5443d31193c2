//go:build linux && (ppc || ppc64 || ppc64le || mips || mipsle || mips64 || mips64le)

package uffd

// powerpc and mips _IOC layout: 3 direction bits at 29, 13 size bits. _IOWR comes out the same
// as asm-generic's; _IOR and _IO do not, so UNREGISTER, WAKE and USERFAULTFD_IOC_NEW differ.
const (
	iocNone     = 1
	iocRead     = 2
	iocWrite    = 4
	iocDirShift = 29
)
