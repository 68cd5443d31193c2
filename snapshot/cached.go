package snapshot

// What the engine asks of a source beyond ReadAt (package source): the frames decompressed
// already are served from memory on the fault path, and a fault's window stays within a frame.

// Cached returns the image bytes [off, off+n) if they lie in one frame that is decompressed in
// the cache now (source.Cached). It never reads or waits. The bytes are never overwritten: the
// frame's buffer is not reused once handed out here.
func (s *Snapshot) Cached(off, n int64) ([]byte, bool) {
	if off < 0 || n <= 0 || off+n > s.m.Size || s.closed.Load() {
		return nil, false
	}
	idx := int(off / s.m.FrameSize)
	in := off - int64(idx)*s.m.FrameSize
	if in+n > s.m.frameLen(idx) {
		return nil, false
	}
	b, ok := s.cache.peek(idx)
	if !ok {
		return nil, false
	}
	return b[in : in+n : in+n], true
}

// Extent is the frame size: the unit a read decompresses (source.Extent).
func (s *Snapshot) Extent() int64 { return s.m.FrameSize }
