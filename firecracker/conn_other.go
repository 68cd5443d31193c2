//go:build !linux

package firecracker

import (
	"fmt"
	"net"
	"time"

	"github.com/faultline-go/faultline/uffd"
)

// The handshake's wire format (Decode, Encode) is portable; receiving or sending a userfaultfd
// is not, as userfaultfd exists only on Linux: here Conn, PeerCred and Send fail with
// uffd.ErrUnsupported.

var errNotLinux = fmt.Errorf("firecracker: %w: userfaultfd exists only on Linux", uffd.ErrUnsupported)

// Conn reads handshakes from a VMM's stream; on this system there are none.
type Conn struct {
	// Timeout bounds how long a started handshake may take to arrive whole.
	Timeout time.Duration
}

// NewConn returns a Conn whose Next fails with uffd.ErrUnsupported.
func NewConn(c *net.UnixConn, lim Limits) *Conn { return &Conn{Timeout: 5 * time.Second} }

// Next fails with uffd.ErrUnsupported.
func (c *Conn) Next() (*Handshake, error) { return nil, errNotLinux }

// Ucred is the peer's credentials, with the fields of Linux's struct ucred.
type Ucred struct {
	Pid      int32
	Uid, Gid uint32
}

// PeerCred fails with uffd.ErrUnsupported.
func PeerCred(c *net.UnixConn) (*Ucred, error) { return nil, errNotLinux }

// Send fails with uffd.ErrUnsupported.
func Send(socket string, regions []Region, uffd int, v Version) (*net.UnixConn, error) {
	return nil, errNotLinux
}
