package snapshot

import (
	"bytes"
	"testing"
)

// SetCacheSize shrinks a full cache at once (evicting down to the new bound) and a grown one
// keeps more chunks; the bytes read stay right.
func TestSetCacheSize(t *testing.T) {
	img := sample(t, 16<<20, 52)
	for c := 0; c < 8; c++ { // no chunk all zero
		img[c<<21+100] = 1
	}
	dir := pack(t, img, PackOptions{FrameSize: 2 << 20}) // the cache's unit: one chunk
	s, err := OpenWith(dir, Options{CacheSize: 8 << 21})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p := make([]byte, 1<<21)
	readAll := func() {
		t.Helper()
		for c := range 8 {
			if _, err := s.ReadAt(p, int64(c)<<21); err != nil || !bytes.Equal(p, img[c<<21:(c+1)<<21]) {
				t.Fatalf("chunk %d: %v or wrong bytes", c, err)
			}
		}
	}
	readAll()
	if st := s.CacheStats(); st.Bytes != 8<<21 {
		t.Fatalf("cache holds %d bytes after reading 8 chunks under an 8-chunk bound", st.Bytes)
	}
	s.SetCacheSize(2 << 21)
	if st := s.CacheStats(); st.Bytes != 2<<21 || st.Evictions != 6 {
		t.Fatalf("after shrinking to 2 chunks: %+v", st)
	}
	readAll()
	if st := s.CacheStats(); st.Bytes > 2<<21 {
		t.Fatalf("cache holds %d bytes, bound %d", st.Bytes, 2<<21)
	}
	s.SetCacheSize(8 << 21)
	readAll()
	loads := s.CacheStats().Loads
	readAll()
	if st := s.CacheStats(); st.Loads != loads || st.Bytes != 8<<21 {
		t.Fatalf("after growing back to 8 chunks, a second pass loaded %d chunks (%+v)", st.Loads-loads, st)
	}
}
