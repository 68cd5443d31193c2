//go:build linux

package uffd_test

import (
	"encoding/binary"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// The wp-fork scenarios of the kernel selftests (uffd-unit-tests wp-fork and wp-fork-with-event):
// write protection survives fork() only when the handler follows the fork with EVENT_FORK.

const pmUffdWP = 1 << 57 // pagemap: PTE is uffd-wp write-protected (also on markers)

// TestWPFork: without EVENT_FORK the forked child's copy of a write-protected page is not
// protected (pagemap bit 57 clear), before and after the page is zapped.
func TestWPFork(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) { wpForkScenario(t, k, false) })
}

// TestWPForkWithEvent: with EVENT_FORK the forked child keeps the protection (bit 57 set); the
// handler reads the FORK event and closes the child's userfaultfd once the child is done.
func TestWPForkWithEvent(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) { wpForkScenario(t, k, true) })
}

func wpForkScenario(t *testing.T, k memory.Kind, withEvent bool) {
	ps := evPageSize(t, k)
	var features uffd.Feature // WP on anon is a capability (PAGEFAULT_FLAG_WP), on shmem and hugetlb too (WP_HUGETLBFS_SHMEM)
	if withEvent {
		features = uffd.FeatureEventFork
	}
	r := newRemote(t, remoteOpts{kind: k, size: 2 * ps, mode: uffd.ModeWP, features: features})

	forkFDs := make(chan int, 4)
	if withEvent {
		s := newEvServer(t, r.fd, k, r.addr, source(t, 2*ps, 6))
		s.onFork = func(fd int) error { forkFDs <- fd; return nil }
		s.start()
	}

	pagemapBit := func(what string) bool {
		t.Helper()
		rep := r.do(puppet.Request{Op: "pagemap", Off: 0, Len: 4096})
		if len(rep.Pagemap) != 1 {
			t.Fatalf("%s: %d pagemap entries", what, len(rep.Pagemap))
		}
		return rep.Pagemap[0]&pmUffdWP != 0
	}
	word := []byte{0xfa, 0x17, 0x11, 0x7e, 0x00, 0xc0, 0xff, 0xee}
	wantSum := binary.NativeEndian.Uint64(word)

	// fork forks the puppet; its child reads page 0's pagemap entry and first word.
	fork := func(step string) {
		t.Helper()
		rep := r.do(puppet.Request{Op: "fork", Off: 0, Len: ps})
		ws, pm, sum, count := evForkResult(t, rep)
		if !ws.Exited() || ws.ExitStatus() != 0 {
			t.Fatalf("%s: forked child wait status %#x, want exit 0", step, int(ws))
		}
		if sum != wantSum || count != 1 {
			t.Fatalf("%s: forked child read %#x (%d words), want %#x", step, sum, count, wantSum)
		}
		if got := pm&pmUffdWP != 0; got != withEvent {
			t.Errorf("%s: forked child's pagemap uffd-wp bit %v, want %v (EVENT_FORK %v)", step, got, withEvent, withEvent)
		}
		if withEvent {
			// The child has exited; now close its userfaultfd (closing it earlier would
			// unregister the child's memory and clear the bit under its feet).
			select {
			case fd := <-forkFDs:
				f, err := uffd.NewFD(fd, false)
				if err != nil {
					unix.Close(fd)
					t.Fatalf("%s: FORK event fd: %v", step, err)
				}
				f.Close()
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: no FORK event", step)
			}
		}
	}

	// Write page 0 so it is populated, then protect it.
	if rep := r.do(puppet.Request{Op: "write", Off: 0, Data: word}); rep.Sigbus != 0 {
		t.Fatal("write to page 0 faulted")
	}
	if err := r.fd.Writeprotect(r.addr, uintptr(ps), uffd.WriteprotectWP); err != nil {
		t.Fatal(err)
	}
	if !pagemapBit("after WRITEPROTECT") {
		t.Fatal("pagemap uffd-wp bit clear after WRITEPROTECT")
	}
	fork("first fork")

	// Zap the page: shared memory drops the PTE (a marker keeps the protection), private memory
	// is paged out if it can be (not without swap; errors ignored, as the selftest does).
	if k.Shared() {
		r.do(puppet.Request{Op: "madvise", Off: 0, Len: ps, Advice: unix.MADV_DONTNEED})
	} else {
		r.p.Do(puppet.Request{Op: "madvise", Area: r.area, Off: 0, Len: ps, Advice: unix.MADV_PAGEOUT})
	}
	if !pagemapBit("after the zap") {
		t.Fatal("pagemap uffd-wp bit lost when the page was zapped")
	}
	fork("fork after the zap")

	// Unprotect, then write: the bit stays clear.
	if err := r.fd.Writeprotect(r.addr, uintptr(ps), 0); err != nil {
		t.Fatal(err)
	}
	if pagemapBit("after unprotect") {
		t.Fatal("pagemap uffd-wp bit set after unprotect")
	}
	if rep := r.do(puppet.Request{Op: "write", Off: 0, Data: word}); rep.Sigbus != 0 {
		t.Fatal("write to the unprotected page faulted")
	}
	if pagemapBit("after the write") {
		t.Fatal("pagemap uffd-wp bit set after writing the unprotected page")
	}
	if in, err := r.fd.Info(); err != nil || in.Total != 0 {
		t.Fatalf("userfaultfd state %+v, %v: want no faults (only reads and unprotected writes)", in, err)
	}
}
