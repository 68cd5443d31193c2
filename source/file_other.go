//go:build !linux

package source

import (
	"fmt"

	"github.com/faultline-go/faultline/uffd"
)

// File is a memory snapshot file mapped for UFFDIO_COPY; on this system, which has no
// userfaultfd, none can be opened.
type File struct{}

// OpenFile fails with uffd.ErrUnsupported: a File serves userfaultfd, which exists only on Linux.
func OpenFile(path string) (*File, error) {
	return nil, fmt.Errorf("source: %s: %w: userfaultfd exists only on Linux", path, uffd.ErrUnsupported)
}

func (s *File) Size() int64               { return 0 }
func (s *File) Bytes(off, n int64) []byte { return nil }
func (s *File) ReadAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("source: %w", uffd.ErrUnsupported)
}
func (s *File) ZeroRun(off, n int64) int64 { return 0 }
func (s *File) Close() error               { return nil }

var (
	_ Resident = (*File)(nil)
	_ Zeros    = (*File)(nil)
)
