//go:build linux || darwin || freebsd

package snapshot

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// dataExtents returns the [start, end) ranges of f that hold data, by SEEK_DATA and SEEK_HOLE:
// the dirty pages of a Firecracker diff memory file, whose holes mean "unchanged".
func dataExtents(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	for off := int64(0); off < size; {
		start, err := f.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after off
		}
		if err != nil {
			return nil, err
		}
		end, err := f.Seek(start, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		end = min(end, size)
		out = append(out, [2]int64{start, end})
		off = end
	}
	return out, nil
}
