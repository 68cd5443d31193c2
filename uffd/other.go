//go:build !linux

package uffd

import (
	"syscall"
	"time"
)

// userfaultfd exists only on Linux. Elsewhere the package keeps its types, constants and message
// decoding, so that a program using it builds on every system, and every operation fails with
// ErrUnsupported (the error also matches errors.ErrUnsupported and syscall.ENOSYS).

func errNotLinux(op string) error {
	return &OpError{Op: op, Errno: syscall.ENOSYS, kind: ErrUnsupported, Detail: "userfaultfd exists only on Linux"}
}

// FD is a userfaultfd; on this system none can be created.
type FD struct{}

// Open fails with ErrUnsupported: userfaultfd exists only on Linux.
func Open(opts Options) (*FD, error) { return nil, errNotLinux("userfaultfd") }

// NewFD fails with ErrUnsupported: userfaultfd exists only on Linux.
func NewFD(fd int, blocking bool) (*FD, error) { return nil, errNotLinux("NewFD") }

// SupportedFeatures fails with ErrUnsupported: userfaultfd exists only on Linux.
func SupportedFeatures() (Feature, error) { return 0, errNotLinux("UFFDIO_API") }

func (f *FD) Fd() int                     { return -1 }
func (f *FD) UserModeOnly() bool          { return false }
func (f *FD) Origin() string              { return "" }
func (f *FD) Close() error                { return nil }
func (f *FD) Info() (Info, error)         { return Info{}, errNotLinux("fdinfo") }
func (f *FD) NewReader() (*Reader, error) { return nil, errNotLinux("read") }

func (f *FD) API(features Feature) (APIResult, error) {
	return APIResult{}, errNotLinux("UFFDIO_API")
}

func (f *FD) SyscallConn() (syscall.RawConn, error) { return nil, errNotLinux("SyscallConn") }
func (f *FD) SetReadDeadline(t time.Time) error     { return errNotLinux("SetReadDeadline") }

func (f *FD) Register(start, length uintptr, mode RegisterMode) (Ioctls, error) {
	return 0, errNotLinux("UFFDIO_REGISTER")
}
func (f *FD) Unregister(start, length uintptr) error { return errNotLinux("UFFDIO_UNREGISTER") }
func (f *FD) Wake(start, length uintptr) error       { return errNotLinux("UFFDIO_WAKE") }
func (f *FD) Copy(dst, src, length uintptr, mode CopyMode) (uintptr, error) {
	return 0, errNotLinux("UFFDIO_COPY")
}
func (f *FD) Zeropage(start, length uintptr, mode ZeropageMode) (uintptr, error) {
	return 0, errNotLinux("UFFDIO_ZEROPAGE")
}
func (f *FD) Writeprotect(start, length uintptr, mode WriteprotectMode) error {
	return errNotLinux("UFFDIO_WRITEPROTECT")
}
func (f *FD) Continue(start, length uintptr, mode ContinueMode) (uintptr, error) {
	return 0, errNotLinux("UFFDIO_CONTINUE")
}
func (f *FD) Poison(start, length uintptr, mode PoisonMode) (uintptr, error) {
	return 0, errNotLinux("UFFDIO_POISON")
}
func (f *FD) Move(dst, src, length uintptr, mode MoveMode) (uintptr, error) {
	return 0, errNotLinux("UFFDIO_MOVE")
}

// Reader reads messages from an FD; on this system there are none.
type Reader struct{}

func (r *Reader) Read(msgs []Msg) (int, error)    { return 0, errNotLinux("read") }
func (r *Reader) TryRead(msgs []Msg) (int, error) { return 0, errNotLinux("read") }

// Pagemap is an open /proc/<pid>/pagemap; on this system none can be opened.
type Pagemap struct{}

// OpenPagemap fails with ErrUnsupported: PAGEMAP_SCAN exists only on Linux.
func OpenPagemap(pid int) (*Pagemap, error) { return nil, errNotLinux("open pagemap") }

func (p *Pagemap) Close() error { return nil }
func (p *Pagemap) Pid() int     { return 0 }
func (p *Pagemap) Scan(buf []PageRegion, s ScanRequest) (n int, walkEnd uintptr, err error) {
	return 0, 0, errNotLinux("PAGEMAP_SCAN")
}
func (p *Pagemap) Dirty(buf []PageRegion, start, end uintptr, rearm bool) (dirty []PageRegion, next uintptr, err error) {
	return nil, 0, errNotLinux("PAGEMAP_SCAN")
}
func (p *Pagemap) Entries(addr uintptr, out []PagemapEntry) (int, error) {
	return 0, errNotLinux("read pagemap")
}
func (p *Pagemap) Entry(addr uintptr) (PagemapEntry, error) {
	return 0, errNotLinux("read pagemap")
}
