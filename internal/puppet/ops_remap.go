//go:build linux

package puppet

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Commands of the engine's hardening tests (engine/hardening_test.go).
//
//	eng-mremap-onto  move [Off, Off+Len) of the area onto [Ints[0], Ints[0]+Len) of the same
//	                 area with MREMAP_FIXED: the destination's pages are unmapped first, the
//	                 source range is left unmapped

func init() {
	registerOp("eng-mremap-onto", engMremapOnto)
}

func engMremapOnto(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return engFail("eng-mremap-onto: %v", err)
	}
	if len(r.Ints) != 1 {
		return engFail("eng-mremap-onto: want Ints = [destination offset]")
	}
	dst := int(r.Ints[0])
	if r.Off < 0 || dst < 0 || r.Len <= 0 || r.Off+r.Len > len(a.Mem) || dst+r.Len > len(a.Mem) {
		return engFail("eng-mremap-onto: [%d, %d) onto %d outside the %d-byte area", r.Off, r.Off+r.Len, dst, len(a.Mem))
	}
	base := a.Addr()
	_, _, errno := unix.Syscall6(unix.SYS_MREMAP, base+uintptr(r.Off), uintptr(r.Len), uintptr(r.Len),
		unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, base+uintptr(dst), 0)
	if errno != 0 {
		return Reply{Err: fmt.Sprintf("eng-mremap-onto: mremap: %v", errno)}, nil
	}
	return Reply{Addr: uint64(base + uintptr(dst))}, nil
}
