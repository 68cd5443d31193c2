//go:build linux

package cli

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/faultline-go/faultline/chunkcache"
	"github.com/faultline-go/faultline/remote"
	"github.com/faultline-go/faultline/snapshot"
)

// Defaults of serve's bounds for an s3:// --snapshot: --cache-size is then the disk cache's,
// --mem-cache-size the decompressed frames' in memory (what --cache-size is for a directory).
const (
	defaultDiskCache = "4G"
	defaultMemCache  = "256M"
)

// remoteFlags are serve's flags for a snapshot in a bucket.
type remoteFlags struct {
	endpoint, cacheDir, memCache *string
	warm                         *bool
}

func addRemoteFlags(fs *flag.FlagSet) remoteFlags {
	return remoteFlags{
		endpoint: fs.String("s3-endpoint", "", s3EndpointUsage),
		cacheDir: fs.String("cache-dir", "", "disk cache of the chunks of an s3:// --snapshot, bounded by --cache-size (default "+defaultDiskCache+
			" for it); one daemon owns it, all its VMs and snapshots share it (default: a temporary directory, removed at exit)"),
		memCache: fs.String("mem-cache-size", defaultMemCache, "bound of the decompressed frames of an s3:// --snapshot kept in memory"),
		warm: fs.Bool("warm-cache", true, "fetch an s3:// --snapshot's chunks into --cache-dir in the background from the start, "+
			"when they fit in half of it (faults' fetches go first)"),
	}
}

// remoteServe is an s3:// snapshot's files for the daemon, and what to do at exit.
type remoteServe struct {
	files   *remote.Files
	cache   *chunkcache.Cache
	tmpDir  string
	memSize int64
}

// openRemote checks the bucket and its credentials (so a daemon that cannot read it fails at
// start, not at its first fault) and opens the disk cache. diskSize is --cache-size, "" if it
// was not given.
func openRemote(url string, rf remoteFlags, diskSize string, log *slog.Logger) (*remoteServe, error) {
	if diskSize == "" {
		diskSize = defaultDiskCache
	}
	disk, err := parseSize(diskSize)
	if err != nil || disk <= 0 {
		return nil, fmt.Errorf("--cache-size %q: want a size such as 4G", diskSize)
	}
	mem, err := parseSize(*rf.memCache)
	if err != nil || mem <= 0 {
		return nil, fmt.Errorf("--mem-cache-size %q: want a size such as 256M", *rf.memCache)
	}
	c, err := newRemoteClient(url, *rf.endpoint)
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
	r := &remoteServe{memSize: int64(mem)}
	dir := *rf.cacheDir
	if dir == "" {
		if r.tmpDir, err = os.MkdirTemp("", "faultline-cache-"); err != nil {
			return nil, err
		}
		dir = r.tmpDir
	}
	if r.cache, err = chunkcache.Open(dir, int64(disk)); err != nil {
		r.close(log)
		return nil, err
	}
	r.files = remote.NewFiles(c, r.cache, remote.FilesOptions{Log: log, Warm: *rf.warm})
	st := r.cache.Stats()
	log.Info("chunk cache", "dir", dir, "limit", snapshot.FormatBytes(int64(disk)), "files", st.Files, "bytes", snapshot.FormatBytes(st.Bytes))
	return r, nil
}

// close logs what was read from the bucket and through the cache, and closes the cache.
func (r *remoteServe) close(log *slog.Logger) {
	if r.files != nil {
		cs, rs := r.cache.Stats(), r.files.Client().Stats()
		log.Info("bucket and chunk cache", "gets", rs.Gets, "bytes_fetched", rs.GetBytes, "retries", rs.Retries,
			"cache_hits", cs.Hits, "cache_fetches", cs.Fetches, "evictions", cs.Evictions, "cached_bytes", cs.Bytes)
	}
	if r.files != nil {
		r.files.Close()
	}
	if r.cache != nil {
		r.cache.Close()
	}
	if r.tmpDir != "" {
		os.RemoveAll(r.tmpDir)
	}
}
