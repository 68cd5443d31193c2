package remote

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/faultline-go/faultline/snapshot"
)

// PushOptions tune Push.
type PushOptions struct {
	// Parallel is the number of uploads in flight (default 8).
	Parallel int
	// Progress, if set, is called as bytes are uploaded with the bytes done and the total to
	// upload (the objects the bucket lacks), from several goroutines one at a time.
	Progress func(done, total int64)
}

// PushStats is what Push did.
type PushStats struct {
	BucketCreated bool
	Uploaded      int   // objects uploaded
	UploadedBytes int64 // their bytes
	Skipped       int   // objects the bucket had already
	SkippedBytes  int64
	Elapsed       time.Duration
}

// Push uploads the packed snapshot in dir to the client's location: the chunks the bucket lacks
// (listed once; uploaded in parallel, each verified against its hash first, since a chunk
// object serves every snapshot of the bucket that has its hash), then the working-set extent,
// then, last, the manifest. An interrupted push leaves no manifest, or the previous one, whole;
// pushing again uploads what is still missing. It creates the bucket if it does not exist.
func Push(ctx context.Context, dir string, c *Client, o PushOptions) (*PushStats, error) {
	start := time.Now()
	if o.Parallel <= 0 {
		o.Parallel = 8
	}
	s, err := snapshot.Open(dir)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	m := s.Manifest()
	// The bytes the snapshot was opened from and its chunks checked against (not read again:
	// a pack finishing meanwhile would make it another snapshot's manifest).
	manifest := s.ManifestBytes()
	st := &PushStats{}
	if st.BucketCreated, err = c.EnsureBucket(ctx); err != nil {
		return nil, err
	}
	have, err := c.List(ctx, ChunksPrefix)
	if err != nil {
		return nil, err
	}
	type upload struct {
		idx  int // chunk index, or extentIndex, dictIndex
		key  string
		path string
		size int64
	}
	var todo []upload
	var total int64
	seen := map[string]bool{}
	chunkDir := localChunkDir(dir, m)
	add := func(idx int, name string, size int64) {
		key := ChunkKey(name, size)
		if seen[key] {
			return // a chunk repeated within the snapshot
		}
		seen[key] = true
		if sz, ok := have[key]; ok && sz == size {
			st.Skipped++
			st.SkippedBytes += size
			return
		}
		todo = append(todo, upload{idx: idx, key: key, path: filepath.Join(chunkDir, name), size: size})
		total += size
	}
	if d := m.Dict; d != nil {
		add(dictIndex, DictFileName(d), d.Size)
	}
	for i, ch := range m.Chunks {
		if ch.Enc != snapshot.EncZero {
			add(i, m.ChunkFileName(i), ch.Stored)
		}
	}
	if ws := m.WorkingSet; ws != nil {
		key := c.loc.Key(ws.Extent)
		objs, err := c.List(ctx, key)
		if err != nil {
			return nil, err
		}
		if sz, ok := objs[key]; ok && sz == ws.ExtentSize {
			st.Skipped++
			st.SkippedBytes += ws.ExtentSize
		} else {
			todo = append(todo, upload{idx: extentIndex, key: key, path: filepath.Join(dir, ws.Extent), size: ws.ExtentSize})
			total += ws.ExtentSize
		}
	}

	var done atomic.Int64
	var progressMu sync.Mutex
	report := func(n int64) {
		d := done.Add(n)
		if o.Progress != nil {
			progressMu.Lock()
			o.Progress(d, total)
			progressMu.Unlock()
		}
	}
	report(0)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	work := make(chan upload)
	var wg sync.WaitGroup
	var uploaded atomic.Int64
	for range o.Parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, m.ChunkSize)
			for u := range work {
				// Verified before it is shared: a bad local file must not become the
				// bucket's copy of this hash.
				if err := verify(ctx, s, u.idx, u.path, buf); err != nil {
					cancel(err)
					return
				}
				if err := c.PutFile(ctx, u.key, u.path); err != nil {
					cancel(err)
					return
				}
				uploaded.Add(1)
				report(u.size)
			}
		}()
	}
feed:
	for _, u := range todo {
		select {
		case work <- u:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return nil, err
	}
	st.Uploaded = int(uploaded.Load())
	st.UploadedBytes = done.Load()

	// Last, the manifest: unless the bucket has these very bytes already.
	key := c.loc.Key(snapshot.ManifestName)
	cur, err := c.GetBytes(ctx, key)
	if err == nil && bytes.Equal(cur, manifest) {
		st.Skipped++
		st.SkippedBytes += int64(len(manifest))
	} else {
		if err := c.Put(ctx, key, manifest); err != nil {
			return nil, err
		}
		st.Uploaded++
		st.UploadedBytes += int64(len(manifest))
	}
	st.Elapsed = time.Since(start)
	return st, nil
}

// Remove is for tests and tools: it deletes the object key of the client's bucket.
func (c *Client) Remove(ctx context.Context, key string) error {
	return c.retry(ctx, "remove "+key, func(ctx context.Context) error {
		return c.mc.RemoveObject(ctx, c.loc.Bucket, key, minio.RemoveObjectOptions{})
	})
}

// DictFileName is the name of a snapshot's zstd dictionary file (FORMAT.md "Dictionary").
func DictFileName(d *snapshot.DictRef) string { return d.Hash + ".dict" }

// Upload indexes that are not chunks.
const (
	extentIndex = -1 // the working-set extent: its frames are verified by every reader
	dictIndex   = -2
)

// verify checks an upload's local file: a chunk by reading it whole (every frame's hash and
// the chunk's), the dictionary by its hash.
func verify(ctx context.Context, s *snapshot.Snapshot, idx int, path string, buf []byte) error {
	switch idx {
	case extentIndex:
		return nil
	case dictIndex:
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != s.Manifest().Dict.Hash {
			return fmt.Errorf("remote: dictionary %s: %w: its hash does not match its name", path, snapshot.ErrCorrupt)
		}
		return nil
	}
	return s.ReadChunk(ctx, idx, buf[:s.ChunkLen(idx)])
}

// localChunkDir is where a local snapshot's chunk files are: its shared store's, or its own.
func localChunkDir(dir string, m *snapshot.Manifest) string {
	if m.Store != "" {
		return filepath.Join(m.Store, snapshot.ChunksDir)
	}
	return filepath.Join(dir, snapshot.ChunksDir)
}
