//go:build !linux

package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/faultline-go/faultline/uffd"
)

// Daemon is a running server. It needs userfaultfd and pidfds, which exist only on Linux:
// elsewhere New fails with an error matching uffd.ErrUnsupported and errors.ErrUnsupported, so
// that a program importing the daemon builds on every system.
type Daemon struct{}

var errNotLinux = fmt.Errorf("daemon: userfaultfd exists only on Linux: %w (%w)", uffd.ErrUnsupported, errors.ErrUnsupported)

// New fails with ErrUnsupported on this system.
func New(cfg Config) (*Daemon, error) { return nil, errNotLinux }

func (d *Daemon) Addr() string                           { return "" }
func (d *Daemon) Serve() error                           { return errNotLinux }
func (d *Daemon) ServeContext(ctx context.Context) error { return errNotLinux }
func (d *Daemon) Drain()                                 {}
func (d *Daemon) Close()                                 {}
func (d *Daemon) Live() int                              { return 0 }
func (d *Daemon) Summary() Summary                       { return Summary{} }
func (d *Daemon) Done() <-chan struct{}                  { c := make(chan struct{}); close(c); return c }
