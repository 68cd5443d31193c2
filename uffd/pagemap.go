package uffd

import (
	"fmt"
	"math/bits"
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
