package snapshot

// SetCacheSize changes the bound of the cache of decompressed frames (Options.CacheSize) of an
// open snapshot: a daemon serving many snapshots divides one memory bound among those open, and
// resizes each as snapshots come and go. Shrinking evicts at once the least recently used frames
// nobody holds; a size <= 0 means DefaultCacheSize.
func (s *Snapshot) SetCacheSize(n int64) {
	if n <= 0 {
		n = DefaultCacheSize
	}
	c := &s.cache
	c.mu.Lock()
	defer c.mu.Unlock()
	c.limit = n
	c.evict()
}
