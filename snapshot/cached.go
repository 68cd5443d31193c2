package snapshot

// What the engine asks of a source beyond ReadAt (package source): the chunks decompressed
// already are served from memory on the fault path, and a fault's window stays within a chunk.

// Cached returns the image bytes [off, off+n) if they lie in one chunk that is decompressed in
// the cache now (source.Cached). It never reads or waits. The bytes are never overwritten: the
// chunk's buffer is not reused once handed out here.
func (s *Snapshot) Cached(off, n int64) ([]byte, bool) {
	if off < 0 || n <= 0 || off+n > s.m.Size || s.closed.Load() {
		return nil, false
	}
	idx := int(off / s.m.ChunkSize)
	in := off - int64(idx)*s.m.ChunkSize
	if in+n > s.m.chunkLen(idx) {
		return nil, false
	}
	b, ok := s.cache.peek(idx)
	if !ok {
		return nil, false
	}
	return b[in : in+n : in+n], true
}

// Extent is the chunk size: the unit a read decompresses (source.Extent).
func (s *Snapshot) Extent() int64 { return s.m.ChunkSize }
