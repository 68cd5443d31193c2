//go:build linux

package firecracker

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// pair returns two connected Unix stream sockets.
func pair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sock")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// newUffd makes a real userfaultfd (nothing registered: nothing can fault).
func newUffd(t *testing.T) int {
	t.Helper()
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.API(0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f.Fd()
}

var testRegions = []Region{{Base: 1 << 30, Size: 2 << 20, Offset: 0, PageSize: 4096}}

func TestConnTwoHandshakesOneStream(t *testing.T) {
	vmm, handler := pair(t)
	c := NewConn(handler, Limits{FileSize: 4 << 20})
	for i := 0; i < 2; i++ {
		msg, _ := Encode([]Region{{Base: uintptr(1+i) << 30, Size: 2 << 20, Offset: int64(i) << 21, PageSize: 4096}}, V1_12)
		if _, _, err := vmm.WriteMsgUnix(msg, unix.UnixRights(newUffd(t)), nil); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 2; i++ {
		h, err := c.Next()
		if err != nil {
			t.Fatalf("handshake %d: %v", i, err)
		}
		if h.Version != V1_12 || h.Regions[0].Offset != int64(i)<<21 {
			t.Fatalf("handshake %d: %+v", i, h)
		}
		if err := checkUffd(h.UFFD); err != nil {
			t.Fatal(err)
		}
		unix.Close(h.UFFD)
	}
	vmm.Close()
	if _, err := c.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the VMM closed: %v, want io.EOF", err)
	}
}

// The JSON may arrive in one segment and its fd with a later one.
func TestConnDataBeforeFD(t *testing.T) {
	vmm, handler := pair(t)
	c := NewConn(handler, Limits{FileSize: 4 << 20})
	msg, _ := Encode(testRegions, V1_7)
	if _, err := vmm.Write(msg[:10]); err != nil {
		t.Fatal(err)
	}
	done := make(chan *Handshake, 1)
	go func() {
		h, err := c.Next()
		if err != nil {
			t.Error(err)
		}
		done <- h
	}()
	if _, err := vmm.Write(msg[10:]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := vmm.WriteMsgUnix([]byte(" "), unix.UnixRights(newUffd(t)), nil); err != nil {
		t.Fatal(err)
	}
	h := <-done
	if h == nil || h.Version != V1_7 || h.Regions[0] != testRegions[0] {
		t.Fatalf("got %+v", h)
	}
	unix.Close(h.UFFD)
}

// A non-uffd fd (here a pipe) is refused and closed.
func TestConnRejectsOtherFDs(t *testing.T) {
	vmm, handler := pair(t)
	c := NewConn(handler, Limits{FileSize: 4 << 20})
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	msg, _ := Encode(testRegions, V1_12)
	vmm.WriteMsgUnix(msg, unix.UnixRights(p[0]), nil)
	if _, err := c.Next(); !errors.Is(err, ErrHandshake) {
		t.Fatalf("pipe as uffd: %v", err)
	}
}

// A handshake with many regions (memory hotplug) is larger than one read: it is assembled
// across reads, and the region count limit applies.
func TestConnLargeMessage(t *testing.T) {
	vmm, handler := pair(t)
	const n = 2000
	rs := make([]Region, n)
	for i := range rs {
		rs[i] = Region{Base: uintptr(1<<30 + i*(4<<20)), Size: 2 << 20, Offset: int64(i) << 21, PageSize: 4096}
	}
	msg, _ := Encode(rs, V1_12)
	if len(msg) <= 64<<10 {
		t.Fatalf("message of %d bytes fits one read; make it bigger", len(msg))
	}
	go vmm.WriteMsgUnix(msg, unix.UnixRights(newUffd(t)), nil)
	c := NewConn(handler, Limits{FileSize: int64(n) << 21})
	h, err := c.Next()
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(h.UFFD)
	if len(h.Regions) != n || h.Regions[n-1] != rs[n-1] {
		t.Fatalf("got %d regions, last %+v", len(h.Regions), h.Regions[len(h.Regions)-1])
	}
	// The same message against a lower limit is refused.
	vmm2, handler2 := pair(t)
	go vmm2.WriteMsgUnix(msg, unix.UnixRights(newUffd(t)), nil)
	if _, err := NewConn(handler2, Limits{FileSize: int64(n) << 21, MaxRegions: 100}).Next(); !errors.Is(err, ErrHandshake) {
		t.Fatalf("over the region limit: %v", err)
	}
}
