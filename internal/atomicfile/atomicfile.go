// Package atomicfile writes files that hold either their old contents or all of the new, also
// across a crash: a temporary file, fsync, rename, fsync of the directory.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Commit writes data to the temporary file f, fsyncs it, and renames it to path; with dirSync
// it fsyncs path's directory too (without, the caller syncs it once for many files). On error
// the temporary file is removed.
func Commit(f *os.File, path string, data []byte, perm os.FileMode, dirSync bool) error {
	tmp := f.Name()
	err := Finish(f, data, perm)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if dirSync {
		return SyncDir(filepath.Dir(path))
	}
	return nil
}

// Finish writes data to f, sets its mode to perm, fsyncs and closes it, returning the first
// error: a temporary file made whole before it is renamed or linked into place.
func Finish(f *os.File, data []byte, perm os.FileMode) error {
	_, err := f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// SyncClose fsyncs and closes f, returning the first error.
func SyncClose(f *os.File) error {
	err := f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// SyncDir makes the directory entries of dir (renames into it) durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return SyncClose(d)
}
