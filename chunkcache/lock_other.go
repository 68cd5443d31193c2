//go:build !unix

package chunkcache

import (
	"errors"
	"os"
)

var errLocked = errors.New("locked")

// lockFile does nothing where flock is not available: one process per directory is then the
// caller's to ensure.
func lockFile(*os.File) error { return nil }
