//go:build linux && !(ppc || ppc64 || ppc64le || mips || mipsle || mips64 || mips64le)

package uffd

// asm-generic _IOC layout: 2 direction bits at 30, 14 size bits.
const (
	iocNone     = 0
	iocWrite    = 1
	iocRead     = 2
	iocDirShift = 30
)
