package snapshot

import (
	"os"

	"golang.org/x/sys/unix"
)

func adviseRandom(f *os.File)     { _ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM) }
func adviseSequential(f *os.File) { _ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL) }
