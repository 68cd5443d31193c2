//go:build linux

package puppet

import (
	"errors"
	"fmt"
	"net"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/firecracker"
)

// The VMM's half of Firecracker's UFFD handshake, played by the child that owns the memory.

var (
	fcMu    sync.Mutex
	fcConns []*net.UnixConn
)

func init() {
	// fc-handshake: Str = socket path; Ints = [version, area, file offset, area, file offset, ...].
	// Sends one handshake with the current uffd for the listed areas (whole areas, their page
	// size). With v1.12 the connection stays open until fc-close or exit.
	registerOp("fc-handshake", func(c *child, r *Request) (Reply, []int) {
		f := c.currentUffd()
		if f == nil {
			return Reply{Err: "no uffd"}, nil
		}
		if len(r.Ints) < 3 || len(r.Ints)%2 != 1 {
			return Reply{Err: "fc-handshake wants Ints = [version, area, offset, ...]"}, nil
		}
		var regions []firecracker.Region
		for i := 1; i < len(r.Ints); i += 2 {
			a, err := c.area(int(r.Ints[i]))
			if err != nil {
				return Reply{Err: err.Error()}, nil
			}
			regions = append(regions, firecracker.Region{Base: a.Addr(), Size: uintptr(len(a.Mem)),
				Offset: r.Ints[i+1], PageSize: uintptr(a.PageSize)})
		}
		conn, err := firecracker.Send(r.Str, regions, f.Fd(), firecracker.Version(r.Ints[0]))
		if err != nil {
			return Reply{Err: err.Error()}, nil
		}
		if conn != nil {
			fcMu.Lock()
			fcConns = append(fcConns, conn)
			fcMu.Unlock()
		}
		return Reply{}, nil
	})
	// fc-raw: Str = socket path, Data = bytes to send, Ints = [number of uffd copies to attach
	// (0, 1 or 2)]; keeps the connection open. For malformed-handshake tests.
	registerOp("fc-raw", func(c *child, r *Request) (Reply, []int) {
		conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: r.Str, Net: "unix"})
		if err != nil {
			return Reply{Err: err.Error()}, nil
		}
		var fds []int
		if len(r.Ints) > 0 && r.Ints[0] > 0 {
			f := c.currentUffd()
			if f == nil {
				conn.Close()
				return Reply{Err: "no uffd"}, nil
			}
			for range r.Ints[0] {
				fds = append(fds, f.Fd())
			}
		}
		var oob []byte
		if len(fds) > 0 {
			oob = rights(fds)
		}
		if _, _, err := conn.WriteMsgUnix(r.Data, oob, nil); err != nil {
			conn.Close()
			return Reply{Err: err.Error()}, nil
		}
		fcMu.Lock()
		fcConns = append(fcConns, conn)
		fcMu.Unlock()
		return Reply{}, nil
	})
	// fc-close closes the handshake connections (a v1.12 VMM exiting closes them too).
	registerOp("fc-close", func(c *child, r *Request) (Reply, []int) {
		fcMu.Lock()
		defer fcMu.Unlock()
		var errs []error
		for _, conn := range fcConns {
			errs = append(errs, conn.Close())
		}
		fcConns = nil
		if err := errors.Join(errs...); err != nil {
			return Reply{Err: fmt.Sprint(err)}, nil
		}
		return Reply{}, nil
	})
}

func rights(fds []int) []byte { return unix.UnixRights(fds...) }
