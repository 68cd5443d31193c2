//go:build linux

package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/puppet"
)

// connectFrom makes a child process connect to a fresh socket and returns the accepted end and
// the child.
func connectFrom(t *testing.T) (*net.UnixConn, *puppet.Puppet) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	if _, _, err := p.Do(puppet.Request{Op: "fc-raw", Str: path, Data: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, p
}

// fdinfoPid is the "Pid:" line of a pidfd's fdinfo: the pid it names (-1 once it exited).
func fdinfoPid(t *testing.T, fd int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Pid:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatalf("fdinfo %q: %v", l, err)
			}
			return n
		}
	}
	t.Fatalf("no Pid line in the fdinfo of fd %d:\n%s", fd, b)
	return 0
}

func readable(t *testing.T, fd int) bool {
	t.Helper()
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(p, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// The VMM's pidfd comes from SO_PEERPIDFD and names the process that connected: signal 0
// reaches it, fdinfo gives its pid, the fd is close-on-exec; once that process is gone the pidfd
// says so (readable, ESRCH) instead of naming whoever gets the pid next. Against the kernel, the
// connecting process a real child.
func TestPeerPidfdNamesTheConnectingProcess(t *testing.T) {
	c, p := connectFrom(t)
	cred, err := firecracker.PeerCred(c)
	if err != nil {
		t.Fatal(err)
	}
	fd, how, err := peerPidfd(c, cred.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if how != pidfdPeer {
		kerneltest.Require(t, "the kernel has no SO_PEERPIDFD (Linux < 6.5): got the pidfd by "+how)
	}
	if got := fdinfoPid(t, fd); got != p.Pid() || int(cred.Pid) != p.Pid() {
		t.Fatalf("pidfd names pid %d, SO_PEERCRED says %d, the child is %d", got, cred.Pid, p.Pid())
	}
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Fatalf("pidfd flags %#x, %v: want close-on-exec", fl, err)
	}
	if err := unix.PidfdSendSignal(fd, 0, nil, 0); err != nil {
		t.Fatalf("signal 0 through the pidfd: %v", err)
	}
	if readable(t, fd) {
		t.Fatal("the pidfd of a live process is readable")
	}
	p.Kill() // and reaped: its pid is free for reuse
	if err := unix.PidfdSendSignal(fd, 0, nil, 0); !errors.Is(err, unix.ESRCH) {
		t.Fatalf("signal 0 through the pidfd of a reaped process: %v, want ESRCH", err)
	}
	if !readable(t, fd) {
		t.Fatal("the pidfd of an exited process is not readable")
	}
}

// A peer reaped before its connection is looked at gets no pidfd naming a live process: either
// errPeerGone, or (Linux 6.16+, which keeps the struct pid of a socket's peer usable) a pidfd
// that says the process is gone.
func TestPeerPidfdOfAReapedPeer(t *testing.T) {
	c, p := connectFrom(t)
	cred, err := firecracker.PeerCred(c)
	if err != nil {
		t.Fatal(err)
	}
	p.Kill()
	fd, how, err := peerPidfd(c, cred.Pid)
	if how == pidfdByPid {
		kerneltest.Require(t, "the kernel has no SO_PEERPIDFD (Linux < 6.5)")
	}
	if errors.Is(err, errPeerGone) {
		t.Log("the kernel gives no pidfd for a reaped peer")
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.PidfdSendSignal(fd, 0, nil, 0); !errors.Is(err, unix.ESRCH) {
		t.Fatalf("signal 0 through the pidfd of a reaped peer: %v, want ESRCH", err)
	}
	if !readable(t, fd) {
		t.Fatal("the pidfd of a reaped peer is not readable")
	}
	t.Logf("the kernel gives a pidfd for a reaped peer; fdinfo Pid %d", fdinfoPid(t, fd))
}
