//go:build linux

package puppet

import (
	"errors"

	"github.com/faultline-go/faultline/uffd"
)

// Commands of the basic uffd tests (uffd/register_test.go and friends).

func init() {
	registerOp("basic-register", basicRegister)
}

// basicRegister registers [Off, Off+Len) of the area (Len 0: to its end) in Mode with the child's
// current userfaultfd and reports the outcome instead of failing, so the test can check the
// errno: Reply.Ints = [errno (0 on success), ioctls], Reply.Str = the error text.
func basicRegister(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	f := c.currentUffd()
	if f == nil {
		return Reply{Err: "no uffd"}, nil
	}
	n := r.Len
	if n == 0 {
		n = len(a.Mem) - r.Off
	}
	io, err := f.Register(a.Addr()+uintptr(r.Off), uintptr(n), uffd.RegisterMode(r.Mode))
	if err == nil {
		return Reply{Ints: []int64{0, int64(io)}}, nil
	}
	var oe *uffd.OpError
	if !errors.As(err, &oe) {
		return Reply{Err: "register: " + err.Error()}, nil
	}
	return Reply{Ints: []int64{int64(oe.Errno), 0}, Str: oe.Error()}, nil
}
