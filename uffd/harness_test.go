//go:build linux

package uffd_test

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// requireKernel fails under FAULTLINE_REQUIRE_KERNEL=1 (CI) and skips otherwise.
func requireKernel(t testing.TB, why string) { t.Helper(); kerneltest.Require(t, why) }

// needHugePages reserves n free huge pages for the test (see kerneltest.HugePages).
func needHugePages(t testing.TB, n int) { t.Helper(); kerneltest.HugePages(t, n) }

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	if n == 0 {
		return "0"
	}
	for ; n > 0; n /= 10 {
		i--
		b[i] = byte('0' + n%10)
	}
	return string(b[i:])
}

// kindsFor runs fn as a subtest per memory kind, reserving hugepages for the hugetlb kinds.
func kindsFor(t *testing.T, kinds []memory.Kind, fn func(t *testing.T, k memory.Kind)) {
	for _, k := range kinds {
		t.Run(k.String(), func(t *testing.T) {
			if k.Huge() {
				needHugePages(t, 64)
			}
			fn(t, k)
		})
	}
}

// remote is memory in a puppet child with a userfaultfd over it that the test process holds:
// the split between a VMM and its page-fault handler.
type remote struct {
	t        testing.TB
	p        *puppet.Puppet
	area     int
	addr     uintptr
	alias    uintptr
	size     int
	pageSize int
	kind     memory.Kind
	memfd    *os.File // file-backed kinds: the memfd, mapped here for MINOR tests
	fd       *uffd.FD
	pid      int
}

type remoteOpts struct {
	kind         memory.Kind
	size         int
	alias        bool
	features     uffd.Feature
	mode         uffd.RegisterMode // 0: do not register
	userModeOnly bool
}

// newRemote starts a puppet, maps memory there, creates a userfaultfd in it with the features,
// registers the area (if mode != 0) and receives the fd.
func newRemote(t testing.TB, o remoteOpts) *remote {
	t.Helper()
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	r := &remote{t: t, p: p, kind: o.kind}
	t.Cleanup(func() {
		p.Kill()
		if r.fd != nil {
			r.fd.Close()
		}
		if r.memfd != nil {
			r.memfd.Close()
		}
	})
	rep, fds, err := p.Do(puppet.Request{Op: "map", Kind: o.kind.String(), Size: o.size, Alias: o.alias})
	if err != nil {
		t.Fatalf("map %v: %v", o.kind, err)
	}
	r.area, r.addr, r.alias, r.size, r.pageSize, r.pid = rep.Area, uintptr(rep.Addr), uintptr(rep.AliasAddr), rep.Size, rep.PageSize, rep.Pid
	if len(fds) == 1 {
		r.memfd = os.NewFile(uintptr(fds[0]), "memfd")
	}
	_, fds, err = p.Do(puppet.Request{Op: "uffd", Features: uint64(o.features), UserModeOnly: o.userModeOnly})
	if err != nil {
		t.Fatalf("uffd in child: %v", err)
	}
	if len(fds) != 1 {
		t.Fatalf("child sent %d fds, want 1", len(fds))
	}
	r.fd, err = uffd.NewFD(fds[0], false)
	if err != nil {
		t.Fatal(err)
	}
	if o.mode != 0 {
		r.register(0, 0, o.mode)
	}
	return r
}

// register registers [off, off+n) of the area in the child (n 0: to the end) and returns the
// ioctls the kernel answered.
func (r *remote) register(off, n int, mode uffd.RegisterMode) uffd.Ioctls {
	r.t.Helper()
	rep, _, err := r.p.Do(puppet.Request{Op: "register", Area: r.area, Off: off, Len: n, Mode: uint64(mode)})
	if err != nil {
		r.t.Fatalf("register %v: %v", mode, err)
	}
	return uffd.Ioctls(rep.Ioctls)
}

// do runs a command on the child's area and fails the test on error.
func (r *remote) do(req puppet.Request) puppet.Reply {
	r.t.Helper()
	req.Area = r.area
	rep, _, err := r.p.Do(req)
	if err != nil {
		r.t.Fatalf("%s: %v", req.Op, err)
	}
	return rep
}

// start runs a command on the child's area without waiting.
func (r *remote) start(req puppet.Request) *puppet.Call {
	r.t.Helper()
	req.Area = r.area
	c, err := r.p.Go(req)
	if err != nil {
		r.t.Fatalf("%s: %v", req.Op, err)
	}
	return c
}

// source returns a local buffer of the area's size filled with the pattern of seed: what the
// handler copies from.
func source(t testing.TB, size int, seed uint64) []byte {
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	puppet.Fill(b, seed, 0)
	return b
}

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// handler is a minimal fault server for tests: it resolves every MISSING fault by copying the
// page from src (or via the resolve hook), counts what it saw and hands events to onEvent.
type handler struct {
	t        testing.TB
	fd       *uffd.FD
	base     uintptr
	pageSize int
	src      []byte

	resolve func(h *handler, pf uffd.Pagefault) error // nil: COPY from src
	onEvent func(h *handler, m *uffd.Msg)

	missing, wp, minor, events atomic.Int64
	errs                       chan error
	stop                       chan struct{}
	wg                         sync.WaitGroup
	mu                         sync.Mutex
	seen                       []uffd.Msg
}

func (h *handler) run() {
	h.errs = make(chan error, 16)
	h.stop = make(chan struct{})
	rd, err := h.fd.NewReader()
	if err != nil {
		h.t.Fatal(err)
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		msgs := make([]uffd.Msg, 64)
		for {
			n, err := rd.Read(msgs)
			if err != nil {
				if !errors.Is(err, uffd.ErrClosed) && !errors.Is(err, os.ErrDeadlineExceeded) {
					h.errs <- err
				}
				return
			}
			select {
			case <-h.stop:
				return
			default:
			}
			h.mu.Lock()
			h.seen = append(h.seen, msgs[:n]...)
			h.mu.Unlock()
			for i := range msgs[:n] {
				m := &msgs[i]
				if m.Event() != uffd.EventPagefault {
					h.events.Add(1)
					if h.onEvent != nil {
						h.onEvent(h, m)
					} else {
						h.errs <- errors.New("unexpected event " + m.String())
					}
					continue
				}
				pf := m.Pagefault()
				switch {
				case pf.Flags&uffd.FaultWP != 0:
					h.wp.Add(1)
				case pf.Flags&uffd.FaultMinor != 0:
					h.minor.Add(1)
				default:
					h.missing.Add(1)
				}
				if err := h.resolveOne(pf); err != nil {
					h.errs <- err
				}
			}
		}
	}()
}

func (h *handler) resolveOne(pf uffd.Pagefault) error {
	if h.resolve != nil {
		return h.resolve(h, pf)
	}
	ps := uintptr(h.pageSize)
	addr := pf.Address &^ (ps - 1)
	off := addr - h.base
	for {
		_, err := h.fd.Copy(addr, addrOf(h.src)+off, ps, 0)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, uffd.ErrExist):
			return h.fd.Wake(addr, ps)
		case errors.Is(err, uffd.ErrEventsPending):
			time.Sleep(50 * time.Microsecond)
			continue
		}
		return err
	}
}

// close stops the handler by closing its fd's read side via deadline and checks for errors.
func (h *handler) close() {
	close(h.stop)
	h.fd.SetReadDeadline(time.Now())
	h.wg.Wait()
	h.fd.SetReadDeadline(time.Time{})
	select {
	case err := <-h.errs:
		h.t.Errorf("handler: %v", err)
	default:
	}
}

func newHandler(t testing.TB, r *remote, src []byte) *handler {
	h := &handler{t: t, fd: r.fd, base: r.addr, pageSize: r.pageSize, src: src}
	return h
}

// serveTouch serves the child's faults from src until the pending command c ends, and fails the
// test if the child saw a wrong byte or a signal. The handler serves until the test ends.
func serveTouch(t testing.TB, r *remote, src []byte, c *puppet.Call) *handler {
	t.Helper()
	h := newHandler(t, r, src)
	h.run()
	t.Cleanup(h.close)
	rep, _, err := c.Wait(60 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Mismatch != 0 || rep.Sigbus != 0 {
		t.Fatalf("child saw %d wrong pages (first bad byte at %d), %d SIGBUS", rep.Mismatch, rep.FirstBad, rep.Sigbus)
	}
	return h
}
