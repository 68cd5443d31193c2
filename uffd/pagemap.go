//go:build linux

package uffd

import (
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h) is the read side of asynchronous write
// protection: with [FeatureWPAsync] the kernel resolves writes to protected pages itself (no
// message, no blocked thread) by dropping the page's uffd-wp bit, and PAGEMAP_SCAN on
// /proc/<pid>/pagemap reports — and with [ScanWPMatching] atomically re-protects — the pages
// written since. That is precise dirty tracking, per page table entry:
//
//	f, _ := uffd.Open(uffd.Options{})
//	f.API(uffd.FeatureWPAsync)                    // implies FeatureWPUnpopulated
//	f.Register(addr, size, uffd.ModeWP)           // any memory type, even regular files
//	f.Writeprotect(addr, size, uffd.WriteprotectWP) // start tracking
//	pm, _ := uffd.OpenPagemap(pid)                // 0: this process
//	buf := make([]uffd.PageRegion, 256)
//	for start := addr; start < addr+size; {
//		dirty, next, err := pm.Dirty(buf, start, addr+size, true) // get and re-arm
//		...
//		start = next
//	}
//
// Another process's pagemap works like one's own (the file needs ptrace read access to the
// process, as root has): categories are read from its page tables and, observed on 6.18,
// ScanWPMatching re-protects its pages too, so a monitor can track the dirty pages of the process
// it serves without that process's help. The userfaultfd itself is not involved in the scan:
// what makes a mapping trackable is its registration (ModeWP on a FeatureWPAsync fd), which the
// scan checks with [ScanCheckWPAsync].

// PageCategory is a set of PAGE_IS_* bits: what PAGEMAP_SCAN can tell about a page, used both
// to select pages ([ScanRequest]) and to describe them ([PageRegion]).
type PageCategory uint64

const (
	// PageWPAllowed: the page's mapping is registered for asynchronous write protection.
	PageWPAllowed PageCategory = 1 << 0
	// PageWritten: the page is not uffd-write-protected — written since it was last protected
	// (or never protected).
	PageWritten PageCategory = 1 << 1
	// PageFile: file-backed (shmem and hugetlbfs included).
	PageFile PageCategory = 1 << 2
	// PagePresent: mapped to a page frame.
	PagePresent PageCategory = 1 << 3
	// PageSwapped: a swap entry — or a PTE marker, such as the one WRITEPROTECT leaves on an
	// unpopulated page with FeatureWPUnpopulated.
	PageSwapped PageCategory = 1 << 4
	// PagePFNZero: mapped to the shared zero page.
	PagePFNZero PageCategory = 1 << 5
	// PageHuge: part of a transparent huge page or a hugetlbfs page.
	PageHuge PageCategory = 1 << 6
	// PageSoftDirty: the soft-dirty bit is set (added after 6.7; accepted by 6.18).
	PageSoftDirty PageCategory = 1 << 7
	// PageGuard: inside a MADV_GUARD_INSTALL guard region (added after 6.7; accepted by 6.18).
	PageGuard PageCategory = 1 << 8
)

// KnownPageCategories is every category bit this package names: PM_SCAN_CATEGORIES of Linux
// 6.18. Older kernels reject the newer bits with EINVAL.
const KnownPageCategories PageCategory = 1<<9 - 1

var pageCategoryNames = [...]string{
	"WPALLOWED", "WRITTEN", "FILE", "PRESENT", "SWAPPED", "PFNZERO", "HUGE", "SOFT_DIRTY", "GUARD",
}

// String lists the bits as "WRITTEN|PRESENT" (the kernel's names without PAGE_IS_); unknown bits
// are printed in hex at the end; the empty set is "0".
func (c PageCategory) String() string {
	return setString(uint64(c), uint64(KnownPageCategories), func(bit uint64) string {
		return pageCategoryNames[bits.TrailingZeros64(bit)]
	})
}

// ScanFlags are the PM_SCAN_* operation flags of PAGEMAP_SCAN.
type ScanFlags uint64

const (
	// ScanWPMatching write-protects the pages the scan reports (or, with an empty buffer, every
	// matching page): "get and clear dirty" in one atomic step. Mappings that are not registered
	// for asynchronous write protection are skipped silently unless ScanCheckWPAsync is set.
	ScanWPMatching ScanFlags = 1 << 0
	// ScanCheckWPAsync fails the scan (EPERM, reported as [ErrNotRegistered]) when a mapping in
	// the range is not registered for asynchronous write protection.
	ScanCheckWPAsync ScanFlags = 1 << 1
)

const knownScanFlags = ScanWPMatching | ScanCheckWPAsync

func (f ScanFlags) String() string {
	return setString(uint64(f), uint64(knownScanFlags), func(bit uint64) string {
		return [...]string{"WP_MATCHING", "CHECK_WPASYNC"}[bits.TrailingZeros64(bit)]
	})
}

// ScanRequest is what one PAGEMAP_SCAN call looks at and reports.
//
// A page matches when, with c its categories flipped by Inverted (c ^ Inverted), c has every bit
// of Mask and, if AnyOf is not zero, at least one bit of AnyOf. Matching pages are reported with
// their categories masked by Return (not flipped); adjacent pages reported with the same
// categories are merged into one [PageRegion]. A zero Mask and AnyOf match every page; a zero
// Return reports only addresses.
type ScanRequest struct {
	// Start and End bound the scan, [Start, End). Start must be page-aligned; End is rounded
	// up to the page size. An empty range is valid and reports nothing.
	Start, End uintptr
	Flags      ScanFlags
	// MaxPages caps the number of pages reported (0: no cap). The scan stops after the cap;
	// continue from the returned walk end.
	MaxPages uint64
	// Inverted, Mask and AnyOf select pages as described above; Return selects the categories
	// reported.
	Inverted, Mask, AnyOf, Return PageCategory
}

// PageRegion is one run of pages reported by a scan (struct page_region): [Start, End), all with
// the same reported categories.
type PageRegion struct {
	Start, End uintptr
	Categories PageCategory
}

// Len is the region's size in bytes.
func (r PageRegion) Len() uintptr { return r.End - r.Start }

func (r PageRegion) String() string {
	return fmt.Sprintf("[%#x, %#x) %v", r.Start, r.End, r.Categories)
}

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

// PagemapEntry is one 64-bit entry of /proc/<pid>/pagemap, describing one page of the address
// space (Documentation/admin-guide/mm/pagemap.rst).
type PagemapEntry uint64

// Bits of a pagemap entry.
const (
	pmSoftDirty  = 1 << 55
	pmExclusive  = 1 << 56
	pmUffdWP     = 1 << 57
	pmFileShared = 1 << 61
	pmSwapped    = 1 << 62
	pmPresent    = 1 << 63
	pmPFNMask    = 1<<55 - 1
)

// Present: the page is mapped to a page frame (bit 63).
func (e PagemapEntry) Present() bool { return e&pmPresent != 0 }

// Swapped: a swap entry or PTE marker (bit 62).
func (e PagemapEntry) Swapped() bool { return e&pmSwapped != 0 }

// FileOrShared: a file page or shared anonymous page (bit 61).
func (e PagemapEntry) FileOrShared() bool { return e&pmFileShared != 0 }

// UffdWP: the page is uffd-write-protected (bit 57, PM_UFFD_WP) — also on a PTE marker, the way
// WRITEPROTECT marks unpopulated pages of shmem, hugetlbfs and (with FeatureWPUnpopulated)
// anonymous memory.
func (e PagemapEntry) UffdWP() bool { return e&pmUffdWP != 0 }

// Exclusive: the page is mapped exclusively by this process (bit 56).
func (e PagemapEntry) Exclusive() bool { return e&pmExclusive != 0 }

// SoftDirty: the soft-dirty bit (bit 55).
func (e PagemapEntry) SoftDirty() bool { return e&pmSoftDirty != 0 }

// PFN is the page frame number of a present page (bits 0-54); the kernel shows 0 to readers
// without CAP_SYS_ADMIN.
func (e PagemapEntry) PFN() uint64 {
	if !e.Present() {
		return 0
	}
	return uint64(e & pmPFNMask)
}

func (e PagemapEntry) String() string {
	s := ""
	add := func(ok bool, name string) {
		if ok {
			if s != "" {
				s += "|"
			}
			s += name
		}
	}
	add(e.Present(), "PRESENT")
	add(e.Swapped(), "SWAPPED")
	add(e.FileOrShared(), "FILE_SHARED")
	add(e.UffdWP(), "UFFD_WP")
	add(e.Exclusive(), "EXCLUSIVE")
	add(e.SoftDirty(), "SOFT_DIRTY")
	if s == "" {
		s = "0"
	}
	return s
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
