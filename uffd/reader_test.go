//go:build linux

package uffd_test

import (
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// faultyChild makes the puppets started by the test able to keep many threads blocked on
// faults at once: each blocked thread holds a P, so GOMAXPROCS must exceed the thread count, and
// asynchronous preemption must be off, since its signal pulls a thread out of its fault (the
// kernel dequeues the message) and makes it fault again.
func faultyChild(t *testing.T) {
	t.Setenv("GOMAXPROCS", "32")
	godebug := "asyncpreemptoff=1"
	if old := os.Getenv("GODEBUG"); old != "" {
		godebug = old + "," + godebug
	}
	t.Setenv("GODEBUG", godebug)
}

// waitPending polls fdinfo until n messages are pending on f.
func waitPending(t testing.TB, f *uffd.FD, n uint64) uffd.Info {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		in, err := f.Info()
		if err != nil {
			t.Fatal(err)
		}
		if in.Pending == n {
			return in
		}
		if in.Pending > n {
			t.Fatalf("%d messages pending, want %d", in.Pending, n)
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d faults pending after 20s", in.Pending, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// copyPage resolves the fault at addr with the page of src at the same offset.
func copyPage(t testing.TB, r *remote, src []byte, addr uintptr) {
	t.Helper()
	ps := uintptr(r.pageSize)
	off := addr - r.addr
	if _, err := r.fd.Copy(addr, addrOf(src)+off, ps, 0); err != nil && !errors.Is(err, uffd.ErrExist) {
		t.Fatalf("COPY %#x: %v", addr, err)
	}
}

// Several threads of the child fault at once while nobody serves: every thread queues its own
// message, and one Read returns them all.
func TestReaderBatch(t *testing.T) {
	faultyChild(t)
	for _, threads := range []int{4, 8} {
		t.Run(itoa(threads)+"threads", func(t *testing.T) {
			r := newRemote(t, remoteOpts{kind: memory.Anon, size: 64 * os.Getpagesize(),
				features: uffd.FeatureThreadID, mode: uffd.ModeMissing})
			src := source(t, r.size, 11)
			c := r.start(puppet.Request{Op: "touch", Threads: threads, Verify: "pattern", Seed: 11})

			// Thread i first touches page i and blocks there.
			in := waitPending(t, r.fd, uint64(threads))
			if in.Total != uint64(threads) {
				t.Errorf("fdinfo total %d, want %d", in.Total, threads)
			}
			rd, err := r.fd.NewReader()
			if err != nil {
				t.Fatal(err)
			}
			msgs := make([]uffd.Msg, 64)
			n, err := rd.Read(msgs)
			if err != nil {
				t.Fatal(err)
			}
			if n <= 1 || n != threads {
				t.Fatalf("Read returned %d messages, want all %d pending", n, threads)
			}
			tids := map[uint32]bool{}
			pages := map[uintptr]bool{}
			for i := range msgs[:n] {
				m := &msgs[i]
				if err := m.Check(); err != nil {
					t.Fatal(err)
				}
				if m.Event() != uffd.EventPagefault {
					t.Fatalf("message %d: %v, want a page fault", i, m)
				}
				pf := m.Pagefault()
				if pf.Flags != 0 {
					t.Errorf("message %d: flags %v, want a MISSING read", i, pf.Flags)
				}
				if pf.TID == 0 || tids[pf.TID] {
					t.Errorf("message %d: tid %d is zero or repeated", i, pf.TID)
				}
				tids[pf.TID] = true
				pages[pf.Address] = true
			}
			for i := range threads {
				if a := r.addr + uintptr(i*r.pageSize); !pages[a] {
					t.Errorf("no fault for page %d (%#x) in the batch: %v", i, a, pages)
				}
			}
			// Read but unresolved: no longer pending, still counted in total.
			if in, err := r.fd.Info(); err != nil || in.Pending != 0 || in.Total != uint64(threads) {
				t.Errorf("fdinfo after Read: %+v, %v; want pending 0, total %d", in, err, threads)
			}
			if n, err := rd.TryRead(msgs); n != 0 || err != nil {
				t.Errorf("TryRead after the batch: %d, %v; want 0, nil", n, err)
			}

			for i := range msgs[:n] {
				copyPage(t, r, src, msgs[i].Pagefault().Address)
			}
			serveTouch(t, r, src, c)
		})
	}
}

func TestReaderTryRead(t *testing.T) {
	faultyChild(t)
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 * os.Getpagesize(), mode: uffd.ModeMissing})
	src := source(t, r.size, 5)
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]uffd.Msg, 8)
	if n, err := rd.TryRead(msgs); n != 0 || err != nil {
		t.Fatalf("TryRead with nothing pending: %d, %v; want 0, nil", n, err)
	}
	c := r.start(puppet.Request{Op: "touch", Off: r.pageSize, Len: r.pageSize, Write: true})
	waitPending(t, r.fd, 1)
	n, err := rd.TryRead(msgs)
	if err != nil || n != 1 {
		t.Fatalf("TryRead with one fault pending: %d, %v; want 1, nil", n, err)
	}
	pf := msgs[0].Pagefault()
	if msgs[0].Event() != uffd.EventPagefault || pf.Address != r.addr+uintptr(r.pageSize) || pf.Flags != uffd.FaultWrite {
		t.Fatalf("TryRead got %v, want a MISSING write fault at %#x", &msgs[0], r.addr+uintptr(r.pageSize))
	}
	if n, err := rd.TryRead(msgs); n != 0 || err != nil {
		t.Fatalf("TryRead after reading the fault: %d, %v; want 0, nil", n, err)
	}
	copyPage(t, r, src, pf.Address)
	if _, _, err := c.Wait(10 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// readerParked reports whether a goroutine is parked in the netpoller inside Reader.Read.
func readerParked() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "[IO wait") && strings.Contains(g, "uffd.(*Reader).Read(") {
			return true
		}
	}
	return false
}

// waitParked waits until a Reader.Read is parked in the netpoller; done delivers the result of
// that Read should it return instead.
func waitParked(t *testing.T, done <-chan error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !readerParked() {
		select {
		case err := <-done:
			t.Fatalf("Read returned instead of waiting: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("Read did not park in the netpoller within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// Read on a non-blocking fd with nothing pending parks the goroutine in the netpoller; Close
// from another goroutine wakes it with ErrClosed.
func TestReaderCloseUnblocks(t *testing.T) {
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.API(0); err != nil {
		t.Fatal(err)
	}
	rd, err := f.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		msgs := make([]uffd.Msg, 4)
		n, err := rd.Read(msgs)
		if n != 0 {
			err = errors.New("Read returned messages from an idle fd")
		}
		done <- err
	}()
	waitParked(t, done)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, uffd.ErrClosed) || !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Read after Close: %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read still blocked 10s after Close")
	}
	msgs := make([]uffd.Msg, 1)
	if _, err := rd.Read(msgs); !errors.Is(err, uffd.ErrClosed) {
		t.Errorf("Read on a closed FD: %v, want ErrClosed", err)
	}
	if _, err := rd.TryRead(msgs); !errors.Is(err, uffd.ErrClosed) {
		t.Errorf("TryRead on a closed FD: %v, want ErrClosed", err)
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// SetReadDeadline makes a parked Read return os.ErrDeadlineExceeded; the zero time clears the
// deadline and Read then delivers faults again.
func TestReaderDeadline(t *testing.T) {
	faultyChild(t)
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 2 * os.Getpagesize(), mode: uffd.ModeMissing})
	src := source(t, r.size, 9)
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]uffd.Msg, 4)

	// A deadline in the past fails at once; one in the future after parking.
	for _, d := range []time.Duration{-time.Second, 50 * time.Millisecond} {
		if err := r.fd.SetReadDeadline(time.Now().Add(d)); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := rd.Read(msgs)
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("Read with deadline %v: %v, want os.ErrDeadlineExceeded", d, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("Read with deadline %v still blocked after 10s", d)
		}
	}

	if err := r.fd.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	c := r.start(puppet.Request{Op: "touch", Len: r.pageSize})
	n, err := rd.Read(msgs)
	if err != nil || n != 1 || msgs[0].Pagefault().Address != r.addr {
		t.Fatalf("Read after clearing the deadline: %d, %v (%v); want the fault at %#x", n, err, &msgs[0], r.addr)
	}
	copyPage(t, r, src, r.addr)
	if _, _, err := c.Wait(10 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// newBlockingRemote is newRemote with a userfaultfd the child creates without O_NONBLOCK,
// adopted here in blocking mode.
func newBlockingRemote(t *testing.T, pages int) *remote {
	t.Helper()
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	r := &remote{t: t, p: p, kind: memory.Anon}
	t.Cleanup(func() {
		p.Kill()
		if r.fd != nil {
			r.fd.Close()
		}
	})
	rep, _, err := p.Do(puppet.Request{Op: "map", Kind: memory.Anon.String(), Size: pages * os.Getpagesize()})
	if err != nil {
		t.Fatal(err)
	}
	r.area, r.addr, r.size, r.pageSize, r.pid = rep.Area, uintptr(rep.Addr), rep.Size, rep.PageSize, rep.Pid
	_, fds, err := p.Do(puppet.Request{Op: "uffd", Blocking: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 1 {
		t.Fatalf("child sent %d fds, want 1", len(fds))
	}
	if r.fd, err = uffd.NewFD(fds[0], true); err != nil {
		unix.Close(fds[0])
		t.Fatal(err)
	}
	r.register(0, 0, uffd.ModeMissing)
	return r
}

// A uffd created blocking (Options.Blocking in the child) and adopted with NewFD(fd, true):
// Read blocks in read(2) and returns the fault; TryRead returns at once.
func TestReaderBlocking(t *testing.T) {
	faultyChild(t)
	r := newBlockingRemote(t, 3)
	fl, err := unix.FcntlInt(uintptr(r.fd.Fd()), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_NONBLOCK != 0 {
		t.Fatalf("fd flags %#x: O_NONBLOCK set on a blocking FD", fl)
	}
	src := source(t, r.size, 4)
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int
		err error
		m   uffd.Msg
	}
	// read runs a Reader method in a goroutine: a blocking read(2) cannot be interrupted, so a
	// hang must fail the test rather than stop it.
	read := func(name string, fn func([]uffd.Msg) (int, error)) result {
		t.Helper()
		done := make(chan result, 1)
		go func() {
			msgs := make([]uffd.Msg, 8)
			n, err := fn(msgs)
			done <- result{n, err, msgs[0]}
		}()
		select {
		case res := <-done:
			return res
		case <-time.After(20 * time.Second):
			t.Fatalf("%s on the blocking fd did not return within 20s", name)
		}
		panic("unreachable")
	}
	// TryRead does not wait, even on a blocking fd.
	if res := read("TryRead", rd.TryRead); res.n != 0 || res.err != nil {
		t.Fatalf("TryRead with nothing pending: %d, %v; want 0, nil", res.n, res.err)
	}
	for i, name := range []string{"Read", "TryRead"} {
		off := (i + 1) * r.pageSize
		want := uffd.Pagefault{Flags: uffd.FaultWrite, Address: r.addr + uintptr(off)}
		c := r.start(puppet.Request{Op: "touch", Off: off, Len: r.pageSize, Write: true})
		var res result
		if name == "Read" {
			// Read blocks in read(2) until the fault arrives.
			res = read(name, rd.Read)
		} else {
			waitPending(t, r.fd, 1)
			res = read(name, rd.TryRead)
		}
		if res.err != nil || res.n != 1 {
			t.Fatalf("blocking %s: %d, %v; want 1 message", name, res.n, res.err)
		}
		if res.m.Event() != uffd.EventPagefault || res.m.Pagefault() != want {
			t.Fatalf("blocking %s got %v, want %+v", name, &res.m, want)
		}
		copyPage(t, r, src, want.Address)
		if _, _, err := c.Wait(10 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
}

// NewFD refuses a file descriptor that is not a userfaultfd, and leaves it open.
func TestNewFDRejectsNonUffd(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	for _, fd := range p {
		f, err := uffd.NewFD(fd, false)
		if err == nil {
			f.Close()
			t.Fatalf("NewFD(pipe fd %d) succeeded", fd)
		}
		if !strings.Contains(err.Error(), "not a userfaultfd") || !strings.Contains(err.Error(), "pipe:") {
			t.Errorf("NewFD(pipe) = %q, want it to say the fd is a pipe, not a userfaultfd", err)
		}
	}
	if _, err := unix.Write(p[1], []byte("x")); err != nil {
		t.Fatalf("pipe unusable after NewFD refused it: %v", err)
	}
	fl, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Errorf("NewFD changed the refused fd's flags: %#x, %v", fl, err)
	}
	// A number that is not open at all.
	if _, err := uffd.NewFD(1<<20, false); err == nil {
		t.Error("NewFD of a closed fd number succeeded")
	}
}

func TestReaderEmptyBuffer(t *testing.T) {
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.API(0); err != nil {
		t.Fatal(err)
	}
	rd, err := f.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	for _, buf := range [][]uffd.Msg{nil, {}} {
		if n, err := rd.Read(buf); err == nil || n != 0 {
			t.Errorf("Read(len %d) = %d, %v; want an error", len(buf), n, err)
		}
		if n, err := rd.TryRead(buf); err == nil || n != 0 {
			t.Errorf("TryRead(len %d) = %d, %v; want an error", len(buf), n, err)
		}
	}
}

// Reading a userfaultfd before its handshake is EINVAL from the kernel; the error says why.
func TestReaderBeforeHandshake(t *testing.T) {
	for _, blocking := range []bool{false, true} {
		f, err := uffd.Open(uffd.Options{Blocking: blocking})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		rd, err := f.NewReader()
		if err != nil {
			t.Fatal(err)
		}
		msgs := make([]uffd.Msg, 2)
		for name, read := range map[string]func([]uffd.Msg) (int, error){"Read": rd.Read, "TryRead": rd.TryRead} {
			n, err := read(msgs)
			if err == nil || n != 0 {
				t.Fatalf("%s before handshake (blocking %v): %d, %v; want an error", name, blocking, n, err)
			}
			if !strings.Contains(err.Error(), "handshake") || !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) {
				t.Errorf("%s before handshake (blocking %v): %q, want ErrInvalid/EINVAL mentioning the handshake", name, blocking, err)
			}
		}
	}
}
