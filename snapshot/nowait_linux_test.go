package snapshot

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// dropPages evicts path's pages from the page cache (written back first).
func dropPages(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// LoadCached loads a frame only when that takes no I/O: its chunk file open and its stored bytes
// in the page cache; then the bytes are the image's, and a frame that fails its hash is not
// loaded (the read after it reports it).
func TestLoadCached(t *testing.T) {
	img := sample(t, 8<<20, 91)
	dir := pack(t, img, PackOptions{})
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m := s.m
	per := int(m.ChunkSize / m.FrameSize)
	// Three frames of chunk 1 that store bytes.
	var frames []int
	for g := per; g < 2*per && len(frames) < 3; g++ {
		if loc := s.frames[1][g-per]; loc.stored > 0 {
			frames = append(frames, g)
		}
	}
	if len(frames) < 3 {
		t.Fatalf("chunk 1 stores %d frames: the test proves nothing", len(frames))
	}
	path := filepath.Join(dir, ChunksDir, m.ChunkFileName(1))
	at := func(g int) int64 { return int64(g) * m.FrameSize }
	want := func(g int) []byte { return img[at(g) : at(g)+4096] }

	if _, ok := s.LoadCached(at(frames[0]), 4096); ok {
		t.Fatal("loaded a frame of a chunk file not open yet")
	}
	buf := make([]byte, 4096)
	if _, err := s.ReadAt(buf, at(frames[2])); err != nil { // opens the chunk file
		t.Fatal(err)
	}
	dropPages(t, path)
	if _, ok := s.LoadCached(at(frames[0]), 4096); ok {
		t.Fatal("loaded a frame whose stored bytes were not in the page cache")
	}
	if _, err := os.ReadFile(path); err != nil { // into the page cache
		t.Fatal(err)
	}
	loads := s.CacheStats().Loads
	b, ok := s.LoadCached(at(frames[0]), 4096)
	if !ok || !bytes.Equal(b, want(frames[0])) {
		t.Fatalf("a frame in the page cache: loaded %v, bytes right %v", ok, ok && bytes.Equal(b, want(frames[0])))
	}
	if got := s.CacheStats().Loads; got != loads+1 {
		t.Errorf("%d loads after LoadCached, want %d", got, loads+1)
	}
	if n := testing.AllocsPerRun(100, func() { s.LoadCached(at(frames[0]), 4096) }); n != 0 {
		t.Errorf("LoadCached of a cached frame allocates %v times", n)
	}

	// A frame corrupt in the page cache: not loaded, and the read that follows says why.
	loc := s.frames[1][frames[1]-per]
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	raw[loc.off+int64(loc.stored)/2] ^= 0x10
	os.Chmod(path, 0o644)
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.LoadCached(at(frames[1]), 4096); ok {
		t.Fatal("loaded a corrupt frame")
	}
	if _, err := s.ReadAt(buf, at(frames[1])); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("reading the corrupt frame: %v, want ErrCorrupt", err)
	}
}

// The no-wait read allocates nothing: it runs on the fault path.
func TestReadNoWaitAllocs(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, bytes.Repeat([]byte("x"), 1<<16), 0o644); err != nil {
		t.Fatal(err)
	}
	var c openChunks
	h, err := c.get("f", func() (*os.File, error) { return os.Open(p) })
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	oc := c.lookup("f")
	defer oc.release()
	b := make([]byte, 1<<14)
	if !oc.readNoWait(b, 4096) || b[0] != 'x' {
		t.Fatal("no-wait read of a cached file failed")
	}
	if n := testing.AllocsPerRun(100, func() { oc.readNoWait(b, 4096) }); n != 0 {
		t.Errorf("readNoWait allocates %v times", n)
	}
}
