package snapshot

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
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

// A working-set reader that met a bad frame returns that error from then on: never the pages
// after it with another frame's bytes, never io.EOF.
func TestWorkingSetErrorSticks(t *testing.T) {
	img := sample(t, 16<<20, 74)
	dir := pack(t, img, PackOptions{})
	var order []uint64
	for p := uint64(0); p < 4096; p += 2 {
		order = append(order, p)
	}
	if err := WriteWorkingSet(dir, order); err != nil {
		t.Fatal(err)
	}
	m, _ := ReadManifest(dir)
	w := m.WorkingSet
	if len(w.Frames) < 3 {
		t.Fatalf("%d frames: the test proves nothing", len(w.Frames))
	}
	p := filepath.Join(dir, w.Extent)
	b, _ := os.ReadFile(p)
	b[w.Frames[0].Stored+5] ^= 1 // in frame 1
	os.WriteFile(p, b, 0o644)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r, err := s.OpenWorkingSet()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var first error
	for range len(order) + 10 {
		run, err := r.Next()
		if err != nil {
			if first == nil {
				first = err
			} else if err != first {
				t.Fatalf("after %v, Next returned %v", first, err)
			}
			continue
		}
		if first != nil {
			t.Fatalf("Next returned pages (%d) after the error %v", run.Page, first)
		}
		for k := range run.Count {
			pg := run.Page + uint64(k)
			if !run.Zero && !bytes.Equal(run.Data[k*4096:(k+1)*4096], img[pg*4096:(pg+1)*4096]) {
				t.Fatalf("page %d: wrong bytes", pg)
			}
		}
	}
	if !errors.Is(first, ErrCorrupt) {
		t.Fatalf("error %v, want corrupt", first)
	}

	// An extent shorter than the manifest says: an error, again and again, not io.EOF.
	os.Truncate(p, w.Frames[0].Stored+10)
	s2, err := openFiles(ctx, dir, DirFiles(dir), Options{}, true) // past OpenWith's size check
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	r2, err := s2.OpenWorkingSet()
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	var errs int
	for range len(order) + 10 {
		if _, err := r2.Next(); err != nil {
			if err == io.EOF {
				t.Fatal("a truncated extent ended in io.EOF")
			}
			errs++
		}
	}
	if errs == 0 {
		t.Fatal("a truncated extent read without an error")
	}
}

// stalledFiles serves an extent whose read never returns until it is closed (a bucket that
// stopped answering).
type stalledFiles struct{ Files }

func (stalledFiles) Extent(context.Context, string, int64) (io.ReadCloser, error) {
	r, _ := io.Pipe()
	return r, nil
}

// Close of a working-set reader returns while its extent read is stuck, and Close of the
// snapshot while its frames are being decompressed waits for them instead of pulling the
// decoder from under them.
func TestWorkingSetCloseUnblocks(t *testing.T) {
	img := sample(t, 16<<20, 75)
	dir := pack(t, img, PackOptions{})
	var order []uint64
	for p := uint64(0); p < 4096; p++ {
		order = append(order, p)
	}
	if err := WriteWorkingSet(dir, order); err != nil {
		t.Fatal(err)
	}
	s, err := OpenFiles(ctx, dir, stalledFiles{DirFiles(dir)}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.OpenWorkingSet()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Close() }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("Close of a reader whose extent read is stuck never returned")
	}
	s.Close()

	// Snapshot.Close while decoders run: the readers end (with data or errors), nothing hangs.
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := s2.OpenWorkingSet()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			if _, err := r2.Next(); err != nil {
				break
			}
		}
		done <- r2.Close()
	}()
	s2.Close()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("the working set reader hung after Close of its snapshot")
	}
}

// A torn dictionary in a cache is refetched once, like a chunk.
func TestTornDictionaryReadAgain(t *testing.T) {
	dir := pack(t, sample(t, 4<<20, 76), PackOptions{})
	m, _ := ReadManifest(dir)
	f := &tornDict{Files: DirFiles(dir), dir: dir, name: m.Dict.fileName()}
	s, err := OpenFiles(ctx, dir, f, Options{})
	if err != nil {
		t.Fatalf("OpenFiles through a torn dictionary: %v", err)
	}
	s.Close()
	if f.corrupts != 1 {
		t.Fatalf("%d Corrupt calls, want 1", f.corrupts)
	}
}

type tornDict struct {
	Files
	dir, name string
	corrupts  int
}

func (f *tornDict) Chunk(c context.Context, name string, size int64) (File, error) {
	if name != f.name || f.corrupts > 0 {
		return f.Files.Chunk(c, name, size)
	}
	b, _ := os.ReadFile(filepath.Join(f.dir, ChunksDir, name))
	b[7] ^= 1
	return nopCloser{bytes.NewReader(b)}, nil
}

func (f *tornDict) Corrupt(name string) {
	if name == f.name {
		f.corrupts++
	}
}

// Packs into one store with other frame sizes, and over a damaged chunk file, never replace a
// chunk file another snapshot uses: the first stays readable, the damaged one fails the pack.
func TestStoreNeverReplacesChunks(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	img := sample(t, 8<<20, 77)
	a := pack(t, img, PackOptions{Store: store, FrameSize: 16 << 10})
	b := pack(t, img, PackOptions{Store: store})
	c := pack(t, img, PackOptions{Store: store, Level: 3})
	for _, d := range []string{a, b, c} {
		if bad, err := Verify(ctx, d); err != nil || len(bad) != 0 {
			t.Fatalf("%s after packs into its store: %v %v", d, bad, err)
		}
		checkUnpack(t, d, img)
	}
	m, _ := ReadManifest(b)
	p := filepath.Join(store, ChunksDir, m.ChunkFileName(1))
	raw, _ := os.ReadFile(p)
	raw[len(raw)-3] ^= 1
	os.Chmod(p, 0o644)
	os.WriteFile(p, raw, 0o644)
	_, err := Pack(ctx, writeImage(t, img), filepath.Join(t.TempDir(), "d"), PackOptions{Store: store})
	if err == nil || !strings.Contains(err.Error(), filepath.Base(p)) {
		t.Fatalf("pack over a damaged store chunk: %v, want an error naming it", err)
	}
	if now, _ := os.ReadFile(p); !bytes.Equal(now, raw) {
		t.Fatal("pack replaced the damaged chunk file")
	}
}

// A manifest whose working-set frame claims more payload than a frame holds is refused: a
// reader would allocate what it claims.
func TestWorkingSetFrameBound(t *testing.T) {
	dir := pack(t, sample(t, 8<<20, 78), PackOptions{})
	var order []uint64
	for p := uint64(0); p < 2048; p++ {
		order = append(order, p)
	}
	if err := WriteWorkingSet(dir, order); err != nil {
		t.Fatal(err)
	}
	editManifest(t, dir, func(m *Manifest) {
		f := m.WorkingSet.Frames
		if len(f) < 2 || f[0].Enc == EncZero || f[1].Enc == EncZero {
			t.Fatalf("frames %+v: the test proves nothing", f)
		}
		f[0].Entries += f[1].Entries
		f[0].Raw += f[1].Raw
		f[0].Stored += f[1].Stored
		m.WorkingSet.Frames = append(f[:1], f[2:]...)
	})
	if _, err := Open(dir); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "payload bytes, more than") {
		t.Fatalf("Open: %v, want the frame refused", err)
	}
}
