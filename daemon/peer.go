//go:build linux

package daemon

import (
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

// How the VMM's pidfd was obtained (logged with each VM).
const (
	pidfdPeer  = "SO_PEERPIDFD"
	pidfdByPid = "pidfd_open"
)

// errPeerGone says the connecting process exited before its pidfd could be taken.
var errPeerGone = errors.New("the VMM exited before it was served")

// peerPidfd returns a pidfd (close-on-exec) for the process that connected c.
//
// SO_PEERPIDFD (Linux 6.5+) makes the pidfd from the struct pid the socket recorded at
// connect(2), so it names the connecting process even if that process has exited and its pid was
// reused since — unlike pidfd_open on SO_PEERCRED's number, which opens whatever process holds
// the number now, and a SIGKILL through it would hit a stranger. The kernel answers ENOPROTOOPT
// when it does not know the option (before 6.5): only then is the pid opened by number (pid is
// SO_PEERCRED's), and how tells which way it went. EINVAL or ESRCH mean the peer is already gone
// (before 6.16 the kernel cannot hand out a pidfd for a reaped process): that is errPeerGone, not
// a reason to open the number, which may name someone else by now.
func peerPidfd(c *net.UnixConn, pid int32) (fd int, how string, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, "", err
	}
	var gerr error
	if err := rc.Control(func(s uintptr) {
		fd, gerr = unix.GetsockoptInt(int(s), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	}); err != nil {
		return -1, "", err
	}
	switch {
	case gerr == nil:
		return fd, pidfdPeer, nil
	case errors.Is(gerr, unix.ENOPROTOOPT):
		fd, err := unix.PidfdOpen(int(pid), 0)
		if errors.Is(err, unix.ESRCH) {
			err = errPeerGone
		}
		return fd, pidfdByPid, err
	case errors.Is(gerr, unix.EINVAL), errors.Is(gerr, unix.ESRCH):
		return -1, "", errPeerGone
	default:
		return -1, "", &net.OpError{Op: "getsockopt SO_PEERPIDFD", Net: "unix", Err: gerr}
	}
}
