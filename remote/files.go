package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/faultline-go/faultline/chunkcache"
	"github.com/faultline-go/faultline/snapshot"
)

// Files reads one remote snapshot's files for package snapshot: the manifest straight from the
// bucket, chunks through the disk cache (one whole-object GET per chunk missing from it), and
// the working-set extent streamed from the bucket while it is written to the cache. It is
// safe for concurrent use.
type Files struct {
	c     *Client
	cache *chunkcache.Cache
	log   *slog.Logger

	mu    sync.Mutex
	sized map[string][]string // a chunk's FORMAT.md name → the cache names asked for it

	listMu sync.Mutex
	listed map[string]int64 // the bucket's chunk objects, listed at the first Check
}

// NewFiles reads c's snapshot through cache (shared with the host's other snapshots). log, if
// not nil, hears about objects that failed verification.
func NewFiles(c *Client, cache *chunkcache.Cache, log *slog.Logger) *Files {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Files{c: c, cache: cache, log: log, sized: map[string][]string{}}
}

// Client is the client Files reads through.
func (f *Files) Client() *Client { return f.c }

// Manifest returns manifest.json's bytes.
func (f *Files) Manifest(ctx context.Context) ([]byte, error) {
	return f.c.GetBytes(ctx, f.c.loc.Key(snapshot.ManifestName))
}

// Chunk returns the chunk file called name (FORMAT.md), of size bytes, from the cache, fetched
// into it first if need be.
func (f *Files) Chunk(ctx context.Context, name string, size int64) (snapshot.File, error) {
	cname := sizedName(name, size)
	f.note(name, cname)
	key := ChunkKey(name, size)
	file, err := f.cache.Open(ctx, cname, size, func(ctx context.Context, w io.Writer) error {
		return f.c.Get(ctx, key, size, w)
	})
	if err != nil {
		return nil, f.wrap(key, err)
	}
	return file, nil
}

// Extent returns the working-set extent called name, of size bytes, read from its first byte:
// from the cache, or streamed from the bucket as it arrives (and cached once read whole).
func (f *Files) Extent(ctx context.Context, name string, size int64) (io.ReadCloser, error) {
	key := f.c.loc.Key(name)
	r, err := f.cache.Stream(ctx, sizedName(name, size), size, func(ctx context.Context) (io.ReadCloser, error) {
		return f.c.Open(ctx, key, size), nil
	})
	if err != nil {
		return nil, f.wrap(key, err)
	}
	return &errReader{r: r, f: f, key: key}, nil
}

// Check reports whether the chunk-directory file name exists in the bucket with size bytes
// (snapshot.Checker, called at open for every chunk): the first call lists the bucket's chunks
// once, later ones look in that list.
func (f *Files) Check(ctx context.Context, name string, size int64) error {
	f.listMu.Lock()
	defer f.listMu.Unlock()
	if f.listed == nil {
		listed, err := f.c.List(ctx, ChunksPrefix)
		if err != nil {
			return f.wrap(ChunksPrefix, err) // listed again at the next Check
		}
		f.listed = listed
	}
	key := ChunkKey(name, size)
	if sz, ok := f.listed[key]; !ok || sz != size {
		return fmt.Errorf("remote: s3://%s/%s: %w", f.c.loc.Bucket, key, snapshot.ErrMissing)
	}
	return nil
}

// Corrupt forgets the cached copies of name, which failed verification, so that the next
// Chunk fetches it again.
func (f *Files) Corrupt(name string) {
	f.mu.Lock()
	names := f.sized[name]
	delete(f.sized, name)
	f.mu.Unlock()
	for _, n := range names {
		f.cache.Forget(n)
	}
	f.log.Warn("object failed verification: dropped from the cache, fetched again if read again",
		"object", "s3://"+f.c.loc.Bucket+"/"+ChunksPrefix+name, "cache", f.cache.Dir())
}

func (f *Files) note(name, cname string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, n := range f.sized[name] {
		if n == cname {
			return
		}
	}
	f.sized[name] = append(f.sized[name], cname)
}

// wrap makes sure an error names the object and matches one of snapshot's sentinels (the
// cache's own failures, a full disk say, are transient).
func (f *Files) wrap(key string, err error) error {
	for _, k := range []error{snapshot.ErrMissing, snapshot.ErrTransient, snapshot.ErrCorrupt, ErrAccess} {
		if errors.Is(err, k) {
			return err
		}
	}
	return fmt.Errorf("remote: s3://%s/%s: %w: %w", f.c.loc.Bucket, key, snapshot.ErrTransient, err)
}

// errReader classifies a stream's errors as wrap does.
type errReader struct {
	r   io.ReadCloser
	f   *Files
	key string
}

func (r *errReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = r.f.wrap(r.key, err)
	}
	return n, err
}

func (r *errReader) Close() error { return r.r.Close() }

var (
	_ snapshot.Files   = (*Files)(nil)
	_ snapshot.Checker = (*Files)(nil)
)
