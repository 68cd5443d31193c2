//go:build linux

package memory

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Map maps size bytes (rounded up to the page size) of kind k, with an alias if asked and the
// kind is file-backed. Hugetlb areas are mapped MAP_NORESERVE, so mapping succeeds with an empty
// pool and a later fill fails instead — as Firecracker maps guest memory.
func Map(k Kind, size int, alias bool) (*Area, error) {
	ps, err := PageSize(k)
	if err != nil {
		return nil, err
	}
	size = (size + ps - 1) / ps * ps
	a := &Area{Kind: k, PageSize: ps}
	if k == Anon {
		a.Mem, err = unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return nil, fmt.Errorf("mmap anon %d bytes: %w", size, err)
		}
		return a, nil
	}
	flags := unix.MFD_CLOEXEC
	if k.Huge() {
		flags |= unix.MFD_HUGETLB
	}
	fd, err := unix.MemfdCreate("faultline-"+k.String(), flags)
	if err != nil {
		return nil, fmt.Errorf("memfd_create %v: %w", k, err)
	}
	a.File = os.NewFile(uintptr(fd), "memfd:"+k.String())
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		a.Unmap()
		return nil, fmt.Errorf("ftruncate %v memfd to %d: %w", k, size, err)
	}
	mflags := unix.MAP_SHARED
	if !k.Shared() {
		mflags = unix.MAP_PRIVATE
	}
	if k.Huge() {
		mflags |= unix.MAP_NORESERVE
	}
	a.Mem, err = unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, mflags)
	if err != nil {
		a.Unmap()
		return nil, fmt.Errorf("mmap %v %d bytes: %w", k, size, err)
	}
	if alias {
		af := unix.MAP_SHARED
		if k.Huge() {
			af |= unix.MAP_NORESERVE
		}
		a.Alias, err = unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, af)
		if err != nil {
			a.Unmap()
			return nil, fmt.Errorf("mmap %v alias: %w", k, err)
		}
	}
	return a, nil
}

// Release empties the pages [off, off+n) the way the selftests do: MADV_DONTNEED for private
// memory, MADV_REMOVE (punch the page cache) for shared memory.
func (a *Area) Release(off, n int) error {
	adv := unix.MADV_DONTNEED
	if a.Kind.Shared() {
		adv = unix.MADV_REMOVE
	}
	if err := unix.Madvise(a.Mem[off:off+n], adv); err != nil {
		return fmt.Errorf("madvise %v: %w", a.Kind, err)
	}
	if a.Kind == ShmemPrivate || a.Kind == HugetlbPrivate {
		// Private copies are gone; drop the page cache behind them too so the area reads empty.
		if err := unix.Fallocate(int(a.File.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n)); err != nil {
			return fmt.Errorf("punch %v: %w", a.Kind, err)
		}
	}
	return nil
}

// Unmap unmaps the area and closes its memfd.
func (a *Area) Unmap() error {
	var first error
	for _, m := range [][]byte{a.Mem, a.Alias} {
		if m != nil {
			if err := unix.Munmap(m); err != nil && first == nil {
				first = err
			}
		}
	}
	a.Mem, a.Alias = nil, nil
	if a.File != nil {
		a.File.Close()
		a.File = nil
	}
	return first
}
