//go:build linux

package uffd_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// waitSleepingIn waits up to 10 s until some thread of pid sleeps uninterruptibly (state D in
// /proc/<pid>/task/<tid>/status) inside system call sysno, and returns its tid.
func waitSleepingIn(t *testing.T, pid int, sysno uintptr) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		dirs, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
		for _, dir := range dirs {
			status, err := os.ReadFile(dir + "/status")
			if err != nil || !strings.Contains(string(status), "\nState:\tD") {
				continue // not asleep in D, or the thread exited
			}
			sc, err := os.ReadFile(dir + "/syscall")
			if err != nil || !strings.HasPrefix(string(sc), fmt.Sprintf("%d ", sysno)) {
				continue
			}
			var tid int
			fmt.Sscanf(filepath.Base(dir), "%d", &tid)
			return tid
		}
		if time.Now().After(deadline) {
			t.Fatalf("no thread of pid %d asleep in state D in system call %d within 10 s", pid, sysno)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Port of the selftest "mmap-changing" (shmem): while the child's MADV_REMOVE waits for its
// REMOVE event to be read, every resolving ioctl fails with EAGAIN and the result field -EAGAIN
// (ErrEventsPending, not ErrPartial), WRITEPROTECT with EAGAIN, and WAKE works. Reading the event
// releases the madvise, and the ioctls work again soon after.
func TestMmapChanging(t *testing.T) {
	r := newRemote(t, remoteOpts{kind: memory.Shmem, size: 4 * os.Getpagesize(), features: uffd.FeatureEventRemove, mode: uffd.ModeMissing})
	ps := uintptr(r.pageSize)
	src := source(t, r.size, 9)
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}

	c := r.start(puppet.Request{Op: "madvise", Off: 0, Len: r.pageSize, Advice: unix.MADV_REMOVE})
	msgs := make([]uffd.Msg, 4)
	released := false
	defer func() {
		if !released { // read the event so the child's madvise is not left waiting
			r.fd.SetReadDeadline(time.Now().Add(time.Second))
			rd.Read(msgs)
		}
	}()
	tid := waitSleepingIn(t, r.pid, unix.SYS_MADVISE)
	t.Logf("thread %d of the child waits in madvise, state D", tid)

	// The selftest's check: an all-zero struct, result field -EAGAIN.
	for _, op := range []string{"COPY", "ZEROPAGE", "POISON", "CONTINUE", "MOVE"} {
		res, errno := uffd.ResolveRaw(r.fd, op, 0, 0, 0, 0)
		if errno != unix.EAGAIN || res != -int64(unix.EAGAIN) {
			t.Errorf("%s with an event pending: result %d errno %v, want -EAGAIN written and EAGAIN", op, res, errno)
		}
	}
	// The same through the API, with real arguments.
	p1 := r.addr + ps
	for _, tc := range []struct {
		op   string
		call func() (uintptr, error)
	}{
		{"UFFDIO_COPY", func() (uintptr, error) { return r.fd.Copy(p1, addrOf(src)+ps, ps, 0) }},
		{"UFFDIO_ZEROPAGE", func() (uintptr, error) { return r.fd.Zeropage(p1, ps, 0) }},
		{"UFFDIO_POISON", func() (uintptr, error) { return r.fd.Poison(p1, ps, 0) }},
		{"UFFDIO_CONTINUE", func() (uintptr, error) { return r.fd.Continue(p1, ps, 0) }},
		{"UFFDIO_MOVE", func() (uintptr, error) { return r.fd.Move(p1, r.addr+2*ps, ps, 0) }},
		{"UFFDIO_WRITEPROTECT", func() (uintptr, error) { return 0, r.fd.Writeprotect(p1, ps, uffd.WriteprotectWP) }},
	} {
		n, err := tc.call()
		if n != 0 || !errors.Is(err, uffd.ErrEventsPending) || !errors.Is(err, unix.EAGAIN) {
			t.Errorf("%s with an event pending = %d, %v; want ErrEventsPending and EAGAIN", tc.op, n, err)
			continue
		}
		if errors.Is(err, uffd.ErrPartial) {
			t.Errorf("%s: %v matches ErrPartial", tc.op, err)
		}
		if oe := opError(t, err); oe.Op != tc.op || oe.Start != p1 || oe.Done != 0 {
			t.Errorf("%s: %+v", tc.op, oe)
		}
	}
	if err := r.fd.Wake(r.addr, uintptr(r.size)); err != nil {
		t.Errorf("WAKE with an event pending: %v", err)
	}
	if c.Done() {
		t.Fatal("madvise returned before its event was read")
	}

	r.fd.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := rd.Read(msgs)
	r.fd.SetReadDeadline(time.Time{})
	if err != nil {
		t.Fatalf("reading the REMOVE event: %v", err)
	}
	released = true
	if n != 1 || msgs[0].Event() != uffd.EventRemove {
		t.Fatalf("read %d messages, first %v; want one REMOVE", n, &msgs[0])
	}
	if err := msgs[0].Check(); err != nil {
		t.Fatal(err)
	}
	if got, want := msgs[0].Range(), (uffd.Range{Start: r.addr, End: r.addr + ps}); got != want {
		t.Fatalf("REMOVE range %#x-%#x, want page 0 %#x-%#x", got.Start, got.End, want.Start, want.End)
	}
	if _, _, err := c.Wait(10 * time.Second); err != nil {
		t.Fatalf("madvise(MADV_REMOVE) after its event was read: %v", err)
	}

	// The layout is stable again: COPY works (after a few EAGAINs at most: the flag is cleared
	// by the madvise thread once it runs, not by the read).
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := r.fd.Copy(p1, addrOf(src)+ps, ps, 0)
		if err == nil && n == ps {
			break
		}
		if !errors.Is(err, uffd.ErrEventsPending) || time.Now().After(deadline) {
			t.Fatalf("COPY after the event was read = %d, %v", n, err)
		}
		time.Sleep(time.Millisecond)
	}
}
