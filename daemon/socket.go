//go:build linux

package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrSocketInUse says a socket path is taken: another process listens on it, or a file that is
// not a socket is there. A stale socket file (nobody listening) is not in use: it is replaced.
var ErrSocketInUse = errors.New("socket path in use")

// A Listener is a Unix socket listening at a path, bound the way the daemon binds its own: under
// a temporary name, its mode (0600, or 0660 for a group) and owner set, then renamed into place
// over a stale socket file, so no client connects before the permissions hold and the path
// never goes missing. Listen refuses a path another process listens on (ErrSocketInUse).
type Listener struct {
	*net.UnixListener
	path string
	// id is the (device, inode) of the file bound: Remove unlinks the path only while it still
	// names that file, not a successor's socket renamed over it.
	id fileID
}

// Listen listens on path; group > 0 makes the socket 0660 and owned by that group, else it is
// 0600. Closing the listener leaves the file: Remove unlinks it.
func Listen(path string, group int) (*Listener, error) { return listen("unix", path, group) }

// ListenPacket is Listen for a SOCK_SEQPACKET socket (mode 0600), such as a hand-off socket.
func ListenPacket(path string) (*Listener, error) { return listen("unixpacket", path, 0) }

// ListenerFrom makes a Listener of ln, a socket bound at path that another process passed on
// (a hand-off): Remove unlinks path only while it names the file path names now.
func ListenerFrom(ln *net.UnixListener, path string) *Listener {
	ln.SetUnlinkOnClose(false)
	id, _ := statID(path)
	return &Listener{UnixListener: ln, path: path, id: id}
}

func listen(network, path string, group int) (*Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("daemon: %s exists and is not a socket: %w", path, ErrSocketInUse)
		}
		// Stale only if nobody listens: connect(2) is refused. EAGAIN means a listener with a
		// full backlog — a busy daemon, not a stale file.
		c, err := net.Dial(network, path)
		switch {
		case err == nil:
			c.Close()
			return nil, fmt.Errorf("daemon: %s: another daemon is listening: %w", path, ErrSocketInUse)
		case errors.Is(err, unix.ECONNREFUSED), errors.Is(err, unix.ENOENT):
		default:
			return nil, fmt.Errorf("daemon: %s: cannot tell whether it is stale: %w", path, err)
		}
	}
	return bind(network, path, group)
}

// bind binds a socket under a temporary name and renames it to path (over whatever path names:
// listen checked that it is stale; a successor's hand-off socket replaces its predecessor's),
// holding the path's lock for the rename, as Remove does for its check and unlink.
func bind(network, path string, group int) (*Listener, error) {
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	os.Remove(tmp)
	ln, err := net.ListenUnix(network, &net.UnixAddr{Name: tmp, Net: network})
	if err != nil {
		return nil, fmt.Errorf("daemon: listen: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (*Listener, error) {
		ln.Close()
		os.Remove(tmp)
		return nil, err
	}
	mode := os.FileMode(0o600)
	if group > 0 {
		mode = 0o660
		if err := os.Chown(tmp, -1, group); err != nil {
			return fail(fmt.Errorf("daemon: chown socket: %w", err))
		}
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(fmt.Errorf("daemon: chmod socket: %w", err))
	}
	// The temporary name is ours alone (it carries our pid); rename keeps the inode.
	id, err := statID(tmp)
	if err == nil {
		err = withPathLock(path, func() error { return os.Rename(tmp, path) })
	}
	if err != nil {
		return fail(fmt.Errorf("daemon: %w", err))
	}
	return &Listener{UnixListener: ln, path: path, id: id}, nil
}

// Path is the socket's path.
func (l *Listener) Path() string { return l.path }

// Remove unlinks the socket file if the path still names the one bound, not a successor's:
// the check and the unlink hold the path's lock, which a successor's rename into place takes
// too, so it cannot come between them.
func (l *Listener) Remove() {
	withPathLock(l.path, func() error {
		if id, err := statID(l.path); err == nil && id == l.id {
			os.Remove(l.path)
		}
		return nil
	})
}

// withPathLock runs fn holding an exclusive flock on the lock file beside path
// (".<name>.lock", left in place: removing it would let two lockers hold two files). Without
// the lock file (a read-only directory) fn runs unlocked.
func withPathLock(path string, fn func() error) error {
	lp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".lock")
	f, err := os.OpenFile(lp, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fn()
	}
	defer f.Close()
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fn()
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return fn()
}

// fileID identifies a file: what a path names, whatever the path.
type fileID struct{ dev, ino uint64 }

func statID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fileID{}, err
	}
	return fileID{uint64(st.Dev), uint64(st.Ino)}, nil
}
