package snapshot

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// streamWS reads the whole working set of s, checking every page against img; it returns the
// pages read and the first error.
func streamWS(t *testing.T, s *Snapshot, img []byte, stopAfter int) (int, error) {
	t.Helper()
	r, err := s.OpenWorkingSet()
	if err != nil {
		return 0, err
	}
	defer r.Close()
	n := 0
	for stopAfter < 0 || n < stopAfter {
		run, err := r.Next()
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		for k := range run.Count {
			pg := run.Page + uint64(k)
			want := img[pg*4096 : (pg+1)*4096]
			if run.Zero {
				if !bytes.Equal(want, make([]byte, 4096)) {
					t.Fatalf("page %d handed out as zero", pg)
				}
			} else if !bytes.Equal(run.Data[k*4096:(k+1)*4096], want) {
				t.Fatalf("page %d: wrong bytes", pg)
			}
		}
		n += run.Count
	}
	return n, nil
}

func wsSnapshot(t *testing.T) (dir string, img []byte, order []uint64) {
	t.Helper()
	img = sample(t, 16<<20, 81)
	dir = pack(t, img, PackOptions{})
	for p := uint64(4095); p > 0; p -= 3 { // descending, gaps: many frames, many runs
		order = append(order, p)
	}
	if err := WriteWorkingSet(dir, order); err != nil {
		t.Fatal(err)
	}
	return dir, img, order
}

// The first reader that streams the working set whole leaves it decoded in the snapshot: the
// readers after it hand out the same pages without reading the extent (here: gone from disk),
// and the frame cache gives up its bytes.
func TestWorkingSetHeld(t *testing.T) {
	dir, img, order := wsSnapshot(t)
	m, _ := ReadManifest(dir)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, err := streamWS(t, s, img, -1); err != nil || n != len(order) {
		t.Fatalf("first stream: %d of %d pages, %v", n, len(order), err)
	}
	var raw int64
	for _, f := range m.WorkingSet.Frames {
		raw += f.Raw
	}
	if got := s.CacheStats().WorkingSet; got != raw {
		t.Fatalf("%d bytes of the working set held, want %d", got, raw)
	}
	if s.cache.limitNow() != DefaultCacheSize-raw {
		t.Fatalf("frame cache bound %d, want %d less than %d", s.cache.limitNow(), raw, DefaultCacheSize)
	}
	if err := os.Remove(filepath.Join(dir, m.WorkingSet.Extent)); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if n, err := streamWS(t, s, img, -1); err != nil || n != len(order) {
			t.Fatalf("stream %d from memory: %d of %d pages, %v", i+2, n, len(order), err)
		}
	}
}

// The held working set counts within the cache bound: a bound under twice its size lets it go
// (the next reader streams the extent, and holds it again under a larger bound).
func TestWorkingSetHeldResized(t *testing.T) {
	dir, img, order := wsSnapshot(t)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := streamWS(t, s, img, -1); err != nil {
		t.Fatal(err)
	}
	raw := s.CacheStats().WorkingSet
	if raw == 0 {
		t.Fatal("nothing held")
	}
	s.SetCacheSize(4 * raw)
	if s.CacheStats().WorkingSet != raw || s.cache.limitNow() != 3*raw {
		t.Fatalf("bound 4x the working set: %d held, frame limit %d, want %d and %d", s.CacheStats().WorkingSet, s.cache.limitNow(), raw, 3*raw)
	}
	s.SetCacheSize(raw)
	if s.CacheStats().WorkingSet != 0 || s.cache.limitNow() != raw {
		t.Fatalf("bound 1x the working set: %d held, frame limit %d, want 0 and %d", s.CacheStats().WorkingSet, s.cache.limitNow(), raw)
	}
	s.SetCacheSize(0)
	if n, err := streamWS(t, s, img, -1); err != nil || n != len(order) {
		t.Fatalf("stream after the resize: %d of %d pages, %v", n, len(order), err)
	}
	if s.CacheStats().WorkingSet != raw || s.cache.limitNow() != DefaultCacheSize-raw {
		t.Fatalf("held again: %d, frame limit %d", s.CacheStats().WorkingSet, s.cache.limitNow())
	}
}

// What is not streamed whole and verified is never held: a reader closed part-way, a corrupt
// frame, a working set larger than half the cache.
func TestWorkingSetNotHeld(t *testing.T) {
	dir, img, order := wsSnapshot(t)
	m, _ := ReadManifest(dir)
	extent := filepath.Join(dir, m.WorkingSet.Extent)

	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := streamWS(t, s, img, len(order)/2); err != nil || n < len(order)/2 {
		t.Fatalf("half a stream: %d pages, %v", n, err)
	}
	if got := s.CacheStats().WorkingSet; got != 0 {
		t.Fatalf("a stream closed part-way left %d bytes held", got)
	}
	s.Close()

	small, err := OpenWith(dir, Options{CacheSize: 1 << 20}) // under twice the working set
	if err != nil {
		t.Fatal(err)
	}
	if n, err := streamWS(t, small, img, -1); err != nil || n != len(order) {
		t.Fatalf("stream with a small cache: %d of %d pages, %v", n, len(order), err)
	}
	if got := small.CacheStats().WorkingSet; got != 0 {
		t.Fatalf("%d bytes held by a 1 MiB cache", got)
	}
	small.Close()

	b, _ := os.ReadFile(extent)
	b[len(b)-10] ^= 1 // in the last frame: every frame before it is decoded and kept first
	os.WriteFile(extent, b, 0o644)
	bad, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if _, err := streamWS(t, bad, img, -1); err == nil {
		t.Fatal("a corrupt last frame streamed without an error")
	}
	if got := bad.CacheStats().WorkingSet; got != 0 {
		t.Fatalf("a working set with a corrupt frame left %d bytes held", got)
	}
}

// Of readers streaming at once, one keeps what it decodes (VMs starting together would each keep
// a copy otherwise); one that stops before the end hands the role on to the next reader opened.
func TestWorkingSetOneKeeper(t *testing.T) {
	dir, img, order := wsSnapshot(t)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	first, err := s.OpenWorkingSet()
	if err != nil {
		t.Fatal(err)
	}
	if !first.keep {
		t.Fatal("the first reader does not keep what it decodes")
	}
	if n, err := streamWS(t, s, img, -1); err != nil || n != len(order) {
		t.Fatalf("a second reader streaming: %d of %d pages, %v", n, len(order), err)
	}
	if got := s.CacheStats().WorkingSet; got != 0 {
		t.Fatalf("a reader that was not the keeper left %d bytes held", got)
	}
	if _, err := first.Next(); err != nil {
		t.Fatal(err)
	}
	first.Close() // part-way: the role goes
	if n, err := streamWS(t, s, img, -1); err != nil || n != len(order) {
		t.Fatalf("a reader after the keeper stopped: %d of %d pages, %v", n, len(order), err)
	}
	if s.CacheStats().WorkingSet == 0 {
		t.Fatal("the reader after a keeper that stopped did not keep the working set")
	}
}
