//go:build unix

package chunkcache

import (
	"errors"
	"os"
	"syscall"
)

// errLocked: another process holds the directory's lock.
var errLocked = errors.New("locked")

// lockFile takes an exclusive flock of f without waiting; the kernel drops it when the process
// exits, however it exits.
func lockFile(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return errLocked
	}
	return err
}
