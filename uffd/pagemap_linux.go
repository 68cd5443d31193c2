//go:build linux

package uffd

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pmScanArg is struct pm_scan_arg: twelve 64-bit fields on every architecture.
type pmScanArg struct {
	size              uint64
	flags             uint64
	start             uint64
	end               uint64
	walkEnd           uint64 // out: where the walk stopped (== end when complete)
	vec               uint64 // struct page_region[] for the output
	vecLen            uint64
	maxPages          uint64
	categoryInverted  uint64
	categoryMask      uint64
	categoryAnyofMask uint64
	returnMask        uint64
}

const (
	sizeofPMScanArg  = 96
	sizeofPageRegion = 24 // struct page_region: start, end, categories, all __u64
	nrPagemapScan    = 16
	pagemapMagic     = 'f'
)

// reqPagemapScan is PAGEMAP_SCAN, _IOWR('f', 16, struct pm_scan_arg), in this architecture's
// _IOC encoding.
var reqPagemapScan = uintptr(RequestPagemapScan)

// regionIsNative: a PageRegion has the kernel's layout (64-bit architectures), so the kernel
// writes straight into the caller's buffer. On 32-bit architectures the kernel's 24-byte records
// are written into the same memory and unpacked in place (see Scan).
const regionIsNative = unsafe.Sizeof(PageRegion{}) == sizeofPageRegion

// Pagemap is an open /proc/<pid>/pagemap: PAGEMAP_SCAN queries and single-entry reads of one
// process's page tables. Its methods may be called concurrently, Close included: a call racing
// with Close either completes on this file or fails with ErrClosed.
type Pagemap struct {
	file *os.File
	fd   int
	pid  int
	life fdLife
}

// OpenPagemap opens the pagemap of process pid (0: this process). Another process's pagemap
// needs ptrace read access to it (the same user and no stricter Yama policy, or
// CAP_SYS_PTRACE); the file stays bound to the address space it was opened on, and once that
// process has exited scans find no mappings.
func OpenPagemap(pid int) (*Pagemap, error) {
	path := "/proc/self/pagemap"
	if pid != 0 {
		path = "/proc/" + strconv.Itoa(pid) + "/pagemap"
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		errno, _ := err.(unix.Errno)
		e := &OpError{Op: "open " + path, Errno: errno}
		switch errno {
		case unix.ENOENT, unix.ESRCH:
			e.kind = ErrProcessGone
		case unix.EACCES, unix.EPERM:
			e.kind = ErrPermission
			e.Detail = "reading another process's page tables needs ptrace read access to it"
		}
		return nil, e
	}
	p := &Pagemap{file: os.NewFile(uintptr(fd), path), fd: fd, pid: pid}
	p.life = newFDLife(false, p.file.Close)
	return p, nil
}

// Close closes the pagemap file, after the calls in flight. Closing twice returns nil.
func (p *Pagemap) Close() error { return p.life.close() }

// Pid is the process whose pagemap this is (0: the calling process).
func (p *Pagemap) Pid() int { return p.pid }

// Scan runs PAGEMAP_SCAN, writing up to len(buf) regions into buf (no allocation), and returns
// how many it wrote and where the walk stopped. walkEnd == s.End (rounded up to a page) means
// the whole range was scanned; less means buf filled up or s.MaxPages was reached: call again
// from walkEnd. With ScanWPMatching, exactly the pages reported so far have been re-protected.
//
// An empty buf is allowed: nothing is reported, and with ScanWPMatching every matching page in
// the range is re-protected (MaxPages does not apply then).
//
// On 32-bit architectures a buf of n > 1 regions receives at most 2n/3 per call (the kernel's
// 24-byte records are unpacked in place into 16-byte PageRegions); walkEnd says where to resume
// as usual.
//
// Errors are [*OpError]s with Op "PAGEMAP_SCAN": [ErrInvalid] (EINVAL; Detail names the
// unknown flag or category bits or the unaligned start), [ErrNotRegistered] (EPERM from
// [ScanCheckWPAsync]: a mapping in the range is not registered for asynchronous write
// protection), [ErrClosed] after Close, or the raw errno (EFAULT for a range beyond the address
// space or ending before it starts).
func (p *Pagemap) Scan(buf []PageRegion, s ScanRequest) (n int, walkEnd uintptr, err error) {
	a := pmScanArg{
		size:              sizeofPMScanArg,
		flags:             uint64(s.Flags),
		start:             uint64(s.Start),
		end:               uint64(s.End),
		maxPages:          s.MaxPages,
		categoryInverted:  uint64(s.Inverted),
		categoryMask:      uint64(s.Mask),
		categoryAnyofMask: uint64(s.AnyOf),
		returnMask:        uint64(s.Return),
	}
	vecLen := len(buf)
	var one [3]uint64 // 32-bit, one-region buf: the kernel's record does not fit in it
	if vecLen > 0 {
		a.vec = uint64(uintptr(unsafe.Pointer(&buf[0])))
		if !regionIsNative {
			if vecLen = len(buf) * int(unsafe.Sizeof(PageRegion{})) / sizeofPageRegion; vecLen == 0 {
				a.vec, vecLen = uint64(uintptr(unsafe.Pointer(&one))), 1
			}
		}
		a.vecLen = uint64(vecLen)
	}
	r, errno := p.ioctl(unsafe.Pointer(&a))
	runtime.KeepAlive(buf)
	runtime.KeepAlive(&one)
	if errno != 0 {
		return 0, 0, scanErr(s, errno)
	}
	n = int(r)
	if !regionIsNative && n > 0 {
		if len(buf) == 1 {
			buf[0] = PageRegion{Start: uintptr(one[0]), End: uintptr(one[1]), Categories: PageCategory(one[2])}
		} else {
			unpackRegions(buf, n)
		}
	}
	return n, uintptr(a.walkEnd), nil
}

// unpackRegions turns the n kernel records (24 bytes each) at the start of buf's memory into n
// PageRegions, in place. Record i lies at 24i, region i at size*i <= 24i, so writing region i
// overwrites only records already read.
func unpackRegions(buf []PageRegion, n int) {
	base := unsafe.Pointer(&buf[0])
	for i := 0; i < n; i++ {
		rec := (*[3]uint64)(unsafe.Add(base, i*sizeofPageRegion))
		start, end, cat := rec[0], rec[1], rec[2]
		buf[i] = PageRegion{Start: uintptr(start), End: uintptr(end), Categories: PageCategory(cat)}
	}
}

// Dirty reports the pages of [start, end) written since they were last write-protected, as
// regions in buf, and with rearm write-protects them again in the same step. Every mapping in
// the range must be registered with ModeWP on a [FeatureWPAsync] userfaultfd, else it fails with
// [ErrNotRegistered]. next is where to continue when buf filled up (next < end); next == end
// when the range is done.
func (p *Pagemap) Dirty(buf []PageRegion, start, end uintptr, rearm bool) (dirty []PageRegion, next uintptr, err error) {
	s := ScanRequest{Start: start, End: end, Flags: ScanCheckWPAsync, Mask: PageWritten, Return: PageWritten}
	if rearm {
		s.Flags |= ScanWPMatching
	}
	n, next, err := p.Scan(buf, s)
	if err != nil {
		return nil, 0, err
	}
	return buf[:n], next, nil
}

func (p *Pagemap) ioctl(arg unsafe.Pointer) (uintptr, unix.Errno) {
	if !p.life.acquire() {
		return 0, unix.EBADF
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(p.fd), reqPagemapScan, uintptr(arg))
	p.life.release()
	return r, errno
}

func scanErr(s ScanRequest, errno unix.Errno) *OpError {
	e := &OpError{Op: "PAGEMAP_SCAN", Start: s.Start, Errno: errno}
	if s.End > s.Start {
		e.Len = s.End - s.Start
	}
	switch errno {
	case unix.EINVAL:
		e.kind = ErrInvalid
		cats := s.Inverted | s.Mask | s.AnyOf | s.Return
		switch {
		case s.Flags&^knownScanFlags != 0:
			e.Detail = fmt.Sprintf("unknown flag bits %#x", uint64(s.Flags&^knownScanFlags))
		case cats&^KnownPageCategories != 0:
			e.Detail = fmt.Sprintf("unknown category bits %#x (Inverted, Mask, AnyOf or Return)",
				uint64(cats&^KnownPageCategories))
		case s.Start%uintptr(os.Getpagesize()) != 0:
			e.Detail = fmt.Sprintf("start %#x is not page-aligned", s.Start)
		default:
			e.Detail = "a category bit or flag this kernel does not know"
		}
	case unix.EPERM:
		if s.Flags&ScanCheckWPAsync != 0 {
			e.kind = ErrNotRegistered
			e.Detail = "a mapping in the range is not registered with ModeWP on a FeatureWPAsync userfaultfd"
		} else {
			e.kind = ErrPermission
		}
	case unix.EFAULT:
		e.Detail = "range outside the address space, or end before start"
	case unix.ESRCH:
		e.kind = ErrProcessGone
	case unix.EBADF:
		e.kind = ErrClosed
	}
	return e
}

// Entries reads the pagemap entries of the pages starting at addr (rounded down to a page) into
// out, one per base page (a huge page has one entry per base page), without allocating. It
// returns how many it read.
func (p *Pagemap) Entries(addr uintptr, out []PagemapEntry) (int, error) {
	if len(out) == 0 {
		return 0, nil
	}
	if !p.life.acquire() {
		return 0, &OpError{Op: "read pagemap", Start: addr, Errno: unix.EBADF, kind: ErrClosed}
	}
	defer p.life.release()
	b := unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), len(out)*8)
	off := int64(addr/uintptr(os.Getpagesize())) * 8
	for {
		n, err := unix.Pread(p.fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			errno, _ := err.(unix.Errno)
			e := &OpError{Op: "read pagemap", Start: addr, Errno: errno}
			if errno == unix.ESRCH {
				e.kind = ErrProcessGone
			}
			return 0, e
		}
		return n / 8, nil
	}
}

// Entry reads the pagemap entry of the page holding addr.
func (p *Pagemap) Entry(addr uintptr) (PagemapEntry, error) {
	var e [1]PagemapEntry
	n, err := p.Entries(addr, e[:])
	if err != nil {
		return 0, err
	}
	if n != 1 {
		return 0, &OpError{Op: "read pagemap", Start: addr, Errno: unix.EIO, Detail: "short read"}
	}
	return e[0], nil
}
