package source

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// Source is a memory image. ReadAt may be slow and may fail; the engine calls it off the fault
// path and never installs a page it could not read whole. It should return within a bounded
// time (a remote source applies its own timeout): an engine that is stopping waits for reads in
// flight.
type Source interface {
	io.ReaderAt
	// Size is the image's length in bytes.
	Size() int64
	io.Closer
}

// Resident is a Source whose bytes are mapped in this process and can be read without I/O
// errors surfacing at this layer (a file mapping reads through the page cache).
type Resident interface {
	Source
	// Bytes returns the image bytes [off, off+n). The slice aliases the source; it stays valid
	// until Close. off and n are within Size.
	Bytes(off, n int64) []byte
}

// ContextReader is a Source whose reads can be cancelled: the engine passes a context that ends
// when it stops (the VM went), so a slow remote read does not hold it up.
type ContextReader interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Cached is a Source of which some ranges are resident now and others not (a cache of
// decompressed frames, a local base under a remote diff): the engine installs the resident ones
// straight from memory on the fault path and reads the rest off it.
type Cached interface {
	// Cached returns the image bytes [off, off+n) if all of them are resident now, else false.
	// It must not block on I/O. The source never overwrites a slice it returned: the bytes stay
	// valid for as long as the caller holds the slice.
	Cached(off, n int64) ([]byte, bool)
}

// Extent is implemented by sources with a natural unit of reading, such as a compressed chunk:
// the engine never lets one fault's window straddle two of them, so a fault costs one read.
type Extent interface {
	// Extent is the unit's size in bytes, a multiple of the page size; units start at offset 0.
	Extent() int64
}

// ErrTransient marks a read error worth retrying (a timeout, a reset connection, a server asking
// to slow down): the engine retries such a read with backoff before it gives up. Every other read
// error is permanent.
var ErrTransient = errors.New("source: transient read error")

// Zeros is implemented by sources that know which runs of the image are all zero.
type Zeros interface {
	// ZeroRun returns how many bytes from off, up to n, are known to be zero (0 if the byte at
	// off is not known to be zero).
	ZeroRun(off, n int64) int64
}

// Memory is an image held in a byte slice.
type Memory struct{ b []byte }

// NewMemory returns a Source over b, which must not change while the engine serves it.
func NewMemory(b []byte) *Memory { return &Memory{b: b} }

func (m *Memory) Size() int64               { return int64(len(m.b)) }
func (m *Memory) Bytes(off, n int64) []byte { return m.b[off : off+n] }
func (m *Memory) Close() error              { return nil }

func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(m.b)) {
		return 0, fmt.Errorf("source: read at %d outside image of %d bytes", off, len(m.b))
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Zero is an all-zero image of a given size; every run is installed with ZEROPAGE.
type Zero struct{ size int64 }

// NewZero returns an all-zero Source of size bytes.
func NewZero(size int64) *Zero { return &Zero{size: size} }

func (z *Zero) Size() int64  { return z.size }
func (z *Zero) Close() error { return nil }

func (z *Zero) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > z.size {
		return 0, fmt.Errorf("source: read at %d outside image of %d bytes", off, z.size)
	}
	n := int64(len(p))
	if off+n > z.size {
		n = z.size - off
	}
	clear(p[:n])
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (z *Zero) ZeroRun(off, n int64) int64 {
	if off < 0 || off >= z.size {
		return 0 // outside the image: nothing is known (and never a negative count)
	}
	return min(n, z.size-off)
}

var (
	_ Resident = (*Memory)(nil)
	_ Zeros    = (*Zero)(nil)
)
