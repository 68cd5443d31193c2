package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

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
	o     FilesOptions

	// Read-ahead and warming: the chunks in image order (from the manifest), the fetches
	// running in the background, and what ends them.
	order    []chunkRef
	index    map[string]int // cache name → position in order
	bg       chan struct{}  // a slot per background fetch
	bgCtx    context.Context
	bgStop   context.CancelFunc
	bgWG     sync.WaitGroup
	warmOnce sync.Once

	aheads, warmed, chunkBytes, extentBytes, chunkFetches atomic.Int64

	// streams counts the working-set extents streaming from the bucket; warming waits while
	// there are any (streamCond, on mu).
	streams    int
	streamCond *sync.Cond

	mu    sync.Mutex
	sized map[string][]string // a chunk's FORMAT.md name → the cache names asked for it

	listMu sync.Mutex
	listed map[string]int64 // the bucket's chunk objects, listed at the first Check
}

type chunkRef struct {
	name, cname string
	size        int64
}

// FilesOptions tune Files.
type FilesOptions struct {
	// Log, if set, hears about objects that failed verification.
	Log *slog.Logger
	// Readahead is how many chunks after one fetched for a read are fetched too, in the
	// background (default 4; negative: none). Guest memory is read in runs, and a chunk's GET
	// costs a round trip however long the network's: fetching the next ones while the VM is
	// busy with this one keeps several in flight.
	Readahead int
	// Background bounds the read-ahead and warming fetches in flight (default 16).
	Background int
	// Warm fetches every chunk the cache lacks into it, in image order, in the background
	// from the first read of the manifest on, when the snapshot's chunk files fit in half the
	// cache: a VM then finds the chunks outside its working set on the host (a guest's touches
	// are scattered over most of its chunks), and fetches for faults, which do not wait for a
	// background slot, go first.
	Warm bool
}

// FilesStats counts what Files fetched from the bucket for reads (the manifest is not
// counted).
type FilesStats struct {
	ChunkFetches int64 // chunk files fetched (for a read, ahead of one, or warming)
	ChunkBytes   int64
	ExtentBytes  int64 // working-set extent bytes streamed from the bucket
	Readaheads   int64 // chunks fetched ahead of a read
	Warmed       int64 // chunks fetched by warming
}

// Stats returns the counters.
func (f *Files) Stats() FilesStats {
	return FilesStats{ChunkFetches: f.chunkFetches.Load(), ChunkBytes: f.chunkBytes.Load(), ExtentBytes: f.extentBytes.Load(),
		Readaheads: f.aheads.Load(), Warmed: f.warmed.Load()}
}

// NewFiles reads c's snapshot through cache (shared with the host's other snapshots).
func NewFiles(c *Client, cache *chunkcache.Cache, o FilesOptions) *Files {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Readahead == 0 {
		o.Readahead = 4
	}
	if o.Background <= 0 {
		o.Background = 16
	}
	f := &Files{c: c, cache: cache, log: o.Log, o: o, sized: map[string][]string{}, bg: make(chan struct{}, o.Background)}
	f.bgCtx, f.bgStop = context.WithCancel(context.Background())
	f.streamCond = sync.NewCond(&f.mu)
	return f
}

// Close stops the read-ahead fetches and waits for them.
func (f *Files) Close() error {
	f.bgStop()
	f.mu.Lock()
	f.streamCond.Broadcast() // a warming waiting for a stream sees bgCtx done
	f.mu.Unlock()
	f.bgWG.Wait()
	return nil
}

func (f *Files) streamStart() {
	f.mu.Lock()
	f.streams++
	f.mu.Unlock()
}

func (f *Files) streamEnd() {
	f.mu.Lock()
	f.streams--
	f.streamCond.Broadcast()
	f.mu.Unlock()
}

// waitStreams waits until no extent streams from the bucket; false if Files is closing.
func (f *Files) waitStreams() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for f.streams > 0 && f.bgCtx.Err() == nil {
		f.streamCond.Wait()
	}
	return f.bgCtx.Err() == nil
}

// Client is the client Files reads through.
func (f *Files) Client() *Client { return f.c }

// Manifest returns manifest.json's bytes.
func (f *Files) Manifest(ctx context.Context) ([]byte, error) {
	b, err := f.c.GetBytes(ctx, f.c.loc.Key(snapshot.ManifestName))
	if err != nil {
		return nil, err
	}
	// The chunks' order, for read-ahead (a manifest that does not decode is the reader's to
	// report).
	if m, err := snapshot.DecodeManifest(b); err == nil {
		f.mu.Lock()
		f.order, f.index = nil, map[string]int{}
		for i, c := range m.Chunks {
			if c.Enc == snapshot.EncZero {
				continue
			}
			name := m.ChunkFileName(i)
			cname := sizedName(name, c.Stored)
			if _, dup := f.index[cname]; !dup {
				f.index[cname] = len(f.order)
				f.order = append(f.order, chunkRef{name: name, cname: cname, size: c.Stored})
			}
		}
		order := f.order
		f.mu.Unlock()
		if f.o.Warm {
			f.warmOnce.Do(func() { f.warm(order) })
		}
	}
	return b, nil
}

// warm starts the background fetch of every chunk of order that the cache lacks.
func (f *Files) warm(order []chunkRef) {
	var total int64
	for _, r := range order {
		total += r.size
	}
	if total > f.cache.Limit()/2 {
		f.log.Info("chunk cache not warmed: the snapshot's chunks do not fit in half of it",
			"snapshot", f.c.loc.String(), "chunks", total, "cache_limit", f.cache.Limit())
		return
	}
	f.bgWG.Add(1)
	go func() {
		defer f.bgWG.Done()
		for _, r := range order {
			if f.cache.Contains(r.cname) {
				continue
			}
			// The working set goes first: no new warming fetch while it streams.
			if !f.waitStreams() {
				return
			}
			select {
			case f.bg <- struct{}{}:
			case <-f.bgCtx.Done():
				return
			}
			f.warmed.Add(1)
			f.background(r)
		}
	}()
}

// background fetches r into the cache in a goroutine that holds a slot of f.bg.
func (f *Files) background(r chunkRef) {
	f.note(r.name, r.cname)
	f.bgWG.Add(1)
	go func() {
		defer f.bgWG.Done()
		defer func() { <-f.bg }()
		// Errors are left to the read that needs the chunk, which fetches it again.
		if file, err := f.cache.Open(f.bgCtx, r.cname, r.size, f.fetch(ChunkKey(r.name, r.size), r.size)); err == nil {
			file.Close()
		}
	}()
}

// Chunk returns the chunk file called name (FORMAT.md), of size bytes, from the cache, fetched
// into it first if need be.
func (f *Files) Chunk(ctx context.Context, name string, size int64) (snapshot.File, error) {
	cname := sizedName(name, size)
	f.note(name, cname)
	if f.o.Readahead > 0 && !f.cache.Contains(cname) {
		f.readahead(cname)
	}
	key := ChunkKey(name, size)
	file, err := f.cache.Open(ctx, cname, size, f.fetch(key, size))
	if err != nil {
		return nil, f.wrap(key, err)
	}
	return file, nil
}

func (f *Files) fetch(key string, size int64) chunkcache.Fetch {
	return func(ctx context.Context, w io.Writer) error {
		f.chunkFetches.Add(1)
		err := f.c.Get(ctx, key, size, w)
		if err == nil {
			f.chunkBytes.Add(size)
		}
		return err
	}
}

// readahead starts background fetches of the chunks after cname that the cache lacks, as
// many as there are free slots.
func (f *Files) readahead(cname string) {
	f.mu.Lock()
	i, ok := f.index[cname]
	var next []chunkRef
	if ok {
		next = f.order[i+1 : min(len(f.order), i+1+f.o.Readahead)]
	}
	f.mu.Unlock()
	for _, r := range next {
		if f.cache.Contains(r.cname) {
			continue
		}
		select {
		case f.bg <- struct{}{}:
		default:
			return // enough in flight
		}
		f.aheads.Add(1)
		f.background(r)
	}
}

// Extent returns the working-set extent called name, of size bytes, read from its first byte:
// from the cache, or streamed from the bucket as it arrives (and cached once read whole).
func (f *Files) Extent(ctx context.Context, name string, size int64) (io.ReadCloser, error) {
	key := f.c.loc.Key(name)
	r, err := f.cache.Stream(ctx, sizedName(name, size), size, func(ctx context.Context) (io.ReadCloser, error) {
		f.streamStart()
		return &streamReader{countReader: countReader{r: f.c.Open(ctx, key, size), n: &f.extentBytes}, f: f}, nil
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

// countReader counts the bytes read through it.
type countReader struct {
	r io.ReadCloser
	n *atomic.Int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *countReader) Close() error { return c.r.Close() }

// streamReader is an extent streaming from the bucket: counted, and its end lets warming go on.
type streamReader struct {
	countReader
	f    *Files
	once sync.Once
}

func (r *streamReader) Read(p []byte) (int, error) {
	n, err := r.countReader.Read(p)
	if err != nil {
		r.once.Do(r.f.streamEnd)
	}
	return n, err
}

func (r *streamReader) Close() error {
	r.once.Do(r.f.streamEnd)
	return r.countReader.Close()
}
