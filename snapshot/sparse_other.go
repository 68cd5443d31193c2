//go:build !(linux || darwin || freebsd)

package snapshot

import (
	"errors"
	"os"
)

func dataExtents(*os.File, int64) ([][2]int64, error) {
	return nil, errors.New("snapshot: diff files need SEEK_DATA/SEEK_HOLE, which this system lacks")
}
