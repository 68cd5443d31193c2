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

// The SIGBUS scenarios of the kernel selftests (uffd-unit-tests sigbus and sigbus-wp): with
// FeatureSigbus a userfault raises SIGBUS in the faulting thread and no message is
// queued; the handler can still fill the page and the access then succeeds. The feature is
// inherited through EVENT_FORK, so a forked child touching a missing page dies of SIGBUS.

// TestSigbus is the selftest "sigbus" scenario (test 14).
func TestSigbus(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) { sigbusScenario(t, k, false) })
}

// TestSigbusWP is the selftest "sigbus-wp" scenario (test 15): a page installed write-protected
// makes the next write SIGBUS too, until it is unprotected.
func TestSigbusWP(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) { sigbusScenario(t, k, true) })
}

func sigbusScenario(t *testing.T, k memory.Kind, wp bool) {
	const seed = 14
	ps := evPageSize(t, k)
	const pages = 4
	mode := uffd.ModeMissing
	var copyMode uffd.CopyMode
	if wp {
		mode |= uffd.ModeWP
		copyMode = uffd.CopyWP
	}
	r := newRemote(t, remoteOpts{kind: k, size: pages * ps, mode: mode, features: uffd.FeatureSigbus | uffd.FeatureEventFork})
	src := source(t, pages*ps, seed)
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]uffd.Msg, 8)
	noMessage := func(step string) {
		t.Helper()
		if n, err := rd.TryRead(msgs); err != nil || n != 0 {
			t.Fatalf("%s: read %d messages (%v), want none in SIGBUS mode", step, n, err)
		}
		if in, err := r.fd.Info(); err != nil || in.Total != 0 {
			t.Fatalf("%s: userfaultfd state %+v (%v), want no fault queued", step, in, err)
		}
	}

	// 1. A missing page: the read takes SIGBUS, nothing is queued.
	if rep := r.do(puppet.Request{Op: "read", Off: 0, Len: 8}); rep.Sigbus != 1 {
		t.Fatalf("read of a missing page: %d SIGBUS, want 1", rep.Sigbus)
	}
	noMessage("missing read")

	// 2. Fill it from here; the read now succeeds with the copied bytes.
	if n, err := r.fd.Copy(r.addr, addrOf(src), uintptr(ps), copyMode); err != nil || n != uintptr(ps) {
		t.Fatalf("COPY: %d, %v", n, err)
	}
	for _, off := range []int{0, ps - 4096} {
		rep := r.do(puppet.Request{Op: "read", Off: off, Len: 4096})
		if rep.Sigbus != 0 || string(rep.Data) != string(src[off:off+4096]) {
			t.Fatalf("read at %d after COPY: %d SIGBUS, data differs from the source: %v", off, rep.Sigbus, string(rep.Data) != string(src[off:off+4096]))
		}
	}
	word := src[:8]
	if wp {
		// 3. The page came write-protected: a write takes SIGBUS, nothing is queued, the page
		// is unchanged.
		w := []byte{1, 2, 3, 4, 5, 6, 7, 8}
		if rep := r.do(puppet.Request{Op: "write", Off: 0, Data: w}); rep.Sigbus != 1 {
			t.Fatalf("write to a page installed with CopyWP: %d SIGBUS, want 1", rep.Sigbus)
		}
		noMessage("protected write")
		if rep := r.do(puppet.Request{Op: "read", Off: 0, Len: 8}); string(rep.Data) != string(src[:8]) {
			t.Fatalf("page 0 after the refused write: % x, want % x", rep.Data, src[:8])
		}
		// 4. Unprotect: the write goes through.
		if err := r.fd.Writeprotect(r.addr, uintptr(ps), 0); err != nil {
			t.Fatal(err)
		}
		if rep := r.do(puppet.Request{Op: "write", Off: 0, Data: w}); rep.Sigbus != 0 {
			t.Fatalf("write after unprotect: %d SIGBUS, want 0", rep.Sigbus)
		}
		if rep := r.do(puppet.Request{Op: "read", Off: 0, Len: 8}); string(rep.Data) != string(w) {
			t.Fatalf("page 0 after the write: % x, want % x", rep.Data, w)
		}
		noMessage("unprotected write")
		word = w
	}

	// 5. Forks: the handler reads the FORK events; the children's userfaultfds stay silent too.
	s := newEvServer(t, r.fd, k, r.addr, src)
	forkFDs := make(chan int, 4)
	s.onFork = func(fd int) error { forkFDs <- fd; return nil }
	s.start()
	fork := func(step string, off, n int) unix.WaitStatus {
		t.Helper()
		rep := r.do(puppet.Request{Op: "fork", Off: off, Len: n})
		ws, _, sum, count := evForkResult(t, rep)
		select {
		case fd := <-forkFDs:
			cf, err := uffd.NewFD(fd, false)
			if err != nil {
				unix.Close(fd)
				t.Fatalf("%s: FORK event fd: %v", step, err)
			}
			defer cf.Close()
			in, err := cf.Info()
			if err != nil || in.Enabled&uffd.FeatureSigbus == 0 || in.Total != 0 {
				t.Errorf("%s: child's userfaultfd %+v (%v), want SIGBUS enabled and no fault queued", step, in, err)
			}
			crd, err := cf.NewReader()
			if err != nil {
				t.Fatal(err)
			}
			if n, err := crd.TryRead(msgs); err != nil || n != 0 {
				t.Errorf("%s: child's userfaultfd has %d messages (%v), want none", step, n, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no FORK event", step)
		}
		if ws.Exited() && n == ps && (count != 1 || sum != binary.NativeEndian.Uint64(word)) {
			t.Fatalf("%s: forked child read %#x (%d words), want %#x", step, sum, count, binary.NativeEndian.Uint64(word))
		}
		if ws.Signaled() && count != 0 {
			t.Fatalf("%s: forked child died after reading %d words, want at its first access", step, count)
		}
		return ws
	}
	// The filled page reads fine in a forked child.
	if ws := fork("fork reading the filled page", 0, ps); !ws.Exited() || ws.ExitStatus() != 0 {
		t.Fatalf("forked child reading the filled page: wait status %#x, want exit 0", int(ws))
	}
	// A missing page kills the forked child with SIGBUS: the feature came along with the fork.
	if ws := fork("fork reading missing pages", ps, (pages-1)*ps); !ws.Signaled() || ws.Signal() != unix.SIGBUS {
		t.Fatalf("forked child reading a missing page: wait status %#x, want killed by SIGBUS", int(ws))
	}
	s.stop()
	all := s.since(0)
	if len(all) != 2 || all[0].Event() != uffd.EventFork || all[1].Event() != uffd.EventFork {
		t.Fatalf("parent's userfaultfd delivered %v, want exactly two FORK events", all)
	}
	// Still nothing for the parent either when it touches a missing page again.
	if rep := r.do(puppet.Request{Op: "read", Off: ps, Len: 8}); rep.Sigbus != 1 {
		t.Fatalf("parent read of a missing page after the forks: %d SIGBUS, want 1", rep.Sigbus)
	}
	noMessage("missing read after the forks")
}
