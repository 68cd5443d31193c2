package snapshot

// SetCacheSize changes the bound of the cache of decompressed frames (Options.CacheSize) of an
// open snapshot: a daemon serving many snapshots divides one memory bound among those open, and
// resizes each as snapshots come and go. Shrinking evicts at once the least recently used frames
// nobody holds; a size <= 0 means DefaultCacheSize. The decoded working set the snapshot holds
// (OpenWorkingSet) counts within the bound; a bound under twice its size lets it go.
func (s *Snapshot) SetCacheSize(n int64) {
	if n <= 0 {
		n = DefaultCacheSize
	}
	s.heldMu.Lock()
	defer s.heldMu.Unlock()
	if !s.cache.setBound(n) {
		s.held = nil // more than half of the new bound: readers after this stream the extent
	}
}
