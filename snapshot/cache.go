package snapshot

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// cache holds decompressed frames (by frame index), at most bound less reserved bytes of them
// not in use, evicting the least recently used. A frame missing from it is loaded by the first reader that
// wants it; readers that come while it loads wait for that one load (single flight).
type cache struct {
	mu    sync.Mutex
	bound int64 // Options.CacheSize, or SetCacheSize's
	// reserved is the bytes of the bound given to the decoded working set the snapshot holds.
	reserved int64
	unit     int64 // bytes of a frame
	used     int64 // bytes of loaded entries in the map
	m        map[int]*centry
	lru      centry   // sentinel of the list of loaded entries, most recent first
	free     [][]byte // buffers of evicted entries, for the next load
	closed   bool

	loads, hits, evictions int64
}

type centry struct {
	idx        int
	buf        []byte
	err        error
	done       chan struct{} // closed when the load ends
	refs       int           // readers holding buf
	evicted    bool          // out of the map; buf goes to free when refs drops to 0
	shared     bool          // buf was handed out by Cached: never reused (the GC frees it)
	prev, next *centry
}

// maxFree bounds the spare buffers kept: enough for the loads of both cores in flight.
const maxFree = 4

var errClosed = errors.New("snapshot: closed")

func (c *cache) init(limit, unit int64) {
	c.bound, c.unit = limit, unit
	c.m = make(map[int]*centry)
	c.lru.prev, c.lru.next = &c.lru, &c.lru
}

// get returns frame idx loaded, held for the caller until release.
func (c *cache) get(ctx context.Context, s *Snapshot, idx int) (*centry, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errClosed
	}
	if e := c.m[idx]; e != nil {
		e.refs++
		c.hits++
		if e.prev != nil {
			c.unlink(e)
			c.pushFront(e)
		}
		c.mu.Unlock()
		select {
		case <-e.done:
		case <-ctx.Done():
			c.release(e)
			return nil, fmt.Errorf("%w: waiting for frame %d: %w", ErrTransient, idx, ctx.Err())
		}
		if e.err != nil {
			c.release(e)
			return nil, e.err
		}
		return e, nil
	}
	e := &centry{idx: idx, done: make(chan struct{}), refs: 1}
	c.m[idx] = e
	c.loads++
	var buf []byte
	if n := len(c.free); n > 0 {
		buf, c.free = c.free[n-1], c.free[:n-1]
	}
	c.mu.Unlock()

	if buf == nil {
		buf = make([]byte, c.unit)
	}
	buf = buf[:s.m.frameLen(idx)]
	// The load does not stop for the first reader's ctx: others may be waiting for it, and it
	// is one bounded read.
	err := s.readFrame(context.WithoutCancel(ctx), idx, buf)

	c.mu.Lock()
	if err != nil {
		e.err = err
		delete(c.m, idx)
		e.evicted = true
		c.recycle(buf)
	} else if c.closed {
		e.buf, e.evicted = buf, true // Close came during the load: the reader gets it, nobody after
	} else {
		e.buf = buf
		c.used += int64(len(buf))
		c.pushFront(e)
		c.evict()
	}
	close(e.done)
	c.mu.Unlock()
	if err != nil {
		c.release(e)
		return nil, err
	}
	return e, nil
}

// release ends a reader's hold on e.
func (c *cache) release(e *centry) {
	c.mu.Lock()
	e.refs--
	if e.refs == 0 {
		if e.evicted && e.buf != nil {
			if !e.shared {
				c.recycle(e.buf)
			}
			e.buf = nil
		}
		c.evict()
	}
	c.mu.Unlock()
}

// evict drops least recently used entries nobody holds until used is within the limit.
func (c *cache) evict() {
	for e := c.lru.prev; e != &c.lru && c.used > c.bound-c.reserved; {
		prev := e.prev
		if e.refs == 0 {
			c.unlink(e)
			delete(c.m, e.idx)
			c.used -= int64(len(e.buf))
			c.evictions++
			e.evicted = true
			if !e.shared {
				c.recycle(e.buf)
			}
			e.buf = nil
		}
		e = prev
	}
}

// peek returns frame idx's bytes if it is loaded now, without loading or waiting, and marks
// them shared: from then on its buffer is never reused for another frame, so the slice stays
// valid for as long as its holder keeps it.
func (c *cache) peek(idx int) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.m[idx]
	if e == nil || e.buf == nil || e.evicted {
		return nil, false
	}
	select {
	case <-e.done:
	default:
		return nil, false // loading
	}
	e.shared = true
	c.hits++
	if e.prev != nil {
		c.unlink(e)
		c.pushFront(e)
	}
	return e.buf, true
}

// limitNow is the bytes of frames the cache may hold now: its bound less what is reserved.
func (c *cache) limitNow() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bound - c.reserved
}

// boundNow is the cache's bound.
func (c *cache) boundNow() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bound
}

// reserve takes n bytes off the cache's bound for something else kept in memory within it (the
// decoded working set), evicting what no longer fits; it fails, taking nothing, when the
// reserved bytes would be more than half the bound.
func (c *cache) reserve(n int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.reserved+n > c.bound/2 {
		return false
	}
	c.reserved += n
	c.evict()
	return true
}

// setBound makes n the cache's bound. When what is reserved would be more than half of it, the
// reservation is given back (the caller drops what it held) and it reports false.
func (c *cache) setBound(n int64) (keep bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.bound = n
	keep = c.reserved <= n/2
	if !keep {
		c.reserved = 0
	}
	c.evict()
	return keep
}

func (c *cache) recycle(b []byte) {
	if len(c.free) < maxFree && !c.closed && int64(cap(b)) == c.unit {
		c.free = append(c.free, b[:cap(b)])
	}
}

func (c *cache) pushFront(e *centry) {
	e.prev, e.next = &c.lru, c.lru.next
	c.lru.next.prev = e
	c.lru.next = e
}

func (c *cache) unlink(e *centry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

// drop empties the cache for Close. Readers holding entries keep their buffers.
func (c *cache) drop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for e := c.lru.next; e != &c.lru; {
		next := e.next
		c.unlink(e)
		delete(c.m, e.idx)
		e.evicted = true
		e = next
	}
	c.used = 0
	c.free = nil
}

func (c *cache) stats() CacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return CacheStats{Loads: c.loads, Hits: c.hits, Evictions: c.evictions, Bytes: c.used}
}
