package snapshot

import (
	"os"
	"sync"
	"sync/atomic"
)

// maxOpenChunks is how many chunk files a snapshot keeps open: a 512 MiB image in 2 MiB chunks
// is 256 of them. A daemon serving n snapshots holds up to 256·n (Go raises the soft limit on
// descriptors to the hard one at start).
const maxOpenChunks = 256

// openChunks keeps chunk files open between reads. Chunk files never change once written (pack
// never replaces one), so a file opened once reads the same bytes as one opened again; a file
// found corrupt is forgotten all the same, so that the read again opens its path.
type openChunks struct {
	mu     sync.Mutex
	files  map[string]*openChunk
	clock  uint64
	closed bool
}

// An openChunk is a chunk file in the cache, shared by the reads that hold it: the cache's own
// reference plus one per read. It is closed when the last goes.
type openChunk struct {
	c    *openChunks
	f    *os.File
	name string
	refs int
	used uint64
}

// get returns a handle of name's open file, opening it with open when it is not open. Each
// handle holds one reference, released by its first Close.
func (c *openChunks) get(name string, open func() (*os.File, error)) (File, error) {
	if oc := c.lookup(name); oc != nil {
		return &chunkHandle{oc: oc}, nil
	}
	f, err := open() // outside the lock: a cold open may wait for the disk
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return f, nil // the snapshot closed meanwhile: an uncached file, closed by the caller
	}
	if oc := c.files[name]; oc != nil { // opened by another read meanwhile
		f.Close()
		oc.refs++
		return &chunkHandle{oc: oc}, nil
	}
	if c.files == nil {
		c.files = make(map[string]*openChunk)
	}
	if len(c.files) >= maxOpenChunks {
		c.evictLocked()
	}
	c.clock++
	oc := &openChunk{c: c, f: f, name: name, refs: 2, used: c.clock}
	c.files[name] = oc
	return &chunkHandle{oc: oc}, nil
}

// lookup returns name's file if it is open, with a reference for the caller (given back by
// release); nil if not.
func (c *openChunks) lookup(name string) *openChunk {
	c.mu.Lock()
	defer c.mu.Unlock()
	oc := c.files[name]
	if oc != nil {
		oc.refs++
		c.clock++
		oc.used = c.clock
	}
	return oc
}

// evictLocked drops the least recently used file from the cache (a scan: this runs only when a
// file is opened with the cache full).
func (c *openChunks) evictLocked() {
	var lru *openChunk
	for _, oc := range c.files {
		if lru == nil || oc.used < lru.used {
			lru = oc
		}
	}
	if lru != nil {
		c.dropLocked(lru)
	}
}

// dropLocked removes oc from the cache and releases the cache's reference.
func (c *openChunks) dropLocked(oc *openChunk) {
	delete(c.files, oc.name)
	oc.releaseLocked()
}

// forget drops name's file from the cache, if it is there.
func (c *openChunks) forget(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if oc := c.files[name]; oc != nil {
		c.dropLocked(oc)
	}
}

// close drops every file; files opened later are not kept.
func (c *openChunks) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for _, oc := range c.files {
		c.dropLocked(oc)
	}
}

// release gives back a reference (a handle's, at its Close).
func (oc *openChunk) release() {
	oc.c.mu.Lock()
	defer oc.c.mu.Unlock()
	oc.releaseLocked()
}

func (oc *openChunk) releaseLocked() {
	oc.refs--
	if oc.refs == 0 {
		oc.f.Close()
	}
}

// A chunkHandle is one read's File over a shared open chunk file: its first Close gives back
// its reference, any later one does nothing (so a caller closing twice cannot take another
// read's reference and close the file under it).
type chunkHandle struct {
	oc     *openChunk
	closed atomic.Bool
}

func (h *chunkHandle) ReadAt(b []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, os.ErrClosed
	}
	return h.oc.f.ReadAt(b, off)
}

func (h *chunkHandle) Close() error {
	if h.closed.Swap(true) {
		return os.ErrClosed
	}
	h.oc.release()
	return nil
}
