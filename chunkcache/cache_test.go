package chunkcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// content is the bytes of the file called name, of size bytes.
func content(name string, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = name[i%len(name)] ^ byte(i>>8)
	}
	return b
}

type fetcher struct{ n atomic.Int64 }

func (f *fetcher) fetch(name string, size int) Fetch {
	return func(ctx context.Context, w io.Writer) error {
		f.n.Add(1)
		_, err := w.Write(content(name, size))
		return err
	}
}

func open(t *testing.T, dir string, limit int64) *Cache {
	t.Helper()
	c, err := Open(dir, limit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readAll reads a whole File and closes it.
func readAll(t *testing.T, f *File, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFetchOnceThenHit(t *testing.T) {
	c := open(t, t.TempDir(), 1<<20)
	var f fetcher
	for i := range 3 {
		file, err := c.Open(context.Background(), "a.zst", 5000, f.fetch("a.zst", 5000))
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, file, 5000); !bytes.Equal(got, content("a.zst", 5000)) {
			t.Fatalf("open %d: wrong bytes", i)
		}
	}
	st := c.Stats()
	if f.n.Load() != 1 || st.Fetches != 1 || st.Hits != 2 || st.Files != 1 || st.Bytes != 5000 {
		t.Fatalf("fetched %d times; stats %+v", f.n.Load(), st)
	}
}

// Concurrent opens of one missing name: one fetch, every opener gets the bytes.
func TestSingleFlight(t *testing.T) {
	c := open(t, t.TempDir(), 1<<20)
	const openers = 8
	release := make(chan struct{})
	var fetches atomic.Int64
	fetch := func(ctx context.Context, w io.Writer) error {
		fetches.Add(1)
		<-release
		_, err := w.Write(content("x", 3000))
		return err
	}
	var wg sync.WaitGroup
	errs := make(chan error, openers)
	for range openers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := c.Open(context.Background(), "x", 3000, fetch)
			if err != nil {
				errs <- err
				return
			}
			b := make([]byte, 3000)
			if _, err := f.ReadAt(b, 0); err != nil || !bytes.Equal(b, content("x", 3000)) {
				errs <- fmt.Errorf("wrong bytes (%v)", err)
			}
			f.Close()
		}()
	}
	// Every other opener is waiting for the one fetch (counted as a hit when it joins).
	for deadline := time.Now().Add(10 * time.Second); c.Stats().Hits < openers-1; {
		if time.Now().After(deadline) {
			t.Fatalf("openers never all waited: %+v", c.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if fetches.Load() != 1 {
		t.Fatalf("%d fetches for %d concurrent opens, want 1", fetches.Load(), openers)
	}
}

// Past its bound the cache evicts the least recently used files, and what it evicted is
// fetched again, right.
func TestEvictsLRU(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 3*1000)
	var f fetcher
	get := func(name string) {
		t.Helper()
		file, err := c.Open(context.Background(), name, 1000, f.fetch(name, 1000))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readAll(t, file, 1000), content(name, 1000)) {
			t.Fatalf("%s: wrong bytes", name)
		}
	}
	get("a")
	get("b")
	get("c")
	get("a") // a is now the most recent: b goes first
	get("d")
	st := c.Stats()
	if st.Evictions != 1 || st.Bytes != 3000 || st.Files != 3 {
		t.Fatalf("stats %+v", st)
	}
	if _, err := os.Stat(filepath.Join(dir, "b")); !os.IsNotExist(err) {
		t.Fatalf("b still on disk (%v); the least recently used was b", err)
	}
	before := f.n.Load()
	get("a")
	get("c")
	get("d")
	if f.n.Load() != before {
		t.Fatalf("a, c, d were fetched again: they should be cached")
	}
	get("b")
	if f.n.Load() != before+1 {
		t.Fatalf("b not fetched again after its eviction")
	}
	for i := range 20 {
		get(fmt.Sprint("n", i))
	}
	if st := c.Stats(); st.Bytes > 3000 {
		t.Fatalf("%d bytes cached, over the bound", st.Bytes)
	}
}

// A file open is never removed under its reader: it stays readable (and counted) until closed.
func TestHeldFileNotEvicted(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 2000)
	var f fetcher
	held, err := c.Open(context.Background(), "held", 1000, f.fetch("held", 1000))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		name := fmt.Sprint("o", i)
		file, err := c.Open(context.Background(), name, 1000, f.fetch(name, 1000))
		if err != nil {
			t.Fatal(err)
		}
		file.Close()
	}
	if _, err := os.Stat(filepath.Join(dir, "held")); err != nil {
		t.Fatalf("held file removed while open: %v", err)
	}
	if !bytes.Equal(readAll(t, held, 1000), content("held", 1000)) {
		t.Fatal("held file: wrong bytes")
	}
}

// A crash leaves temporary files (deleted at the next Open) and maybe a torn file: one of the
// wrong size is fetched again; one of the right size but wrong bytes is found by the reader's
// hash, which Forgets it, and then it is fetched again.
func TestCrashLeftovers(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<20)
	var f fetcher
	file, err := c.Open(context.Background(), "good", 1000, f.fetch("good", 1000))
	if err != nil {
		t.Fatal(err)
	}
	file.Close()
	c.Close()
	os.WriteFile(filepath.Join(dir, tmpPrefix+"x.123"), []byte("partial"), 0o600)
	os.WriteFile(filepath.Join(dir, "torn"), []byte("short"), 0o600)
	bad := content("flipped", 1000)
	bad[500] ^= 1
	os.WriteFile(filepath.Join(dir, "flipped"), bad, 0o600)

	c = open(t, dir, 1<<20)
	if _, err := os.Stat(filepath.Join(dir, tmpPrefix+"x.123")); !os.IsNotExist(err) {
		t.Fatalf("temporary file survived Open: %v", err)
	}
	f.n.Store(0)
	file, err = c.Open(context.Background(), "good", 1000, f.fetch("good", 1000))
	if err != nil || !bytes.Equal(readAll(t, file, 1000), content("good", 1000)) || f.n.Load() != 0 {
		t.Fatalf("good file after restart: err %v, fetches %d", err, f.n.Load())
	}
	file, err = c.Open(context.Background(), "torn", 1000, f.fetch("torn", 1000))
	if err != nil || !bytes.Equal(readAll(t, file, 1000), content("torn", 1000)) || f.n.Load() != 1 {
		t.Fatalf("torn file: err %v, fetches %d (want it fetched again)", err, f.n.Load())
	}
	file, err = c.Open(context.Background(), "flipped", 1000, f.fetch("flipped", 1000))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(readAll(t, file, 1000), content("flipped", 1000)) || f.n.Load() != 1 {
		t.Fatal("the flipped file was not served from the cache as it was")
	}
	c.Forget("flipped") // what a reader does when the hash fails
	file, err = c.Open(context.Background(), "flipped", 1000, f.fetch("flipped", 1000))
	if err != nil || !bytes.Equal(readAll(t, file, 1000), content("flipped", 1000)) || f.n.Load() != 2 {
		t.Fatalf("forgotten file: err %v, fetches %d (want it fetched again)", err, f.n.Load())
	}
}

// A failed fetch fails its waiters and leaves nothing; the next open tries again.
func TestFailedFetch(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<20)
	boom := errors.New("boom")
	_, err := c.Open(context.Background(), "f", 1000, func(ctx context.Context, w io.Writer) error {
		w.Write(content("f", 400))
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err %v, want boom", err)
	}
	// A short fetch is an error too.
	_, err = c.Open(context.Background(), "f", 1000, func(ctx context.Context, w io.Writer) error {
		_, err := w.Write(content("f", 400))
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "fetched 400 bytes, want 1000") {
		t.Fatalf("short fetch: %v", err)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() != lockName {
			t.Fatalf("left %s behind", e.Name())
		}
	}
	var f fetcher
	file, err := c.Open(context.Background(), "f", 1000, f.fetch("f", 1000))
	if err != nil || !bytes.Equal(readAll(t, file, 1000), content("f", 1000)) {
		t.Fatalf("retry: %v", err)
	}
	if st := c.Stats(); st.Failed != 2 || st.Fetches != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestOneOwner(t *testing.T) {
	dir := t.TempDir()
	open(t, dir, 1000)
	if _, err := Open(dir, 1000); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second Open of %s: %v", dir, err)
	}
}

func TestStream(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<20)
	want := content("ws", 100000)
	var opens atomic.Int64
	src := func(ctx context.Context) (io.ReadCloser, error) {
		opens.Add(1)
		return io.NopCloser(bytes.NewReader(want)), nil
	}
	// Closed early: nothing kept.
	r, err := c.Stream(context.Background(), "ws", int64(len(want)), src)
	if err != nil {
		t.Fatal(err)
	}
	io.CopyN(io.Discard, r, 100)
	r.Close()
	if st := c.Stats(); st.Files != 0 {
		t.Fatalf("a stream closed early was cached: %+v", st)
	}
	for i := range 2 {
		r, err := c.Stream(context.Background(), "ws", int64(len(want)), src)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("stream %d: %d bytes, %v", i, len(got), err)
		}
	}
	if opens.Load() != 2 {
		t.Fatalf("source opened %d times: the whole stream should have been cached after the first full read", opens.Load())
	}
	if st := c.Stats(); st.Files != 1 || st.Bytes != int64(len(want)) || st.Hits != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// The LRU order survives a restart: a file hit (its mtime renewed) is kept over one that was
// not, when the cache reopens smaller.
func TestOrderSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	c := open(t, dir, 1<<20)
	var f fetcher
	old := time.Now().Add(-time.Hour)
	for i, name := range []string{"a", "b"} {
		file, err := c.Open(context.Background(), name, 1000, f.fetch(name, 1000))
		if err != nil {
			t.Fatal(err)
		}
		file.Close()
		// As if fetched an hour ago, a before b: without a's hit, a would go first.
		os.Chtimes(filepath.Join(dir, name), time.Time{}, old.Add(time.Duration(i)*time.Minute))
	}
	c.Close()
	c = open(t, dir, 1<<20)
	// a is hit now; b is not.
	file, err := c.Open(context.Background(), "a", 1000, f.fetch("a", 1000))
	if err != nil {
		t.Fatal(err)
	}
	file.Close()
	c.Close()
	c = open(t, dir, 1000) // room for one
	if _, err := os.Stat(filepath.Join(dir, "a")); err != nil {
		t.Fatalf("a, the recently used one, was evicted: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "b")); !os.IsNotExist(err) {
		t.Fatalf("b survived: %v", err)
	}
	if st := c.Stats(); st.Files != 1 || st.Evictions != 1 {
		t.Fatalf("stats %+v", st)
	}
}
