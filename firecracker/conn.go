//go:build linux

package firecracker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

var errTimeout = errors.New("timeout")

// Conn reads handshakes from a VMM's stream.
type Conn struct {
	c   *net.UnixConn
	lim Limits
	// Timeout bounds how long a started handshake may take to arrive whole (default 5 s).
	Timeout time.Duration
	buf     []byte
	fds     []int
	eof     bool
}

// NewConn wraps an accepted connection. Limits.FileSize should be the memory file's size.
func NewConn(c *net.UnixConn, lim Limits) *Conn {
	return &Conn{c: c, lim: lim.withDefaults(), Timeout: 5 * time.Second}
}

// Next reads the next handshake. It returns io.EOF when the peer closed the stream between
// handshakes (for a v1.12+ VMM: it exited), and an error matching ErrHandshake for malformed
// input, after closing any fd that came with it.
func (c *Conn) Next() (*Handshake, error) {
	for {
		if msg, rest, ok, err := c.split(); err != nil {
			c.drop()
			return nil, err
		} else if ok {
			if len(c.fds) == 0 && !c.eof {
				// The data came first; its fd may follow in the next read.
				if err := c.read(); err != nil && !errors.Is(err, io.EOF) {
					c.drop()
					if errors.Is(err, errTimeout) {
						return nil, invalid("message without a userfaultfd (no SCM_RIGHTS within %v)", c.Timeout)
					}
					return nil, err
				}
				continue
			}
			c.buf = rest
			fds := c.fds
			c.fds = nil
			switch len(fds) {
			case 0:
				return nil, invalid("message without a userfaultfd (SCM_RIGHTS)")
			case 1:
			default:
				closeAll(fds)
				return nil, invalid("%d file descriptors with one message, want exactly one userfaultfd", len(fds))
			}
			if err := checkUffd(fds[0]); err != nil {
				unix.Close(fds[0])
				return nil, err
			}
			regions, v, err := Decode(msg, c.lim)
			if err != nil {
				unix.Close(fds[0])
				return nil, err
			}
			return &Handshake{Regions: regions, Version: v, UFFD: fds[0]}, nil
		}
		if c.eof {
			if len(bytes.TrimSpace(c.buf)) == 0 && len(c.fds) == 0 {
				return nil, io.EOF
			}
			c.drop()
			return nil, invalid("stream ended inside a handshake (%d bytes)", len(c.buf))
		}
		if err := c.read(); err != nil && !errors.Is(err, io.EOF) {
			c.drop()
			return nil, err
		}
	}
}

// split finds one complete JSON value at the start of the buffer.
func (c *Conn) split() (msg, rest []byte, ok bool, err error) {
	trimmed := bytes.TrimLeft(c.buf, " \t\r\n")
	if len(trimmed) == 0 {
		return nil, nil, false, nil
	}
	if trimmed[0] != '[' {
		return nil, nil, false, invalid("message does not start with a JSON array: %q", preview(trimmed))
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			if len(c.buf) > c.lim.MaxMessage {
				return nil, nil, false, invalid("message exceeds %d bytes", c.lim.MaxMessage)
			}
			return nil, nil, false, nil // incomplete: read more
		}
		return nil, nil, false, invalid("malformed JSON: %v", err)
	}
	n := dec.InputOffset()
	return trimmed[:n], trimmed[n:], true, nil
}

func (c *Conn) read() error {
	if len(c.buf) > 0 || len(c.fds) > 0 {
		c.c.SetReadDeadline(time.Now().Add(c.Timeout))
	} else {
		c.c.SetReadDeadline(time.Time{})
	}
	b := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(16*4))
	n, oobn, flags, _, err := c.c.ReadMsgUnix(b, oob) // Go sets MSG_CMSG_CLOEXEC on Linux
	n, oobn = max(n, 0), max(oobn, 0)
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for i := range msgs {
				if fds, err := unix.ParseUnixRights(&msgs[i]); err == nil {
					c.fds = append(c.fds, fds...)
				}
			}
		}
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return invalid("control data truncated: too many file descriptors")
	}
	c.buf = append(c.buf, b[:n]...)
	if len(c.buf) > c.lim.MaxMessage {
		return invalid("message exceeds %d bytes", c.lim.MaxMessage)
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("%w: %w", errTimeout, invalid("handshake incomplete after %v (%d bytes, %d fds)", c.Timeout, len(c.buf), len(c.fds)))
		}
		if errors.Is(err, io.EOF) {
			c.eof = true
			return io.EOF
		}
		return fmt.Errorf("firecracker: read handshake: %w", err)
	}
	if n == 0 && oobn == 0 {
		c.eof = true
		return io.EOF
	}
	return nil
}

func (c *Conn) drop() {
	closeAll(c.fds)
	c.fds, c.buf = nil, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func preview(b []byte) []byte {
	if len(b) > 32 {
		return b[:32]
	}
	return b
}

// checkUffd makes sure fd is a userfaultfd before anything is done with it.
func checkUffd(fd int) error {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return fmt.Errorf("firecracker: received fd: %w", err)
	}
	if link != "anon_inode:[userfaultfd]" {
		return invalid("the received fd is %s, not a userfaultfd", link)
	}
	return nil
}

// Ucred is the peer's credentials as SO_PEERCRED reports them.
type Ucred = unix.Ucred

// PeerCred returns the credentials of the process at the other end (SO_PEERCRED): the VMM's
// pid, uid and gid as of connect.
func PeerCred(c *net.UnixConn) (*Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// Send is the VMM's half: connect to socket and send the regions with uffd attached, as
// Firecracker of version v does. For versions before v1.12 the connection is closed at once
// (the returned conn is nil); from v1.12 it is returned open, and closing it tells the handler
// the VMM is gone.
func Send(socket string, regions []Region, uffd int, v Version) (*net.UnixConn, error) {
	msg, err := Encode(regions, v)
	if err != nil {
		return nil, err
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("firecracker: connect %s: %w", socket, err)
	}
	if _, _, err := c.WriteMsgUnix(msg, unix.UnixRights(uffd), nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("firecracker: send handshake: %w", err)
	}
	if !v.KeepsSocketOpen() {
		c.Close()
		return nil, nil
	}
	return c, nil
}
