//go:build !linux

package memory

import (
	"errors"
	"fmt"
)

// The memory kinds are those of Linux's userfaultfd: elsewhere nothing can be mapped, and every
// operation fails with errors.ErrUnsupported.

var errNotLinux = fmt.Errorf("memory: %w: the memory kinds of userfaultfd exist only on Linux", errors.ErrUnsupported)

// Map fails with errors.ErrUnsupported.
func Map(k Kind, size int, alias bool) (*Area, error) { return nil, errNotLinux }

// Release fails with errors.ErrUnsupported.
func (a *Area) Release(off, n int) error { return errNotLinux }

// Unmap has nothing to unmap.
func (a *Area) Unmap() error { return nil }

// LockHugePages fails with errors.ErrUnsupported.
func LockHugePages() (unlock func(), err error) { return nil, errNotLinux }
