package snapshot

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// tornFiles serves a snapshot directory's files, but the first open of each chunk file after
// Arm gets a copy with a flipped byte: a cache holding a torn chunk. Corrupt makes the next
// open a good one, as a cache that drops its copy and fetches it again does.
type tornFiles struct {
	Files
	dir string

	mu       sync.Mutex
	torn     map[string]bool // names whose next open is torn
	corrupts []string
}

func (f *tornFiles) Chunk(c context.Context, name string, size int64) (File, error) {
	f.mu.Lock()
	torn := f.torn[name]
	f.mu.Unlock()
	if !torn || strings.HasSuffix(name, ".dict") {
		return f.Files.Chunk(c, name, size)
	}
	b, err := os.ReadFile(filepath.Join(f.dir, ChunksDir, name))
	if err != nil {
		return nil, err
	}
	for i := len(chunkMagic) + 64; i < len(b); i += 97 {
		b[i] ^= 0x5a
	}
	return nopCloser{bytes.NewReader(b)}, nil
}

func (f *tornFiles) Corrupt(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.corrupts = append(f.corrupts, name)
	delete(f.torn, name)
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

// A frame that fails its hash is reported to the Files and read once more: a torn copy in a
// cache costs one more fetch, never a wrong byte; a file that stays bad is an error.
func TestTornChunkReadAgain(t *testing.T) {
	img := sample(t, 8<<20, 71)
	dir := pack(t, img, PackOptions{})
	m, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	f := &tornFiles{Files: DirFiles(dir), dir: dir, torn: map[string]bool{}}
	for i := range m.Chunks {
		if n := m.ChunkFileName(i); n != "" {
			f.torn[n] = true
		}
	}
	s, err := OpenFiles(ctx, dir, f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := make([]byte, len(img))
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatalf("ReadAt through torn copies: %v", err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("wrong bytes")
	}
	if len(f.corrupts) == 0 {
		t.Fatal("no Corrupt call: the torn copies were never read")
	}

	// A file that is bad on disk stays bad: the second read fails too, and the error names it.
	recs, _ := m.parseFrames(1, m.Chunks[1].Frames)
	var stored []int // chunk 1's frames that store bytes
	for k, r := range recs {
		if r.stored > 0 {
			stored = append(stored, k)
		}
	}
	if len(stored) < 2 {
		t.Fatalf("chunk 1 stores %d frames: the test proves nothing", len(stored))
	}
	name := m.ChunkFileName(1)
	p := filepath.Join(dir, ChunksDir, name)
	b, _ := os.ReadFile(p)
	b[headerLen(m.Chunks[1].Frames)+3] ^= 1 // in the first stored frame
	os.Chmod(p, 0o644)
	os.WriteFile(p, b, 0o644)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	at := func(k int) int64 { return 2<<20 + int64(k)*m.FrameSize }
	frame := make([]byte, m.FrameSize)
	_, err = s2.ReadAt(frame, at(stored[0]))
	var ce *ChunkError
	if !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) || ce.Chunk != 1 || !strings.Contains(err.Error(), name) {
		t.Fatalf("read of a bad frame: %v, want a corrupt error naming chunk 1 and %s", err, name)
	}
	// The other frames of that chunk still read (each is verified on its own).
	off := at(stored[1])
	if _, err := s2.ReadAt(frame, off); err != nil || !bytes.Equal(frame, img[off:off+m.FrameSize]) {
		t.Fatalf("a good frame of the same chunk: %v", err)
	}
}

// The dictionary is verified at open: a damaged one is a clear error, not bad decompression
// later.
func TestCorruptDictionary(t *testing.T) {
	dir := pack(t, sample(t, 4<<20, 72), PackOptions{})
	m, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Dict == nil {
		t.Fatal("no dictionary: the test proves nothing")
	}
	p := filepath.Join(dir, ChunksDir, m.Dict.fileName())
	b, _ := os.ReadFile(p)
	b[10] ^= 1
	os.Chmod(p, 0o644)
	os.WriteFile(p, b, 0o644)
	_, err = Open(dir)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "dictionary") {
		t.Fatalf("Open with a damaged dictionary: %v", err)
	}
	os.Remove(p)
	if _, err = Open(dir); !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), "dictionary") {
		t.Fatalf("Open without the dictionary: %v", err)
	}
}

// Verify checks each chunk file's own frame table against the manifest's.
func TestVerifyFrameTable(t *testing.T) {
	dir := pack(t, sample(t, 4<<20, 73), PackOptions{})
	m, _ := ReadManifest(dir)
	p := filepath.Join(dir, ChunksDir, m.ChunkFileName(0))
	b, _ := os.ReadFile(p)
	b[len(chunkMagic)+3] ^= 1 // in the table: the frames' bytes stay right
	os.Chmod(p, 0o644)
	os.WriteFile(p, b, 0o644)
	bad, err := Verify(ctx, dir)
	if err != nil || len(bad) != 1 || !strings.Contains(bad[0].Error(), "frame table") {
		t.Fatalf("Verify: %v, %v; want one error about the frame table", bad, err)
	}
}
