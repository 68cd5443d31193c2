package snapshot

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error this package returns about a snapshot's contents matches one of
// them with errors.Is, so that a caller can tell a snapshot that will never read right
// (ErrCorrupt, ErrMissing, ErrNotSnapshot, ErrVersion) from a read that may work if tried again
// (ErrTransient).
var (
	// ErrNotSnapshot: the directory has no manifest. Either it is not a snapshot or a pack into
	// it did not finish (the manifest is written last).
	ErrNotSnapshot = errors.New("not a snapshot (no manifest)")
	// ErrVersion: the manifest is of a format version this package does not read.
	ErrVersion = errors.New("unsupported snapshot format version")
	// ErrCorrupt: a manifest, chunk or working-set frame whose bytes are wrong (bad JSON, sizes
	// that do not add up, a hash that does not match, zstd that does not decode).
	ErrCorrupt = errors.New("corrupt")
	// ErrMissing: a file the manifest refers to does not exist.
	ErrMissing = errors.New("missing")
	// ErrTransient: an I/O error other than the above (EINTR, EIO, ENOMEM, a cancelled
	// context...). Reading again may succeed.
	ErrTransient = errors.New("transient I/O error")
	// ErrNoWorkingSet: the snapshot has no recorded working set.
	ErrNoWorkingSet = errors.New("snapshot has no working set")
)

// A ChunkError is an error reading one chunk. It names the chunk, its offset in the image and
// its file, and wraps one of the sentinel errors.
type ChunkError struct {
	Chunk  int    // chunk index
	Offset int64  // offset of the chunk in the image
	Path   string // the chunk's file ("" for an all-zero chunk)
	Err    error  // wraps ErrCorrupt, ErrMissing or ErrTransient
}

func (e *ChunkError) Error() string {
	return fmt.Sprintf("snapshot: chunk %d at offset %#x (%s): %v", e.Chunk, e.Offset, e.Path, e.Err)
}

func (e *ChunkError) Unwrap() error { return e.Err }

// corruptf returns an error matching ErrCorrupt.
func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// ioError classifies an error from the file system: a file that does not exist is ErrMissing,
// anything else ErrTransient.
func ioError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrCorrupt), errors.Is(err, ErrMissing), errors.Is(err, ErrTransient):
		return err
	case isNotExist(err):
		return fmt.Errorf("%w: %w", ErrMissing, err)
	}
	return fmt.Errorf("%w: %w", ErrTransient, err)
}
