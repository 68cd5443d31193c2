package snapshot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestOpenChunks(t *testing.T) {
	dir := t.TempDir()
	const n = maxOpenChunks + 44
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), []byte(fmt.Sprint("file ", i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var c openChunks
	opens := map[string]int{}
	var mu sync.Mutex
	get := func(name string) File {
		t.Helper()
		f, err := c.get(name, func() (*os.File, error) {
			mu.Lock()
			opens[name]++
			mu.Unlock()
			return os.Open(filepath.Join(dir, name))
		})
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	read := func(f File, name string) {
		t.Helper()
		b := make([]byte, 64)
		k, _ := f.ReadAt(b, 0)
		if want := "file " + name; string(b[:k]) != want {
			t.Fatalf("read %q, want %q", b[:k], want)
		}
	}
	held := get("0") // held across its eviction: it must stay readable until released
	for i := range n {
		name := fmt.Sprint(i)
		f := get(name)
		read(f, name)
		f.Close()
	}
	if len(c.files) > maxOpenChunks {
		t.Fatalf("%d files open, want at most %d", len(c.files), maxOpenChunks)
	}
	if _, ok := c.files["0"]; ok {
		t.Fatal("the least recently used file was not evicted")
	}
	read(held, "0")
	held.Close()
	last := fmt.Sprint(n - 1)
	a, b := get(last), get(last) // cached: not opened again
	if opens[last] != 1 {
		t.Fatalf("%s opened %d times, want 1 (kept open)", last, opens[last])
	}
	// A handle closed twice gives back its own reference only: the file stays open for the
	// other handle and for the cache, even after the cache drops it.
	a.Close()
	if err := a.Close(); err == nil {
		t.Error("a second Close of a handle did not fail")
	}
	if _, err := a.ReadAt(make([]byte, 1), 0); err == nil {
		t.Error("a read on a closed handle did not fail")
	}
	c.forget(last)
	read(b, last)
	b.Close()
	f := get(last)
	read(f, last)
	f.Close()
	if opens[last] != 2 {
		t.Fatalf("%s opened %d times after forget, want 2", last, opens[last])
	}

	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				name := fmt.Sprint((g*37 + i*13) % n)
				f := get(name)
				read(f, name)
				f.Close()
			}
		}()
	}
	wg.Wait()
	c.close()
	if len(c.files) != 0 {
		t.Fatalf("%d files left after close", len(c.files))
	}
	f = get("5") // after close: an uncached file of its own
	read(f, "5")
	f.Close()
	if len(c.files) != 0 {
		t.Fatal("a file opened after close was kept")
	}
}

// A snapshot that failed to open leaves no descriptor behind (the dictionary it read is kept
// open by the snapshot's files until then), nor does one opened on files from elsewhere (a
// wrapped DirFiles, which opens and closes a file per read).
func TestChunkFilesNotLeaked(t *testing.T) {
	dir := pack(t, sample(t, 4<<20, 72), PackOptions{})
	wrapped, err := OpenFiles(ctx, dir, struct{ Files }{DirFiles(dir)}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	before := openFDs(t)
	if _, err := wrapped.ReadAt(make([]byte, 4<<20), 0); err != nil {
		t.Fatal(err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors after reading through a wrapped DirFiles, %d before", after, before)
	}
	wrapped.Close()

	m, _ := ReadManifest(dir)
	p := filepath.Join(dir, ChunksDir, m.Dict.fileName())
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[10] ^= 1
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	before = openFDs(t)
	for range 10 {
		if _, err := Open(dir); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Open with a corrupt dictionary: %v", err)
		}
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors after 10 failed opens, %d before", after, before)
	}
}

// A snapshot's reads keep chunk files open, and Close closes them: no descriptor outlives it.
func TestChunkFilesClosed(t *testing.T) {
	img := sample(t, 16<<20, 9)
	dir := pack(t, img, PackOptions{})
	before := openFDs(t)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(img))
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if during := openFDs(t); during <= before {
		t.Fatalf("%d descriptors while open, %d before: chunk files are not kept open", during, before)
	}
	s.Close()
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors after Close, %d before", after, before)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}
