//go:build linux

package uffd_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// minorServer resolves MINOR faults the way the kernel selftests' handler does: flip every byte
// of the page through a mapping of the memfd in this process (never registered anywhere), then
// CONTINUE (with ContinueWP if asked), then CONTINUE again, which must be EEXIST. A duplicate
// message for a page already continued (a thread re-faulting after a signal) is answered with
// a wake. With wp set, WP faults are resolved by unprotecting.
type minorServer struct {
	local   []byte // the memfd, mapped MAP_SHARED here
	base    uintptr
	mode    uffd.ContinueMode
	wp      wpUnprotect
	mu      sync.Mutex
	pages   map[uintptr]bool // MINOR: pages continued
	dups    int
	reExist int // second CONTINUEs answered EEXIST
}

// counts returns the distinct pages continued, the duplicate messages and the EEXIST answers.
func (m *minorServer) counts() (pages, dups, reExist int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pages), m.dups, m.reExist
}

func (m *minorServer) resolve(h *handler, pf uffd.Pagefault) error {
	ps := uintptr(h.pageSize)
	addr := pf.Address &^ (ps - 1)
	switch pf.Flags {
	case uffd.FaultMinor:
	case uffd.FaultWP | uffd.FaultWrite:
		return m.wp.resolve(h, pf)
	default:
		return fmt.Errorf("fault at %#x with flags %v, want MINOR (a read)", pf.Address, pf.Flags)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pages[addr] {
		m.dups++
		if _, err := h.fd.Continue(addr, ps, m.mode); !errors.Is(err, uffd.ErrExist) {
			return fmt.Errorf("CONTINUE of a page already continued: %v, want ErrExist", err)
		}
		return h.fd.Wake(addr, ps)
	}
	m.pages[addr] = true
	off := addr - m.base
	page := m.local[off : off+ps]
	for i := 0; i < len(page); i += 8 {
		binary.NativeEndian.PutUint64(page[i:], ^binary.NativeEndian.Uint64(page[i:]))
	}
	n, err := h.fd.Continue(addr, ps, m.mode)
	if err != nil || n != ps {
		return fmt.Errorf("CONTINUE %#x: %d, %v", addr, n, err)
	}
	if n, err := h.fd.Continue(addr, ps, m.mode); !errors.Is(err, uffd.ErrExist) || !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("second CONTINUE %#x: %d, %v; want ErrExist", addr, n, err)
	}
	m.reExist++
	return nil
}

// The selftests minor and minor-wp (tools/testing/selftests/mm/uffd-unit-tests.c) on shmem and
// shared hugetlbfs: the child fills every page through its alias, so the page cache is full and
// the registered mapping has no page table entries; its reads raise MINOR faults; the handler
// flips every byte through its own mapping of the memfd and CONTINUEs; the child sees the flipped
// bytes. With wp, the pages are mapped write-protected and the child's writes then fault (WP).
func TestMinor(t *testing.T) {
	for _, wp := range []bool{false, true} {
		name := "minor"
		if wp {
			name = "minor-wp"
		}
		t.Run(name, func(t *testing.T) {
			kindsFor(t, []memory.Kind{memory.Shmem, memory.Hugetlb}, func(t *testing.T, k memory.Kind) {
				testMinor(t, k, wp)
			})
		})
	}
}

func testMinor(t *testing.T, k memory.Kind, wp bool) {
	size := 8 << 20 // 2048 pages
	if k.Huge() {
		size = 32 << 20 // 16 huge pages, as the selftest
	}
	features := uffd.FeatureMinorShmem | uffd.FeatureMinorHugetlbfs
	mode := uffd.ModeMinor
	if wp {
		features |= uffd.FeaturePagefaultFlagWP | uffd.FeatureWPHugetlbfsShmem
		mode |= uffd.ModeWP
	}
	r := newRemote(t, remoteOpts{kind: k, size: size, alias: true, features: features})
	if r.memfd == nil || r.alias == 0 {
		t.Fatal("child sent no memfd or made no alias")
	}
	ioctls := r.register(0, 0, mode)
	if !ioctls.Has(uffd.IoctlContinue) {
		t.Fatalf("MINOR registration offers %v, no CONTINUE", ioctls)
	}
	if wp && !ioctls.Has(uffd.IoctlWriteprotect) {
		t.Fatalf("MINOR|WP registration offers %v, no WRITEPROTECT", ioctls)
	}
	const seed = 11
	pages := r.size / r.pageSize
	if rep := r.do(puppet.Request{Op: "wpmove-alias-fill", Seed: seed}); rep.Pages != pages {
		t.Fatalf("alias fill wrote %d pages, want %d", rep.Pages, pages)
	} else if rep.Ints[0] > 0 {
		t.Logf("alias fill retried %d times: the hugepage pool ran dry for a while", rep.Ints[0])
	}

	flags := unix.MAP_SHARED
	if k.Huge() {
		flags |= unix.MAP_NORESERVE
	}
	local, err := unix.Mmap(int(r.memfd.Fd()), 0, r.size, unix.PROT_READ|unix.PROT_WRITE, flags)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(local)
	m := &minorServer{local: local, base: r.addr, pages: map[uintptr]bool{}}
	if wp {
		m.mode = uffd.ContinueWP
	}
	h := newHandler(t, r, nil)
	h.resolve = m.resolve
	h.run()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			h.close()
		}
	}
	defer stop()

	c := r.start(puppet.Request{Op: "wpmove-verify", Seed: seed, Ints: []int64{0xff}})
	rep, _, err := c.Wait(60 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Pages != pages || rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("child read %d of %d pages, %d with bytes not flipped (first at %d), %d SIGBUS",
			rep.Pages, pages, rep.Mismatch, rep.FirstBad, rep.Sigbus)
	}
	// Every page faulted exactly once as MINOR (duplicate messages of one fault, after a
	// signal to the blocked thread, are counted apart), never as MISSING.
	distinct, dups, reExist := m.counts()
	if distinct != pages || h.missing.Load() != 0 || h.minor.Load() < int64(pages) {
		t.Fatalf("MINOR faults on %d distinct pages (%d messages, %d duplicates), %d MISSING; want %d pages, 0 MISSING",
			distinct, h.minor.Load(), dups, h.missing.Load(), pages)
	}
	if reExist != pages {
		t.Fatalf("second CONTINUE gave EEXIST %d times, want %d", reExist, pages)
	}
	if dups > 0 {
		t.Logf("%d duplicate MINOR messages", dups)
	}
	if !wp {
		if h.wp.Load() != 0 {
			t.Fatalf("%d WP faults without WP registration", h.wp.Load())
		}
		return
	}

	// minor-wp: CONTINUE_MODE_WP mapped every page protected; each write is a WP fault.
	pm := openPagemap(t, r.pid)
	ents := make([]uffd.PagemapEntry, r.size/4096)
	if n, err := pm.Entries(r.addr, ents); err != nil || n != len(ents) {
		t.Fatalf("pagemap: %d, %v", n, err)
	}
	step := r.pageSize / 4096
	for p := 0; p < pages; p++ {
		if e := ents[p*step]; !e.Present() || !e.UffdWP() {
			t.Fatalf("page %d after CONTINUE_MODE_WP: pagemap %v, want present and UFFD_WP", p, e)
		}
	}
	c = r.start(puppet.Request{Op: "touch", Write: true})
	if rep, _, err = c.Wait(60 * time.Second); err != nil || rep.Sigbus != 0 || rep.Pages != pages {
		t.Fatalf("child writes: %v, %d pages, %d SIGBUS", err, rep.Pages, rep.Sigbus)
	}
	if got := m.wp.distinct(); got != pages || h.missing.Load() != 0 {
		t.Fatalf("WP faults on %d distinct pages (%d messages), %d MISSING; want %d, 0",
			got, h.wp.Load(), h.missing.Load(), pages)
	}
	stop()
	if n, err := pm.Entries(r.addr, ents); err != nil || n != len(ents) {
		t.Fatalf("pagemap: %d, %v", n, err)
	}
	for p := 0; p < pages; p++ {
		if e := ents[p*step]; e.UffdWP() {
			t.Fatalf("page %d after its WP fault was resolved: pagemap %v, want unprotected", p, e)
		}
		// The child's write (the page offset, in the first word) reached the page cache.
		off := p * r.pageSize
		if v := binary.NativeEndian.Uint64(local[off:]); v != uint64(off) {
			t.Fatalf("page %d: first word %#x after the child's write, want %#x", p, v, off)
		}
	}
}
