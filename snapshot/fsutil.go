package snapshot

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/faultline-go/faultline/internal/atomicfile"
)

// tmpPrefix starts the name of every file this package writes before renaming it into place.
// A file with this prefix is left only by a writer that died; it is never part of a snapshot.
const tmpPrefix = ".tmp-"

func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// createTemp creates a new file in dir whose name starts with tmpPrefix.
func createTemp(dir, name string) (*os.File, error) {
	var r [6]byte
	rand.Read(r[:])
	return os.OpenFile(filepath.Join(dir, tmpPrefix+name+"-"+hex.EncodeToString(r[:])),
		os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
}

// writeFileAtomic writes data to dir/name so that the name holds either its old contents or
// all of data, never part of it, also across a crash: temp file, fsync, rename, fsync of dir.
func writeFileAtomic(dir, name string, data []byte, perm os.FileMode) error {
	f, err := createTemp(dir, name)
	if err != nil {
		return err
	}
	return commitTemp(f, filepath.Join(dir, name), data, perm, true)
}

// commitTemp writes data to the temp file f, fsyncs it, and renames it to path; with dirSync it
// fsyncs path's directory too (without, the caller syncs it once for many files). On error the
// temp file is removed.
func commitTemp(f *os.File, path string, data []byte, perm os.FileMode, dirSync bool) error {
	return atomicfile.Commit(f, path, data, perm, dirSync)
}

// syncDir makes the directory entries of dir (renames into it) durable.
func syncDir(dir string) error { return atomicfile.SyncDir(dir) }
