//go:build linux

package cli

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/faultline-go/faultline/chunkcache"
	"github.com/faultline-go/faultline/remote"
	"github.com/faultline-go/faultline/snapshot"
	"github.com/faultline-go/faultline/source"
)

// defaultDiskCache bounds the disk cache of snapshots in a bucket without --cache-dir (a
// temporary directory); with --cache-dir, --cache-size does.
const defaultDiskCache = 4 << 30

// remoteFlags are serve's flags for snapshots in a bucket.
type remoteFlags struct {
	endpoint, cacheDir, memCache *string
	warm                         *bool
}

func addRemoteFlags(fs *flag.FlagSet) remoteFlags {
	return remoteFlags{
		endpoint: fs.String("s3-endpoint", "", s3EndpointUsage),
		cacheDir: fs.String("cache-dir", "", "disk cache of the chunks of s3:// snapshots, bounded by --cache-size; this daemon owns it, "+
			"all its VMs and snapshots share it (default: a temporary directory bounded by 4G, removed at exit)"),
		memCache: fs.String("mem-cache-size", "256M", "with --cache-dir: bound of the decompressed frames kept in memory (what --cache-size is without it)"),
		warm: fs.Bool("warm-cache", true, "fetch an s3:// snapshot's chunks into the disk cache in the background from its open, "+
			"once its working set has streamed, when they fit in half of the cache (faults' fetches go first)"),
	}
}

// remoteServe opens the s3:// snapshots of one serve: a client of each, all through one disk
// cache, opened at the first.
type remoteServe struct {
	rf    remoteFlags
	limit int64
	log   *slog.Logger

	mu     sync.Mutex
	cache  *chunkcache.Cache
	tmpDir string
	files  []*remote.Files
}

func newRemoteServe(rf remoteFlags, diskLimit int64, log *slog.Logger) *remoteServe {
	return &remoteServe{rf: rf, limit: diskLimit, log: log}
}

// open is the fleet's opener of s3:// references.
func (r *remoteServe) open(ref string, cacheSize int64) (source.Source, error) {
	s, err := r.openSnapshot(ref, cacheSize)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// openSnapshot checks the bucket and its credentials (so that a snapshot that cannot be read
// fails at its open, not at a VM's first fault) and opens the snapshot through the disk cache,
// with cacheSize bytes of decompressed frames in memory.
func (r *remoteServe) openSnapshot(url string, cacheSize int64) (*snapshot.Snapshot, error) {
	c, err := newRemoteClient(url, *r.rf.endpoint)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exists, err := c.Check(ctx)
	if err != nil {
		return nil, err
	}
	if !exists {
		return nil, fmt.Errorf("%s: %w: no bucket %q", url, snapshot.ErrMissing, c.Location().Bucket)
	}
	cache, err := r.diskCache()
	if err != nil {
		return nil, err
	}
	f := remote.NewFiles(c, cache, remote.FilesOptions{Log: r.log, Warm: *r.rf.warm})
	s, err := snapshot.OpenFiles(ctx, url, f, snapshot.Options{CacheSize: cacheSize})
	if err != nil {
		f.Close()
		return nil, err
	}
	r.mu.Lock()
	r.files = append(r.files, f)
	r.mu.Unlock()
	return s, nil
}

// diskCache opens the disk cache at its first use.
func (r *remoteServe) diskCache() (*chunkcache.Cache, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cache != nil {
		return r.cache, nil
	}
	dir := *r.rf.cacheDir
	if dir == "" {
		var err error
		if r.tmpDir, err = os.MkdirTemp("", "faultline-cache-"); err != nil {
			return nil, err
		}
		dir = r.tmpDir
	}
	c, err := chunkcache.Open(dir, r.limit)
	if err != nil {
		return nil, err
	}
	st := c.Stats()
	r.log.Info("chunk cache", "dir", dir, "limit", snapshot.FormatBytes(r.limit), "files", st.Files, "bytes", snapshot.FormatBytes(st.Bytes))
	r.cache = c
	return c, nil
}

// close logs what was read from the buckets and through the cache, and closes the cache. The
// snapshots are closed already.
func (r *remoteServe) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cache == nil {
		return
	}
	var gets, bytes, retries int64
	for _, f := range r.files {
		f.Close()
		st := f.Client().Stats()
		gets, bytes, retries = gets+st.Gets, bytes+st.GetBytes, retries+st.Retries
	}
	cs := r.cache.Stats()
	r.log.Info("bucket and chunk cache", "gets", gets, "bytes_fetched", bytes, "retries", retries,
		"cache_hits", cs.Hits, "cache_fetches", cs.Fetches, "evictions", cs.Evictions, "cached_bytes", cs.Bytes)
	r.cache.Close()
	if r.tmpDir != "" {
		os.RemoveAll(r.tmpDir)
	}
}
