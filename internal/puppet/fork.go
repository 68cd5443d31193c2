//go:build linux

package puppet

import (
	"fmt"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
)

// fork forks the puppet with a raw clone(2) — the way fork-based programs (and the kernel
// selftests) create children that inherit registered memory. The forked child runs only
// forkedChild: raw system calls and loads, no Go runtime, then exit_group. It reads the pagemap
// entry of the first page, reads the first word of each page of [Off, Off+Len) at Stride, and
// leaves the results in a shared page. Reply: Status (wait status), Pagemap[0] (the entry seen
// by the child), Data (sum and count as 16 bytes).
func (c *child) fork(a *memory.Area, r *Request) (Reply, []int) {
	res, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	defer unix.Munmap(res)
	path := []byte("/proc/self/pagemap\x00")
	stride := r.Stride
	if stride == 0 {
		stride = a.PageSize
	}
	args := forkArgs{
		path:   unsafe.Pointer(&path[0]),
		res:    unsafe.Pointer(&res[0]),
		start:  unsafe.Pointer(&a.Mem[r.Off]),
		length: uintptr(r.Len),
		stride: uintptr(stride),
		pgsize: uintptr(4096),
	}
	// Lock the thread so the clone happens from a known thread; the child has only this one.
	runtime.LockOSThread()
	pid, errno := rawFork()
	if pid == 0 {
		forkedChild(&args) // never returns
	}
	runtime.UnlockOSThread()
	runtime.KeepAlive(path)
	if errno != 0 {
		return Reply{Err: fmt.Sprintf("clone: %v", errno)}, nil
	}
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(int(pid), &ws, 0, nil)
		if err != unix.EINTR {
			break
		}
	}
	rep := Reply{Status: int(ws), Pid: int(pid)}
	rep.Pagemap = []uint64{*(*uint64)(unsafe.Pointer(&res[16]))}
	rep.Data = append([]byte(nil), res[:16]...)
	return rep, nil
}

type forkArgs struct {
	path, res, start       unsafe.Pointer
	length, stride, pgsize uintptr
}

//go:nosplit
func rawFork() (uintptr, syscall.Errno) {
	a1, a2 := uintptr(syscall.SIGCHLD), uintptr(0)
	if runtime.GOARCH == "s390x" {
		a1, a2 = a2, a1 // s390 clone takes the stack first
	}
	pid, _, errno := syscall.RawSyscall6(unix.SYS_CLONE, a1, a2, 0, 0, 0, 0)
	return pid, errno
}

// forkedChild runs in the forked child. It must not grow its stack or call into the runtime.
//
//go:nosplit
func forkedChild(a *forkArgs) {
	// Default SIGBUS/SIGSEGV so a trapped access kills the child visibly (Go's handlers cannot
	// run here). Status then says which signal.
	var act [4]uintptr // struct sigaction with SIG_DFL, no flags, empty mask
	syscall.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(syscall.SIGBUS), uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0)
	syscall.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(syscall.SIGSEGV), uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0)
	atFDCWD := -100
	fd, _, e := syscall.RawSyscall6(unix.SYS_OPENAT, uintptr(atFDCWD), uintptr(a.path), syscall.O_RDONLY, 0, 0, 0)
	if e == 0 {
		syscall.RawSyscall6(unix.SYS_PREAD64, fd, uintptr(unsafe.Add(a.res, 16)), 8, (uintptr(a.start)/a.pgsize)*8, 0, 0)
		syscall.RawSyscall(unix.SYS_CLOSE, fd, 0, 0)
	}
	var sum, count uint64
	for off := uintptr(0); off < a.length; off += a.stride {
		sum += *(*uint64)(unsafe.Add(a.start, off))
		count++
		*(*uint64)(a.res) = sum
		*(*uint64)(unsafe.Add(a.res, 8)) = count
	}
	for {
		syscall.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
	}
}
