package chunkcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// tmpPrefix starts the names of files being written; they are never entries and are deleted at
// Open (the previous owner's unfinished fetches).
const tmpPrefix = ".tmp-"

// lockName is the file whose flock marks the directory as owned.
const lockName = ".lock"

// A Fetch writes the whole file, from its first byte, to w. It returns an error if it could
// not; the cache then discards what it wrote.
type Fetch func(ctx context.Context, w io.Writer) error

// Cache is a directory of named files bounded in bytes. Its methods are safe for concurrent use.
type Cache struct {
	dir   string
	limit int64
	lock  *os.File

	mu     sync.Mutex
	m      map[string]*entry
	lru    entry // sentinel of the present entries, most recently used first
	used   int64 // bytes of present entries
	closed bool
	st     Stats
}

type entry struct {
	name string
	size int64
	refs int           // open Files and waiters
	busy chan struct{} // non-nil while a fetch of it runs; closed when it ends
	err  error         // the fetch's error, for its waiters
	gone bool          // forgotten while open: its file is deleted when the last File closes
	// touched is when its mtime was last set (its fetch, a hit, or found at Open).
	touched time.Time
	prev    *entry
	next    *entry
}

// Stats counts what the cache did since Open.
type Stats struct {
	Hits         int64 // opens served by a file already present (or being fetched by another)
	Fetches      int64 // fetches started
	FetchedBytes int64 // bytes written by fetches that completed
	Failed       int64 // fetches that failed
	Evictions    int64
	Forgotten    int64 // files deleted by Forget (found bad by a reader) or by a size mismatch
	Files        int   // files present now
	Bytes        int64 // their bytes
}

// Open opens (creating it if need be) the cache in dir, bounded to limit bytes, and takes its
// lock. The files already there become entries, least recently used by their mtime first;
// unfinished writes are deleted; and the cache is evicted down to limit.
func Open(dir string, limit int64) (*Cache, error) {
	if limit <= 0 {
		return nil, fmt.Errorf("chunkcache: limit %d: must be positive", limit)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("chunkcache: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("chunkcache: %w", err)
	}
	if err := lockFile(lock); err != nil {
		lock.Close()
		if errors.Is(err, errLocked) {
			return nil, fmt.Errorf("chunkcache: %s is in use by another process (one daemon owns a cache directory)", dir)
		}
		return nil, fmt.Errorf("chunkcache: lock %s: %w", dir, err)
	}
	c := &Cache{dir: dir, limit: limit, lock: lock, m: map[string]*entry{}}
	c.lru.prev, c.lru.next = &c.lru, &c.lru
	ents, err := os.ReadDir(dir)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("chunkcache: %w", err)
	}
	type found struct {
		name  string
		size  int64
		mtime time.Time
	}
	var files []found
	for _, de := range ents {
		name := de.Name()
		switch {
		case name == lockName:
			continue
		case strings.HasPrefix(name, tmpPrefix):
			os.Remove(filepath.Join(dir, name))
			continue
		}
		fi, err := de.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		files = append(files, found{name, fi.Size(), fi.ModTime()})
	}
	// Oldest first, each pushed to the front: the newest ends up most recent.
	slices.SortFunc(files, func(a, b found) int { return a.mtime.Compare(b.mtime) })
	for _, f := range files {
		e := &entry{name: f.name, size: f.size, touched: f.mtime}
		c.m[f.name] = e
		c.pushFront(e)
		c.used += f.size
	}
	c.mu.Lock()
	c.evict()
	c.mu.Unlock()
	return c, nil
}

// Dir is the cache's directory.
func (c *Cache) Dir() string { return c.dir }

// Limit is the cache's bound in bytes.
func (c *Cache) Limit() int64 { return c.limit }

// A File is an open cached file. It stays readable after an eviction or a Forget of its name
// (its inode lives until it is closed).
type File struct {
	*os.File
	c    *Cache
	e    *entry
	once sync.Once
}

// Close closes the file and releases the cache's hold on it.
func (f *File) Close() error {
	err := f.File.Close()
	f.once.Do(func() { f.c.release(f.e) })
	return err
}

// Open returns the file called name, which must have size bytes, fetching it with fetch if it
// is not present (or is present with another size: a torn file). Concurrent opens of one
// missing name run one fetch; the others wait for it, or for their ctx.
func (c *Cache) Open(ctx context.Context, name string, size int64, fetch Fetch) (*File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, errors.New("chunkcache: closed")
		}
		e := c.m[name]
		if e != nil && e.busy == nil && e.size != size {
			// Not what the caller expects: a torn or foreign file. Fetch it anew.
			c.forgetLocked(e)
			e = nil
		}
		if e == nil {
			return c.fetch(ctx, name, size, fetch) // unlocks
		}
		e.refs++
		c.st.Hits++
		if busy := e.busy; busy != nil {
			c.mu.Unlock()
			select {
			case <-busy:
			case <-ctx.Done():
				c.release(e)
				return nil, ctx.Err()
			}
			c.mu.Lock()
			if err := e.err; err != nil {
				c.mu.Unlock()
				c.release(e)
				return nil, err
			}
		}
		if e.prev != nil {
			c.unlink(e)
			c.pushFront(e)
		}
		// The order survives a restart by the files' mtimes (Open sorts by them): renewed on
		// a hit, at most once a minute per file, so that a hot chunk costs no syscall per read.
		now := time.Now()
		touch := now.Sub(e.touched) > time.Minute
		if touch {
			e.touched = now
		}
		c.mu.Unlock()
		if touch {
			os.Chtimes(filepath.Join(c.dir, name), time.Time{}, now)
		}
		f, err := os.Open(filepath.Join(c.dir, name))
		if err != nil {
			// Deleted behind the cache's back: forget it and fetch again.
			c.mu.Lock()
			if !e.gone {
				c.forgetLocked(e)
			}
			c.mu.Unlock()
			c.release(e)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("chunkcache: %w", err)
		}
		return &File{File: f, c: c, e: e}, nil
	}
}

// fetch runs the fetch of a name not present, with c.mu held on entry (released here).
func (c *Cache) fetch(ctx context.Context, name string, size int64, fetch Fetch) (*File, error) {
	e := &entry{name: name, size: size, refs: 1, busy: make(chan struct{}), touched: time.Now()}
	c.m[name] = e
	c.st.Fetches++
	c.mu.Unlock()

	f, err := c.write(ctx, name, size, func(w io.Writer) error { return fetch(ctx, w) })

	c.mu.Lock()
	busy := e.busy
	e.busy = nil
	if err != nil {
		e.err = err
		c.st.Failed++
		delete(c.m, name)
		e.gone = true
	} else {
		c.st.FetchedBytes += size
		c.used += size
		c.pushFront(e)
		c.evict()
	}
	close(busy)
	c.mu.Unlock()
	if err != nil {
		c.release(e)
		return nil, err
	}
	return &File{File: f, c: c, e: e}, nil
}

// write writes a temporary file with fill, checks its size, renames it to name and returns it
// open for reading.
func (c *Cache) write(ctx context.Context, name string, size int64, fill func(io.Writer) error) (*os.File, error) {
	tmp, err := os.CreateTemp(c.dir, tmpPrefix+name+".")
	if err != nil {
		return nil, fmt.Errorf("chunkcache: %w", err)
	}
	cw := &countWriter{w: tmp}
	err = fill(cw)
	if err == nil && cw.n != size {
		err = fmt.Errorf("chunkcache: %s: fetched %d bytes, want %d", name, cw.n, size)
	}
	if err == nil {
		err = ctx.Err()
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(c.dir, name))
	}
	if err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, err
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		tmp.Close()
		return nil, err
	}
	return tmp, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (w *countWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.n += int64(n)
	return n, err
}

// Stream returns name's bytes from its start: the present file, or else the stream open gives
// while it is written into the cache, so that the reader gets the bytes as they arrive. A
// stream read to its end (size bytes) leaves the file cached; one closed early leaves nothing.
// Streams are not single-flight: two at once of a missing name each read their own stream, and
// the first to finish is kept.
func (c *Cache) Stream(ctx context.Context, name string, size int64, open func(ctx context.Context) (io.ReadCloser, error)) (io.ReadCloser, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	c.mu.Lock()
	e := c.m[name]
	present := e != nil && e.busy == nil && e.size == size
	c.mu.Unlock()
	if present {
		// Through Open for its accounting (a hit; held while read).
		f, err := c.Open(ctx, name, size, func(ctx context.Context, w io.Writer) error {
			r, err := open(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			_, err = io.Copy(w, r)
			return err
		})
		if err != nil {
			return nil, err
		}
		return f, nil
	}
	r, err := open(ctx)
	if err != nil {
		return nil, err
	}
	tmp, err := os.CreateTemp(c.dir, tmpPrefix+name+".")
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("chunkcache: %w", err)
	}
	return &tee{c: c, r: r, tmp: tmp, name: name, size: size}, nil
}

// tee reads a stream and writes what it read into a temporary file, committed to the cache at
// the stream's end.
type tee struct {
	c    *Cache
	r    io.ReadCloser
	tmp  *os.File
	name string
	size int64
	n    int64
	werr error // a write to the temporary file failed: the stream goes on, uncached
	done bool
}

func (t *tee) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 && t.werr == nil {
		_, t.werr = t.tmp.Write(p[:n])
	}
	t.n += int64(n)
	if err == io.EOF && !t.done {
		t.done = true
		t.commit()
	}
	return n, err
}

func (t *tee) commit() {
	name := t.tmp.Name()
	t.tmp.Close()
	c := t.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.werr != nil || t.n != t.size || c.closed || c.m[t.name] != nil {
		os.Remove(name)
		return
	}
	if err := os.Rename(name, filepath.Join(c.dir, t.name)); err != nil {
		os.Remove(name)
		return
	}
	e := &entry{name: t.name, size: t.size, touched: time.Now()}
	c.m[t.name] = e
	c.st.Fetches++
	c.st.FetchedBytes += t.size
	c.used += t.size
	c.pushFront(e)
	c.evict()
}

func (t *tee) Close() error {
	err := t.r.Close()
	if !t.done {
		t.done = true
		t.tmp.Close()
		os.Remove(t.tmp.Name())
	}
	return err
}

// Contains reports whether name is present or being fetched.
func (c *Cache) Contains(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[name] != nil
}

// Forget deletes name's file, if present: a reader found it bad. A File open on it stays
// readable; the next Open fetches it anew. Forgetting a name being fetched does nothing.
func (c *Cache) Forget(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.m[name]; e != nil && e.busy == nil {
		c.forgetLocked(e)
	}
}

// forgetLocked removes present entry e from the map and the list and deletes its file.
func (c *Cache) forgetLocked(e *entry) {
	delete(c.m, e.name)
	if e.prev != nil {
		c.unlink(e)
	}
	c.used -= e.size
	e.gone = true
	c.st.Forgotten++
	os.Remove(filepath.Join(c.dir, e.name))
}

func (c *Cache) release(e *entry) {
	c.mu.Lock()
	e.refs--
	if e.refs == 0 {
		c.evict()
	}
	c.mu.Unlock()
}

// evict removes the least recently used entries nobody holds until the bytes fit the limit.
func (c *Cache) evict() {
	for e := c.lru.prev; e != &c.lru && c.used > c.limit; {
		prev := e.prev
		if e.refs == 0 {
			c.unlink(e)
			delete(c.m, e.name)
			c.used -= e.size
			c.st.Evictions++
			os.Remove(filepath.Join(c.dir, e.name))
		}
		e = prev
	}
}

func (c *Cache) pushFront(e *entry) {
	e.prev, e.next = &c.lru, c.lru.next
	c.lru.next.prev = e
	c.lru.next = e
}

func (c *Cache) unlink(e *entry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

// Stats returns the cache's counters.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.st
	st.Bytes = c.used
	for e := c.lru.next; e != &c.lru; e = e.next {
		st.Files++
	}
	return st
}

// Close releases the directory's lock. Files open stay readable; opens after Close fail.
func (c *Cache) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	return c.lock.Close()
}

// checkName refuses names that are not one plain file name of the directory.
func checkName(name string) error {
	if name == "" || name == lockName || strings.HasPrefix(name, tmpPrefix) || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return fmt.Errorf("chunkcache: bad name %q", name)
	}
	return nil
}
