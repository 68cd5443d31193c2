package snapshot

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Files is where a snapshot's files come from: a local directory ([DirFiles], what [Open]
// uses), or a bucket behind a disk cache. Names are FORMAT.md's: chunk and dictionary files by
// their names in the chunk directory, the working-set extent by its name in the snapshot.
// Errors should match ErrMissing for a file that does not exist and ErrTransient for a failure
// that may pass; any other error is taken as transient.
type Files interface {
	// Manifest returns the bytes of manifest.json.
	Manifest(ctx context.Context) ([]byte, error)
	// Chunk opens a file of the chunk directory (a chunk or the dictionary) of size bytes.
	Chunk(ctx context.Context, name string, size int64) (File, error)
	// Extent opens the working-set extent, size bytes, for one sequential read from its start.
	Extent(ctx context.Context, name string, size int64) (io.ReadCloser, error)
	// Corrupt says that the chunk file name failed verification. A cache forgets its copy, so
	// that the next Chunk fetches it anew; the reader tries once more before it fails.
	Corrupt(name string)
}

// A File is an open chunk file.
type File interface {
	io.ReaderAt
	io.Closer
}

// A Checker is Files that can tell, at open, whether a chunk-directory file exists with its
// size. OpenFiles calls Check for every chunk file the manifest names and the dictionary;
// without a Checker a missing file shows at its first read.
type Checker interface {
	Check(ctx context.Context, name string, size int64) error
}

// DirFiles is the files of the snapshot in the local directory dir: the chunks in dir/chunks,
// or in the shared store the manifest names. Each read opens its chunk file and closes it
// after; Open and OpenWith use one that keeps chunk files open between reads instead (see
// openChunks), closed by the Snapshot's Close.
func DirFiles(dir string) Files { return &dirFiles{dir: dir, chunkDir: filepath.Join(dir, ChunksDir)} }

// dirFilesKept is DirFiles keeping chunk files open: for a Snapshot that owns it.
func dirFilesKept(dir string) *dirFiles {
	return &dirFiles{dir: dir, chunkDir: filepath.Join(dir, ChunksDir), keep: true}
}

type dirFiles struct {
	dir      string
	chunkDir string // set from the manifest's store by Manifest
	keep     bool   // chunk files kept open in open
	open     openChunks
}

func (d *dirFiles) Manifest(context.Context) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(d.dir, ManifestName))
	if err != nil {
		if isNotExist(err) {
			return nil, fmt.Errorf("%w: %s is missing (a pack that did not finish leaves none)", ErrNotSnapshot, ManifestName)
		}
		return nil, ioError(err)
	}
	var head struct {
		Store string `json:"store"`
	}
	if json.Unmarshal(b, &head) == nil && head.Store != "" {
		d.chunkDir = filepath.Join(head.Store, ChunksDir)
	}
	return b, nil
}

func (d *dirFiles) Chunk(_ context.Context, name string, size int64) (File, error) {
	if !d.keep {
		return d.openChunk(name)
	}
	return d.open.get(name, func() (*os.File, error) { return d.openChunk(name) })
}

func (d *dirFiles) openChunk(name string) (*os.File, error) {
	f, err := os.Open(filepath.Join(d.chunkDir, name))
	if err != nil {
		return nil, ioError(err)
	}
	// A read takes one frame of a chunk: the page cache must not read ahead the rest of it
	// (up to read_ahead_kb), a cost the first fault on every chunk would pay.
	adviseRandom(f)
	return f, nil
}

func (d *dirFiles) Extent(_ context.Context, name string, size int64) (io.ReadCloser, error) {
	f, err := os.Open(filepath.Join(d.dir, name))
	if err != nil {
		return nil, ioError(err)
	}
	adviseSequential(f)
	return f, nil
}

// Corrupt forgets the open file of name: the read again opens the path anew.
func (d *dirFiles) Corrupt(name string) { d.open.forget(name) }

func (d *dirFiles) Check(_ context.Context, name string, size int64) error {
	return checkFileSize(filepath.Join(d.chunkDir, name), size)
}

// path is where a chunk-directory file is, for errors.
func (d *dirFiles) path(name string) string { return filepath.Join(d.chunkDir, name) }
