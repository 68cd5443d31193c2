//go:build linux

package uffd_test

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// wpUnprotect is a handler resolve hook for WP faults: it checks the flags are exactly WP|WRITE,
// counts distinct pages and lifts the protection of the page (which wakes the writer).
type wpUnprotect struct {
	mu    sync.Mutex
	pages map[uintptr]int // fault messages per page
}

func (w *wpUnprotect) resolve(h *handler, pf uffd.Pagefault) error {
	if pf.Flags != uffd.FaultWP|uffd.FaultWrite {
		return fmt.Errorf("fault at %#x with flags %v, want WP|WRITE", pf.Address, pf.Flags)
	}
	ps := uintptr(h.pageSize)
	addr := pf.Address &^ (ps - 1)
	w.mu.Lock()
	if w.pages == nil {
		w.pages = map[uintptr]int{}
	}
	w.pages[addr]++
	w.mu.Unlock()
	return h.fd.Writeprotect(addr, ps, 0)
}

func (w *wpUnprotect) distinct() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pages)
}

// The selftest wp-unpopulated (uffd-unit-tests) on anonymous memory in a child:
// with FeatureWPUnpopulated, WRITEPROTECT puts a marker on a never-touched page (pagemap bit 57);
// unprotecting or MADV_DONTNEED removes it; a write to a marked page is a WP fault (WP|WRITE)
// that unprotecting resolves; a read of a marked page maps the zero page without a fault.
func TestWPUnpopulated(t *testing.T) {
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 << 12,
		features: uffd.FeaturePagefaultFlagWP | uffd.FeatureWPUnpopulated, mode: uffd.ModeWP})
	ps := uintptr(r.pageSize)
	page := r.addr // page 0 of the child's area
	pm := openPagemap(t, r.pid)
	entry := func(when string) uffd.PagemapEntry {
		t.Helper()
		e, err := pm.Entry(page)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		return e
	}
	wp := func(mode uffd.WriteprotectMode) {
		t.Helper()
		if err := r.fd.Writeprotect(page, ps, mode); err != nil {
			t.Fatal(err)
		}
	}
	dontneed := func() { r.do(puppet.Request{Op: "madvise", Off: 0, Len: int(ps), Advice: unix.MADV_DONTNEED}) }

	wp(uffd.WriteprotectWP)
	if e := entry("protected"); !e.UffdWP() || e.Present() {
		t.Fatalf("unpopulated page after WRITEPROTECT: pagemap %v, want UFFD_WP (a marker), not present", e)
	}
	// The child's own pagemap says the same.
	if v := r.do(puppet.Request{Op: "pagemap", Off: 0, Len: int(ps)}).Pagemap[0]; !uffd.PagemapEntry(v).UffdWP() {
		t.Fatalf("child's own pagemap: %v, want UFFD_WP", uffd.PagemapEntry(v))
	}
	wp(0)
	if e := entry("unprotected"); e.UffdWP() {
		t.Fatalf("after unprotect: pagemap %v, want bit 57 clear", e)
	}
	wp(uffd.WriteprotectWP)
	dontneed()
	if e := entry("protected, then MADV_DONTNEED"); e.UffdWP() {
		t.Fatalf("after MADV_DONTNEED: pagemap %v, want the marker zapped", e)
	}

	// A write to a marked page: one WP fault, resolved by unprotecting.
	var w wpUnprotect
	h := newHandler(t, r, nil)
	h.resolve = w.resolve
	h.run()
	defer h.close()
	wp(uffd.WriteprotectWP)
	data := []byte("written through a WP marker")
	c := r.start(puppet.Request{Op: "write", Off: 0, Data: data})
	if rep, _, err := c.Wait(10 * time.Second); err != nil || rep.Sigbus != 0 {
		t.Fatalf("child write: %v (sigbus %d)", err, rep.Sigbus)
	}
	if got := w.distinct(); got != 1 || h.missing.Load() != 0 {
		t.Fatalf("WP faults on %d pages, %d missing faults; want 1 page, 0 missing", got, h.missing.Load())
	}
	if e := entry("written"); !e.Present() || e.UffdWP() {
		t.Fatalf("after the write: pagemap %v, want present and unprotected", e)
	}
	if got := r.do(puppet.Request{Op: "read", Off: 0, Len: len(data)}).Data; !bytes.Equal(got, data) {
		t.Fatalf("child reads %q back, want %q", got, data)
	}

	// A read of a marked page: zero page, no fault at all.
	dontneed()
	wp(uffd.WriteprotectWP)
	wpBefore, missingBefore := h.wp.Load(), h.missing.Load()
	rep := r.do(puppet.Request{Op: "read", Off: 0, Len: int(ps)})
	if !bytes.Equal(rep.Data, make([]byte, ps)) || rep.Sigbus != 0 {
		t.Fatalf("read of a marked page: sigbus %d, non-zero data", rep.Sigbus)
	}
	if h.wp.Load() != wpBefore || h.missing.Load() != missingBefore {
		t.Fatalf("the read raised faults: wp %d -> %d, missing %d -> %d", wpBefore, h.wp.Load(), missingBefore, h.missing.Load())
	}
	// The zero page mapped over the marker keeps the protection (observed on 6.18), so the
	// next write is a WP fault again.
	if e := entry("read over a marker"); !e.Present() || !e.UffdWP() {
		t.Fatalf("after the read: pagemap %v, want the zero page present and still UFFD_WP", e)
	}
	c = r.start(puppet.Request{Op: "write", Off: 0, Data: data})
	if rep, _, err := c.Wait(10 * time.Second); err != nil || rep.Sigbus != 0 {
		t.Fatalf("child write over the zero page: %v (sigbus %d)", err, rep.Sigbus)
	}
	w.mu.Lock()
	msgs := w.pages[page]
	w.mu.Unlock()
	if msgs < 2 || h.missing.Load() != 0 {
		t.Fatalf("write over the protected zero page: %d WP fault messages for the page in all, %d missing; want a second WP fault",
			msgs, h.missing.Load())
	}
	if got := r.do(puppet.Request{Op: "read", Off: 0, Len: len(data)}).Data; !bytes.Equal(got, data) {
		t.Fatalf("child reads %q back, want %q", got, data)
	}
	dontneed()
}

// The contrast: without FeatureWPUnpopulated, WRITEPROTECT skips never-touched anonymous pages,
// so no marker is set and a write there does not fault.
func TestWPUnpopulatedOff(t *testing.T) {
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 << 12,
		features: uffd.FeaturePagefaultFlagWP, mode: uffd.ModeWP})
	ps := uintptr(r.pageSize)
	if err := r.fd.Writeprotect(r.addr, ps, uffd.WriteprotectWP); err != nil {
		t.Fatal(err)
	}
	pm := openPagemap(t, r.pid)
	if e, err := pm.Entry(r.addr); err != nil || e.UffdWP() {
		t.Fatalf("unpopulated page after WRITEPROTECT without WP_UNPOPULATED: %v, %v; want no marker", e, err)
	}
	// Nobody serves faults here: a WP fault would block the child until the timeout.
	c := r.start(puppet.Request{Op: "write", Off: 0, Data: []byte{1}})
	if _, _, err := c.Wait(10 * time.Second); err != nil {
		t.Fatalf("write to an unmarked page: %v", err)
	}
	if rd, err := r.fd.NewReader(); err != nil {
		t.Fatal(err)
	} else if n, err := rd.TryRead(make([]uffd.Msg, 4)); n != 0 || err != nil {
		t.Fatalf("%d messages pending (%v), want none", n, err)
	}
}
