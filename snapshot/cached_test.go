package snapshot

import (
	"bytes"
	"testing"

	"github.com/faultline-go/faultline/source"
)

var (
	_ source.Source        = (*Snapshot)(nil)
	_ source.Zeros         = (*Snapshot)(nil)
	_ source.Cached        = (*Snapshot)(nil)
	_ source.Extent        = (*Snapshot)(nil)
	_ source.ContextReader = (*Snapshot)(nil)
)

// Cached answers only for chunks decompressed already, never loads, and the bytes it hands out
// stay those of their chunk after the chunk is evicted and other chunks are loaded (its buffer
// is not reused).
func TestCachedNeverReused(t *testing.T) {
	img := sample(t, 16<<20, 52)
	for c := 0; c < 8; c++ {
		img[c<<21+100] = 1 // no chunk all zero
	}
	dir := pack(t, img, PackOptions{FrameSize: 2 << 20}) // the cache's unit: one chunk
	s, err := OpenWith(dir, Options{CacheSize: 1 << 21})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, ok := s.Cached(4096, 4096); ok {
		t.Fatal("Cached answered for a chunk never read")
	}
	p := make([]byte, 4096)
	if _, err := s.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	b, ok := s.Cached(4096, 8192)
	if !ok || !bytes.Equal(b, img[4096:4096+8192]) {
		t.Fatalf("Cached(4096, 8192) = %v, right bytes %v", ok, ok && bytes.Equal(b, img[4096:4096+8192]))
	}
	if _, ok := s.Cached(1<<21-4096, 8192); ok {
		t.Error("Cached answered for a range across two chunks")
	}
	loads := s.CacheStats().Loads
	for c := 1; c < 8; c++ { // evicts chunk 0; its buffer must not take another chunk
		if _, err := s.ReadAt(p, int64(c)<<21); err != nil {
			t.Fatal(err)
		}
	}
	if s.CacheStats().Loads != loads+7 {
		t.Fatalf("loads %d, want %d", s.CacheStats().Loads, loads+7)
	}
	if !bytes.Equal(b, img[4096:4096+8192]) {
		t.Fatal("bytes handed out by Cached changed after their chunk was evicted")
	}
	if _, ok := s.Cached(4096, 4096); ok {
		t.Error("Cached answered for an evicted chunk")
	}
	if s.Extent() != s.FrameSize() {
		t.Errorf("Extent %d, frame size %d", s.Extent(), s.FrameSize())
	}
}
