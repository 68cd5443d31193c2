//go:build linux

package source

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// File is a memory snapshot file, mapped read-only and shared: UFFDIO_COPY reads the page cache
// directly, and every VM served from the same file shares one mapping and one page cache.
// Holes of a sparse file are known zeros.
type File struct {
	f     *os.File
	m     []byte
	size  int64
	holes []hole // sorted, from SEEK_HOLE/SEEK_DATA at open
}

type hole struct{ start, end int64 }

// OpenFile opens and maps the snapshot at path.
func OpenFile(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("source: %w", err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("source: %s is not a regular file", path)
	}
	s := &File{f: f, size: st.Size()}
	if s.size == 0 {
		f.Close()
		return nil, fmt.Errorf("source: %s is empty", path)
	}
	s.m, err = unix.Mmap(int(f.Fd()), 0, int(s.size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("source: mmap %s: %w", path, err)
	}
	s.holes = findHoles(int(f.Fd()), s.size)
	return s, nil
}

// findHoles lists the holes of a sparse file. Filesystems without SEEK_HOLE report none.
func findHoles(fd int, size int64) []hole {
	var hs []hole
	for off := int64(0); off < size; {
		h, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil || h >= size {
			break
		}
		d, err := unix.Seek(fd, h, unix.SEEK_DATA)
		if err != nil { // ENXIO: hole to the end
			d = size
		}
		hs = append(hs, hole{h, d})
		off = d
	}
	return hs
}

func (s *File) Size() int64 { return s.size }

func (s *File) Bytes(off, n int64) []byte { return s.m[off : off+n] }

func (s *File) ReadAt(p []byte, off int64) (int, error) { return s.f.ReadAt(p, off) }

// ZeroRun reports the zero bytes from off within a hole of the file.
func (s *File) ZeroRun(off, n int64) int64 {
	i := sort.Search(len(s.holes), func(i int) bool { return s.holes[i].end > off })
	if i == len(s.holes) || s.holes[i].start > off {
		return 0
	}
	return min(n, s.holes[i].end-off)
}

// Close unmaps and closes the file. The engine must have stopped using it.
func (s *File) Close() error {
	var errs []error
	if s.m != nil {
		errs = append(errs, unix.Munmap(s.m))
		s.m = nil
	}
	errs = append(errs, s.f.Close())
	return errors.Join(errs...)
}

var (
	_ Resident    = (*File)(nil)
	_ Zeros       = (*File)(nil)
	_ io.ReaderAt = (*File)(nil)
)
