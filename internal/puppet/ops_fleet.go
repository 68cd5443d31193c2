//go:build linux

package puppet

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// One child standing for many VMMs: a fleet benchmark needs a thousand VMs, not a thousand
// processes.

var fleetUffds []*uffd.FD // kept open, as Firecracker keeps its copy; guarded by fcMu

func init() {
	// fc-fleet: Str = socket path; Ints = [VMs, bytes of guest memory per handshake, version,
	// handshakes per connection (default 1)]. For each VM it connects once and, per handshake,
	// maps private anonymous memory, creates a userfaultfd with EVENT_REMOVE, registers the
	// area in MISSING mode and sends the handshake (file offset 0) with that uffd — what that
	// many Firecracker processes would do. Connections (v1.12+) and uffds stay open until
	// fc-close or exit. Reply: Ints = the areas, VM by VM.
	registerOp("fc-fleet", func(c *child, r *Request) (Reply, []int) {
		if len(r.Ints) < 3 {
			return Reply{Err: "fc-fleet wants Ints = [VMs, bytes, version, handshakes per connection]"}, nil
		}
		vms, size, v := int(r.Ints[0]), int(r.Ints[1]), firecracker.Version(r.Ints[2])
		per := 1
		if len(r.Ints) > 3 {
			per = int(r.Ints[3])
		}
		var areas []int64
		for range vms {
			conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: r.Str, Net: "unix"})
			if err != nil {
				return Reply{Err: err.Error(), Ints: areas}, nil
			}
			for range per {
				id, err := c.fleetHandshake(conn, size, v)
				if err != nil {
					conn.Close()
					return Reply{Err: err.Error(), Ints: areas}, nil
				}
				areas = append(areas, int64(id))
			}
			if v.KeepsSocketOpen() {
				fcMu.Lock()
				fcConns = append(fcConns, conn)
				fcMu.Unlock()
			} else {
				conn.Close()
			}
		}
		return Reply{Ints: areas}, nil
	})
}

// fleetHandshake maps, registers and sends one region with a fresh uffd on conn; it returns
// the area.
func (c *child) fleetHandshake(conn *net.UnixConn, size int, v firecracker.Version) (int, error) {
	a, err := memory.Map(memory.Anon, size, false)
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	c.areas[id] = a
	c.mu.Unlock()
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		return 0, err
	}
	fcMu.Lock()
	fleetUffds = append(fleetUffds, f)
	fcMu.Unlock()
	if _, err := f.API(uffd.FeatureEventRemove); err != nil {
		return 0, err
	}
	if _, err := f.Register(a.Addr(), uintptr(len(a.Mem)), uffd.ModeMissing); err != nil {
		return 0, err
	}
	msg, err := firecracker.Encode([]firecracker.Region{{Base: a.Addr(), Size: uintptr(len(a.Mem)),
		PageSize: uintptr(a.PageSize)}}, v)
	if err != nil {
		return 0, err
	}
	if _, _, err := conn.WriteMsgUnix(msg, unix.UnixRights(f.Fd()), nil); err != nil {
		return 0, fmt.Errorf("send handshake: %w", err)
	}
	return id, nil
}
