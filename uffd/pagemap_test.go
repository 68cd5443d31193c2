//go:build linux

package uffd_test

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// The PAGEMAP_SCAN tests run in this process: with FeatureWPAsync the kernel resolves writes to
// protected pages itself (no message, no blocked thread), so touching the registered memory never blocks,
// and the only registration is ModeWP (no MISSING faults).

// wpAsyncArea maps pages of anonymous memory here, registers them ModeWP on a FeatureWPAsync
// userfaultfd and write-protects them all: the start of dirty tracking.
func wpAsyncArea(t *testing.T, pages int) (f *uffd.FD, mem []byte, ps int) {
	t.Helper()
	ps = os.Getpagesize()
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.API(uffd.FeatureWPAsync); err != nil {
		if errors.Is(err, uffd.ErrUnsupported) {
			requireKernel(t, "no UFFD_FEATURE_WP_ASYNC: "+err.Error())
		}
		t.Fatal(err)
	}
	mem, err = unix.Mmap(-1, 0, pages*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	if _, err := f.Register(addrOf(mem), uintptr(len(mem)), uffd.ModeWP); err != nil {
		t.Fatal(err)
	}
	if err := f.Writeprotect(addrOf(mem), uintptr(len(mem)), uffd.WriteprotectWP); err != nil {
		t.Fatal(err)
	}
	return f, mem, ps
}

func openPagemap(t testing.TB, pid int) *uffd.Pagemap {
	t.Helper()
	pm, err := uffd.OpenPagemap(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.Close() })
	return pm
}

// wantRegions compares regions with page-index runs [first, last) of base, all with cat.
func wantRegions(t *testing.T, what string, got []uffd.PageRegion, base uintptr, ps int, cat uffd.PageCategory, runs ...[2]int) {
	t.Helper()
	ok := len(got) == len(runs)
	for i := 0; ok && i < len(runs); i++ {
		want := uffd.PageRegion{Start: base + uintptr(runs[i][0]*ps), End: base + uintptr(runs[i][1]*ps), Categories: cat}
		ok = got[i] == want
	}
	if !ok {
		var b strings.Builder
		for _, r := range got {
			b.WriteString(" [" + itoa(int(r.Start-base)/ps) + "," + itoa(int(r.End-base)/ps) + ") " + r.Categories.String())
		}
		t.Fatalf("%s: got %d regions (page indexes):%s; want runs %v with %v", what, len(got), b.String(), runs, cat)
	}
}

// A dirty-tracking run: 16 pages protected, pages 2, 3 and 9 written (no messages,
// nothing blocks), the WRITTEN scan reports [2,4) and [9,10); a WP_MATCHING scan reports them
// and re-protects them, so the next one reports nothing. Then every category of every page.
func TestPagemapScanDirty(t *testing.T) {
	_, mem, ps := wpAsyncArea(t, 16)
	base, end := addrOf(mem), addrOf(mem)+uintptr(len(mem))
	pm := openPagemap(t, 0)
	for _, p := range []int{2, 3, 9} {
		mem[p*ps] = byte(p)
	}
	buf := make([]uffd.PageRegion, 16)
	written := uffd.ScanRequest{Start: base, End: end, Mask: uffd.PageWritten, Return: uffd.PageWritten}

	n, walkEnd, err := pm.Scan(buf, written)
	if err != nil {
		t.Fatal(err)
	}
	if walkEnd != end {
		t.Errorf("walk end %#x, want the end %#x", walkEnd, end)
	}
	wantRegions(t, "WRITTEN scan", buf[:n], base, ps, uffd.PageWritten, [2]int{2, 4}, [2]int{9, 10})

	rearm := written
	rearm.Flags = uffd.ScanWPMatching | uffd.ScanCheckWPAsync
	n, _, err = pm.Scan(buf, rearm)
	if err != nil {
		t.Fatal(err)
	}
	wantRegions(t, "WP_MATCHING scan", buf[:n], base, ps, uffd.PageWritten, [2]int{2, 4}, [2]int{9, 10})
	if n, _, err = pm.Scan(buf, rearm); err != nil || n != 0 {
		t.Fatalf("second WP_MATCHING scan: %d regions (%v), %v; want 0: the first re-protected them", n, buf[:n], err)
	}

	// Every category (soft-dirty and guard left out: soft-dirty depends on the VMA's history).
	const cats = uffd.PageWPAllowed | uffd.PageWritten | uffd.PageFile | uffd.PagePresent |
		uffd.PageSwapped | uffd.PagePFNZero | uffd.PageHuge
	mem[3*ps] = 33 // written again: page 3 only
	all := uffd.ScanRequest{Start: base, End: end, Return: cats}
	if n, _, err = pm.Scan(buf, all); err != nil {
		t.Fatal(err)
	}
	marker := uffd.PageWPAllowed | uffd.PageSwapped // unpopulated, protected: a PTE marker
	protected := uffd.PageWPAllowed | uffd.PagePresent
	dirty := protected | uffd.PageWritten
	want := []uffd.PageRegion{
		{base, base + uintptr(2*ps), marker},
		{base + uintptr(2*ps), base + uintptr(3*ps), protected},
		{base + uintptr(3*ps), base + uintptr(4*ps), dirty},
		{base + uintptr(4*ps), base + uintptr(9*ps), marker},
		{base + uintptr(9*ps), base + uintptr(10*ps), protected},
		{base + uintptr(10*ps), end, marker},
	}
	if n != len(want) {
		t.Fatalf("category scan: %d regions %v, want %v", n, buf[:n], want)
	}
	for i := range want {
		if buf[i] != want[i] {
			t.Errorf("category scan region %d: %v, want %v", i, buf[i], want[i])
		}
	}

	// The same facts through single pagemap entries (bit 57 and 63).
	ents := make([]uffd.PagemapEntry, 16)
	if n, err := pm.Entries(base, ents); err != nil || n != 16 {
		t.Fatalf("Entries: %d, %v", n, err)
	}
	for i, e := range ents {
		wantWP, wantPresent := i != 3, i == 2 || i == 3 || i == 9
		if e.UffdWP() != wantWP || e.Present() != wantPresent {
			t.Errorf("page %d pagemap entry %v: want uffd-wp %v, present %v", i, e, wantWP, wantPresent)
		}
	}

	// Dirty is the get-and-clear of the same thing.
	dirtyRegs, next, err := pm.Dirty(buf, base, end, true)
	if err != nil {
		t.Fatal(err)
	}
	wantRegions(t, "Dirty", dirtyRegs, base, ps, uffd.PageWritten, [2]int{3, 4})
	if next != end {
		t.Errorf("Dirty next %#x, want %#x", next, end)
	}
	if e, err := pm.Entry(base + uintptr(3*ps)); err != nil || !e.UffdWP() {
		t.Errorf("page 3 after Dirty(rearm): %v, %v; want uffd-wp set", e, err)
	}
	if dirtyRegs, _, err = pm.Dirty(buf, base, end, false); err != nil || len(dirtyRegs) != 0 {
		t.Errorf("Dirty after re-arm: %v, %v; want nothing", dirtyRegs, err)
	}
}

// The sanity checks of the kernel's pagemap_ioctl selftest (tools/testing/selftests/mm/pagemap_ioctl.c).
func TestPagemapScanChecks(t *testing.T) {
	const pages = 16
	_, mem, ps := wpAsyncArea(t, pages)
	base, end := addrOf(mem), addrOf(mem)+uintptr(len(mem))
	pm := openPagemap(t, 0)
	buf := make([]uffd.PageRegion, pages)
	written := uffd.ScanRequest{Start: base, End: end, Mask: uffd.PageWritten, Return: uffd.PageWritten}
	for p := 0; p < pages; p += 2 { // alternate pages: 8 one-page regions
		mem[p*ps] = 1
	}

	t.Run("empty-range", func(t *testing.T) {
		s := written
		s.End = s.Start
		n, walkEnd, err := pm.Scan(buf, s)
		if err != nil || n != 0 || walkEnd != base {
			t.Fatalf("zero-length range: n %d, walk end %#x, %v; want 0, %#x, nil", n, walkEnd, err, base)
		}
	})
	t.Run("empty-buffer", func(t *testing.T) {
		n, walkEnd, err := pm.Scan(nil, written)
		if err != nil || n != 0 || walkEnd != end {
			t.Fatalf("vec_len 0: n %d, walk end %#x, %v; want 0, %#x, nil", n, walkEnd, err, end)
		}
	})
	t.Run("end-rounded-up", func(t *testing.T) {
		s := written
		s.End = end - uintptr(ps) + 1
		n, walkEnd, err := pm.Scan(buf, s)
		if err != nil || n != pages/2 || walkEnd != end {
			t.Fatalf("unaligned end: n %d, walk end %#x, %v; want %d, %#x", n, walkEnd, err, pages/2, end)
		}
	})
	invalid := []struct {
		name   string
		s      uffd.ScanRequest
		detail string
	}{
		{"unknown-flags", uffd.ScanRequest{Start: base, End: end, Flags: 1 << 2}, "flag bits 0x4"},
		{"all-flags", uffd.ScanRequest{Start: base, End: end, Flags: ^uffd.ScanFlags(0)}, "unknown flag bits"},
		{"unknown-return", uffd.ScanRequest{Start: base, End: end, Return: 0x1000}, "category bits 0x1000"},
		{"unknown-mask", uffd.ScanRequest{Start: base, End: end, Mask: 1 << 40}, "category bits"},
		{"unaligned-start", uffd.ScanRequest{Start: base + 1, End: end}, "not page-aligned"},
	}
	for _, c := range invalid {
		t.Run(c.name, func(t *testing.T) {
			n, _, err := pm.Scan(buf, c.s)
			var oe *uffd.OpError
			if !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) || !errors.As(err, &oe) {
				t.Fatalf("got n %d, %v; want an OpError matching ErrInvalid and EINVAL", n, err)
			}
			if oe.Op != "PAGEMAP_SCAN" || !strings.Contains(oe.Detail, c.detail) {
				t.Fatalf("error %q: want op PAGEMAP_SCAN and detail naming %q", err, c.detail)
			}
		})
	}
	t.Run("check-wpasync", func(t *testing.T) {
		plain, err := unix.Mmap(-1, 0, 4*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(plain)
		plain[0] = 1
		s := uffd.ScanRequest{Start: addrOf(plain), End: addrOf(plain) + uintptr(len(plain)),
			Flags: uffd.ScanCheckWPAsync, Mask: uffd.PageWritten, Return: uffd.PageWritten}
		_, _, err = pm.Scan(buf, s)
		if !errors.Is(err, uffd.ErrNotRegistered) || !errors.Is(err, unix.EPERM) {
			t.Fatalf("CHECK_WPASYNC on a mapping not registered: %v; want ErrNotRegistered (EPERM)", err)
		}
		if _, _, err := pm.Dirty(buf, s.Start, s.End, true); !errors.Is(err, uffd.ErrNotRegistered) {
			t.Fatalf("Dirty on a mapping not registered: %v; want ErrNotRegistered", err)
		}
		// WP_MATCHING alone skips such a mapping instead.
		s.Flags = uffd.ScanWPMatching
		if n, _, err := pm.Scan(buf, s); err != nil || n != 0 {
			t.Fatalf("WP_MATCHING on a mapping not registered: %d regions, %v; want it skipped", n, err)
		}
	})
	t.Run("max-pages", func(t *testing.T) {
		// Three pages per call, continuing from the walk end, re-arming as it goes: all 8
		// written pages exactly once, then nothing.
		s := written
		s.MaxPages = 3
		s.Flags = uffd.ScanWPMatching | uffd.ScanCheckWPAsync
		var got []uffd.PageRegion
		calls := 0
		for s.Start < end {
			n, walkEnd, err := pm.Scan(buf, s)
			if err != nil {
				t.Fatal(err)
			}
			calls++
			pagesSeen := 0
			for _, r := range buf[:n] {
				pagesSeen += int(r.Len()) / ps
			}
			if pagesSeen > 3 {
				t.Fatalf("call %d reported %d pages, max 3", calls, pagesSeen)
			}
			if walkEnd <= s.Start || walkEnd > end || calls > pages {
				t.Fatalf("call %d: walk end %#x from start %#x (end %#x)", calls, walkEnd, s.Start, end)
			}
			got = append(got, buf[:n]...)
			s.Start = walkEnd
		}
		wantRegions(t, "max_pages continuation", got, base, ps, uffd.PageWritten,
			[2]int{0, 1}, [2]int{2, 3}, [2]int{4, 5}, [2]int{6, 7}, [2]int{8, 9}, [2]int{10, 11}, [2]int{12, 13}, [2]int{14, 15})
		if calls < 3 {
			t.Errorf("%d calls for 8 pages at 3 per call", calls)
		}
		if n, _, err := pm.Scan(buf, written); err != nil || n != 0 {
			t.Fatalf("after re-arming: %d regions %v, %v", n, buf[:n], err)
		}
	})
	t.Run("small-buffer", func(t *testing.T) {
		for p := 1; p < pages; p += 2 { // the odd pages this time
			mem[p*ps] = 2
		}
		small := buf[:3]
		var got []uffd.PageRegion
		for start, calls := base, 0; start < end; calls++ {
			regs, next, err := pm.Dirty(small, start, end, false)
			if err != nil {
				t.Fatal(err)
			}
			if next <= start || calls > pages {
				t.Fatalf("no progress: next %#x from %#x", next, start)
			}
			got = append(got, regs...)
			start = next
		}
		wantRegions(t, "small buffer continuation", got, base, ps, uffd.PageWritten,
			[2]int{1, 2}, [2]int{3, 4}, [2]int{5, 6}, [2]int{7, 8}, [2]int{9, 10}, [2]int{11, 12}, [2]int{13, 14}, [2]int{15, 16})
		// An empty buffer with WP_MATCHING re-arms every matching page at once.
		if _, _, err := pm.Scan(nil, uffd.ScanRequest{Start: base, End: end, Flags: uffd.ScanWPMatching,
			Mask: uffd.PageWritten}); err != nil {
			t.Fatal(err)
		}
		if regs, _, err := pm.Dirty(buf, base, end, false); err != nil || len(regs) != 0 {
			t.Fatalf("after re-arming with an empty buffer: %v, %v", regs, err)
		}
	})
	t.Run("one-region-buffer", func(t *testing.T) {
		mem[0] = 3
		mem[7*ps] = 3
		var got []uffd.PageRegion
		for start, calls := base, 0; start < end; calls++ {
			regs, next, err := pm.Dirty(buf[:1], start, end, true)
			if err != nil {
				t.Fatal(err)
			}
			if next <= start || calls > pages {
				t.Fatalf("no progress: next %#x from %#x", next, start)
			}
			got = append(got, regs...)
			start = next
		}
		wantRegions(t, "one-region buffer", got, base, ps, uffd.PageWritten, [2]int{0, 1}, [2]int{7, 8})
		if regs, _, err := pm.Dirty(buf, base, end, false); err != nil || len(regs) != 0 {
			t.Fatalf("after re-arming region by region: %v, %v", regs, err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		pm2, err := uffd.OpenPagemap(0)
		if err != nil {
			t.Fatal(err)
		}
		pm2.Close()
		if _, _, err := pm2.Scan(buf, written); !errors.Is(err, uffd.ErrClosed) {
			t.Fatalf("Scan after Close: %v, want ErrClosed", err)
		}
	})
}

// Scan writes into the caller's buffer and allocates nothing, nor do entry reads.
func TestPagemapScanAllocs(t *testing.T) {
	_, mem, ps := wpAsyncArea(t, 16)
	mem[5*ps] = 1
	pm := openPagemap(t, 0)
	buf := make([]uffd.PageRegion, 16)
	s := uffd.ScanRequest{Start: addrOf(mem), End: addrOf(mem) + uintptr(len(mem)), Mask: uffd.PageWritten, Return: uffd.PageWritten}
	var n int
	var err error
	if a := testing.AllocsPerRun(100, func() { n, _, err = pm.Scan(buf, s) }); a != 0 {
		t.Errorf("Scan allocates %v times per call", a)
	}
	if err != nil || n != 1 {
		t.Fatalf("Scan: %d regions, %v; want 1", n, err)
	}
	ents := make([]uffd.PagemapEntry, 16)
	if a := testing.AllocsPerRun(100, func() { n, err = pm.Entries(addrOf(mem), ents) }); a != 0 {
		t.Errorf("Entries allocates %v times per call", a)
	}
	if err != nil || n != 16 || !ents[5].Present() || ents[5].UffdWP() || !ents[4].UffdWP() {
		t.Fatalf("Entries: %d, %v; page 4 %v, page 5 %v", n, err, ents[4], ents[5])
	}
}

// PAGEMAP_SCAN on another process's pagemap: the monitor protects the child's memory through the
// received userfaultfd, the child writes, and the monitor reads — and re-arms — the child's dirty
// pages with the child doing nothing.
func TestPagemapScanOtherProcess(t *testing.T) {
	const pages = 16
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: pages * os.Getpagesize(), features: uffd.FeatureWPAsync, mode: uffd.ModeWP})
	ps := r.pageSize
	base, end := r.addr, r.addr+uintptr(r.size)
	if err := r.fd.Writeprotect(base, uintptr(r.size), uffd.WriteprotectWP); err != nil {
		t.Fatal(err)
	}
	write := func(pages ...int) {
		for _, p := range pages {
			if rep := r.do(puppet.Request{Op: "write", Off: p * ps, Data: []byte{byte(p), 1, 2, 3}}); rep.Sigbus != 0 {
				t.Fatalf("child write to page %d faulted", p)
			}
		}
	}
	write(1, 5, 6)
	pm := openPagemap(t, r.pid)
	buf := make([]uffd.PageRegion, pages)
	regs, next, err := pm.Dirty(buf, base, end, false)
	if err != nil {
		t.Fatal(err)
	}
	if next != end {
		t.Errorf("next %#x, want %#x", next, end)
	}
	wantRegions(t, "child's dirty pages", regs, base, ps, uffd.PageWritten, [2]int{1, 2}, [2]int{5, 7})
	if e, err := pm.Entry(base + uintptr(5*ps)); err != nil || !e.Present() || e.UffdWP() {
		t.Errorf("child page 5 entry %v, %v: want present, not protected", e, err)
	}

	// Re-arm from this process.
	if regs, _, err = pm.Dirty(buf, base, end, true); err != nil {
		t.Fatal(err)
	}
	wantRegions(t, "child's dirty pages, re-arming", regs, base, ps, uffd.PageWritten, [2]int{1, 2}, [2]int{5, 7})
	if regs, _, err = pm.Dirty(buf, base, end, false); err != nil || len(regs) != 0 {
		t.Fatalf("after re-arming the child's pages from here: %v, %v; want none dirty", regs, err)
	}
	if e, err := pm.Entry(base + uintptr(5*ps)); err != nil || !e.UffdWP() {
		t.Errorf("child page 5 entry after re-arm %v, %v: want uffd-wp", e, err)
	}
	// The child's own view agrees (its pagemap, read by the child).
	rep := r.do(puppet.Request{Op: "pagemap", Off: 0, Len: r.size})
	for i, v := range rep.Pagemap {
		if !uffd.PagemapEntry(v).UffdWP() {
			t.Errorf("child sees page %d unprotected after the re-arm: %v", i, uffd.PagemapEntry(v))
		}
	}
	write(6)
	if regs, _, err = pm.Dirty(buf, base, end, true); err != nil {
		t.Fatal(err)
	}
	wantRegions(t, "child's second round", regs, base, ps, uffd.PageWritten, [2]int{6, 7})

	// Once the child has exited the file still works but finds no mappings.
	r.p.Kill()
	n, _, err := pm.Scan(buf, uffd.ScanRequest{Start: base, End: end, Return: uffd.KnownPageCategories})
	t.Logf("scan after the child exited: %d regions, %v", n, err)
	if err == nil && n != 0 {
		t.Errorf("scan of an exited process reported %v", buf[:n])
	}
}

func TestPageCategoryString(t *testing.T) {
	for _, c := range []struct {
		c    uffd.PageCategory
		want string
	}{
		{0, "0"},
		{uffd.PageWritten, "WRITTEN"},
		{uffd.PageWPAllowed | uffd.PageSwapped, "WPALLOWED|SWAPPED"},
		{uffd.PageGuard | uffd.PageSoftDirty | 1<<12, "SOFT_DIRTY|GUARD|0x1000"},
	} {
		if got := c.c.String(); got != c.want {
			t.Errorf("%#x: %q, want %q", uint64(c.c), got, c.want)
		}
	}
	if got := (uffd.ScanWPMatching | uffd.ScanCheckWPAsync).String(); got != "WP_MATCHING|CHECK_WPASYNC" {
		t.Errorf("ScanFlags: %q", got)
	}
	e := uffd.PagemapEntry(1<<63 | 1<<57 | 42)
	if !e.Present() || !e.UffdWP() || e.Swapped() || e.PFN() != 42 || e.String() != "PRESENT|UFFD_WP" {
		t.Errorf("entry %#x: %v pfn %d", uint64(e), e, e.PFN())
	}
}
