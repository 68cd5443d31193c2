package remote

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/faultline-go/faultline/chunkcache"
	"github.com/faultline-go/faultline/internal/s3test"
	"github.com/faultline-go/faultline/snapshot"
)

// packed packs a sample image of size bytes (snapshot.SampleImage of seed: images of one seed
// share their first chunks) with a working set of its first pages.
func packed(t testing.TB, size int64, seed uint64) string {
	t.Helper()
	tmp := t.TempDir()
	mem := filepath.Join(tmp, "mem")
	f, err := os.Create(mem)
	if err != nil {
		t.Fatal(err)
	}
	if err := snapshot.SampleImage(f, size, seed); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dir := filepath.Join(tmp, "snap")
	if _, err := snapshot.Pack(context.Background(), mem, dir, snapshot.PackOptions{}); err != nil {
		t.Fatal(err)
	}
	var pages []uint64
	for p := range uint64(size / 4096 / 4) {
		pages = append(pages, p*3%uint64(size/4096))
	}
	if err := snapshot.WriteWorkingSet(dir, pages); err != nil {
		t.Fatal(err)
	}
	return dir
}

// newClient is a client of the snapshot at url on endpoint, with srv's credentials and quick
// retries.
func newClient(t testing.TB, srv *s3test.Server, endpoint, url string) *Client {
	t.Helper()
	loc, err := ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(loc, Config{Endpoint: endpoint, Credentials: credentials.NewStaticV4(srv.Access, srv.Secret, ""),
		Backoff: 5 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, Stall: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		in, bucket, prefix, err string
	}{
		{in: "s3://snaps/tmpl/v1", bucket: "snaps", prefix: "tmpl/v1"},
		{in: "s3://snaps/tmpl/", bucket: "snaps", prefix: "tmpl"},
		{in: "s3://snaps", bucket: "snaps"},
		{in: "s3://snaps/chunks", err: "chunk namespace"},
		{in: "s3://snaps/chunks/x", err: "chunk namespace"},
		{in: "s3://snaps/a/../b", err: "not clean"},
		{in: "s3://Snaps/x", err: "lowercase"},
		{in: "s3://ab/x", err: "3 to 63"},
		{in: "/local/dir", err: "want s3://"},
	} {
		loc, err := ParseURL(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: err %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || loc.Bucket != tc.bucket || loc.Prefix != tc.prefix {
			t.Errorf("%s: %+v, %v", tc.in, loc, err)
		}
	}
	if k := ChunkKey("ab12.zst", 777); k != "chunks/ab12-777.zst" {
		t.Errorf("ChunkKey: %s", k)
	}
}

// Push, then push again (nothing uploaded), then a diff over it (only its new chunk uploaded);
// every object in the bucket is the local file's bytes.
func TestPush(t *testing.T) {
	srv := s3test.Start(t)
	dir := packed(t, 16<<20, 1)
	c := newClient(t, srv, srv.Endpoint, "s3://snaps/tmpl/a")
	var calls int
	var last, total int64
	st, err := Push(context.Background(), dir, c, PushOptions{Progress: func(d, tot int64) { calls++; last, total = d, tot }})
	if err != nil {
		t.Fatal(err)
	}
	m, _ := snapshot.ReadManifest(dir)
	stored := 0
	if m.Dict != nil {
		stored++
	}
	for _, ch := range m.Chunks {
		if ch.Enc != snapshot.EncZero {
			stored++
		}
	}
	if !st.BucketCreated || st.Uploaded != stored+2 || st.Skipped != 0 || calls < 2 || last != total {
		t.Fatalf("first push: %+v (progress %d calls, %d of %d); %d chunk files", st, calls, last, total, stored)
	}
	// What is in the bucket is the snapshot's files.
	objs, err := c.List(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	for i, ch := range m.Chunks {
		if ch.Enc == snapshot.EncZero {
			continue
		}
		key := ChunkKey(m.ChunkFileName(i), ch.Stored)
		if objs[key] != ch.Stored {
			t.Fatalf("%s: %d bytes in the bucket, want %d", key, objs[key], ch.Stored)
		}
	}
	got, err := c.GetBytes(context.Background(), "tmpl/a/manifest.json")
	want, _ := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("manifest in the bucket differs (%v)", err)
	}

	st, err = Push(context.Background(), dir, c, PushOptions{})
	if err != nil || st.Uploaded != 0 || st.UploadedBytes != 0 || st.BucketCreated {
		t.Fatalf("second push: %+v, %v", st, err)
	}

	// A diff over the snapshot that changes one page of chunk 3: only that chunk (rebuilt, a new
	// hash) and the manifest are new; its other chunks and the dictionary are the base's.
	diff := filepath.Join(t.TempDir(), "diff")
	df, err := os.Create(diff)
	if err != nil {
		t.Fatal(err)
	}
	df.Truncate(16 << 20)
	df.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), 6<<20+8192)
	df.Close()
	dir2 := filepath.Join(t.TempDir(), "snap2")
	if _, err := snapshot.Pack(context.Background(), diff, dir2, snapshot.PackOptions{Base: dir}); err != nil {
		t.Fatal(err)
	}
	c2 := newClient(t, srv, srv.Endpoint, "s3://snaps/tmpl/b")
	st, err = Push(context.Background(), dir2, c2, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Uploaded != 2 || st.Skipped != stored-1 {
		t.Fatalf("push of a diff changing one chunk: %+v; want 2 uploaded (the chunk, the manifest), %d already there", st, stored-1)
	}
}

// Files serves every chunk and the extent as their local files' bytes, and a chunk read twice
// is fetched once.
func TestFiles(t *testing.T) {
	srv := s3test.Start(t)
	dir := packed(t, 8<<20, 2)
	c := newClient(t, srv, srv.Endpoint, "s3://snaps/x")
	if _, err := Push(context.Background(), dir, c, PushOptions{}); err != nil {
		t.Fatal(err)
	}
	proxy := s3test.NewProxy(t, srv.Endpoint)
	rc := newClient(t, srv, proxy.URL, "s3://snaps/x")
	cache, err := chunkcache.Open(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	f := NewFiles(rc, cache, FilesOptions{Readahead: -1})
	mb, err := f.Manifest(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m, err := snapshot.DecodeManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		for i, ch := range m.Chunks {
			if ch.Enc == snapshot.EncZero {
				continue
			}
			name := m.ChunkFileName(i)
			file, err := f.Chunk(context.Background(), name, ch.Stored)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, ch.Stored)
			if _, err := file.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			file.Close()
			want, _ := os.ReadFile(filepath.Join(dir, "chunks", name))
			if !bytes.Equal(got, want) {
				t.Fatalf("chunk %s: bytes differ", name)
			}
		}
	}
	for path, n := range proxy.PerPath("GET", "/chunks/") {
		if n != 1 {
			t.Errorf("%s: %d GETs, want 1", path, n)
		}
	}
	for i := range 2 {
		r, err := f.Extent(context.Background(), m.WorkingSet.Extent, m.WorkingSet.ExtentSize)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		want, _ := os.ReadFile(filepath.Join(dir, m.WorkingSet.Extent))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("extent read %d: %d bytes, %v", i, len(got), err)
		}
	}
	if n := proxy.Count("GET", m.WorkingSet.Extent); n != 1 {
		t.Fatalf("extent: %d GETs for two reads, want 1 (the second from the cache)", n)
	}
}

// A missing object is snapshot.ErrMissing, at once (not retried).
func TestMissingObject(t *testing.T) {
	srv := s3test.Start(t)
	c := newClient(t, srv, srv.Endpoint, "s3://snaps/none")
	if _, err := c.EnsureBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	cache, _ := chunkcache.Open(t.TempDir(), 1<<20)
	defer cache.Close()
	f := NewFiles(c, cache, FilesOptions{})
	_, err := f.Chunk(context.Background(), strings.Repeat("ab", 32)+".zst", 1000)
	if !errors.Is(err, snapshot.ErrMissing) || !strings.Contains(err.Error(), "chunks/abab") {
		t.Fatalf("err %v, want ErrMissing naming the object", err)
	}
	_, err = f.Manifest(context.Background())
	if !errors.Is(err, snapshot.ErrMissing) || !strings.Contains(err.Error(), "none/manifest.json") {
		t.Fatalf("manifest: %v", err)
	}
	if st := c.Stats(); st.Retries != 0 {
		t.Fatalf("%d retries of a missing object", st.Retries)
	}
}

// Wrong or missing credentials: Check says so, before any object is read.
func TestWrongCredentials(t *testing.T) {
	srv := s3test.Start(t)
	good := newClient(t, srv, srv.Endpoint, "s3://snaps/x")
	if _, err := good.EnsureBucket(context.Background()); err != nil {
		t.Fatal(err)
	}
	loc, _ := ParseURL("s3://snaps/x")
	bad, err := New(loc, Config{Endpoint: srv.Endpoint, Credentials: credentials.NewStaticV4(srv.Access, "wrong-secret", "")})
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.Check(context.Background())
	if !errors.Is(err, ErrAccess) {
		t.Fatalf("wrong secret: %v, want ErrAccess", err)
	}
	t.Logf("wrong secret: %v", err)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	none, _ := New(loc, Config{Endpoint: srv.Endpoint})
	_, err = none.Check(context.Background())
	if !errors.Is(err, ErrAccess) || !strings.Contains(err.Error(), "AWS_ACCESS_KEY_ID") {
		t.Fatalf("no credentials: %v", err)
	}
	// From the environment, as the AWS tools read them.
	t.Setenv("AWS_ACCESS_KEY_ID", srv.Access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.Secret)
	env, _ := New(loc, Config{Endpoint: srv.Endpoint})
	if ok, err := env.Check(context.Background()); err != nil || !ok {
		t.Fatalf("credentials from the environment: %v, %v", ok, err)
	}
}

// 503 SlowDown is answered by backing off and trying again.
func TestSlowDownBackoff(t *testing.T) {
	srv := s3test.Start(t)
	dir := packed(t, 4<<20, 3)
	c := newClient(t, srv, srv.Endpoint, "s3://snaps/x")
	if _, err := Push(context.Background(), dir, c, PushOptions{}); err != nil {
		t.Fatal(err)
	}
	proxy := s3test.NewProxy(t, srv.Endpoint)
	var mu sync.Mutex
	var times []time.Time
	proxy.Fail(func(r *http.Request) (int, string) {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == "GET" && strings.Contains(r.URL.Path, "manifest.json") && len(times) < 4 {
			times = append(times, time.Now())
			return 503, "SlowDown"
		}
		return 0, ""
	})
	rc := newClient(t, srv, proxy.URL, "s3://snaps/x")
	b, err := rc.GetBytes(context.Background(), "x/manifest.json")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := snapshot.DecodeManifest(b); err != nil {
		t.Fatal(err)
	}
	if proxy.Failed() != 4 || rc.Stats().Retries != 4 {
		t.Fatalf("%d SlowDowns injected, %d retries", proxy.Failed(), rc.Stats().Retries)
	}
	// Each wait at least half the backoff, which doubles (5, 10, 20 ms: at least 2.5, 5, 10).
	for i := 1; i < len(times); i++ {
		if gap, min := times[i].Sub(times[i-1]), (5*time.Millisecond<<(i-1))/2; gap < min {
			t.Errorf("retry %d came %v after the previous, want at least %v", i, gap, min)
		}
	}
	// A server that keeps saying SlowDown: the error says so and is transient.
	proxy.Fail(func(r *http.Request) (int, string) { return 503, "SlowDown" })
	loc, _ := ParseURL("s3://snaps/x")
	few, _ := New(loc, Config{Endpoint: proxy.URL, Credentials: credentials.NewStaticV4(srv.Access, srv.Secret, ""), Attempts: 3, Backoff: time.Millisecond})
	_, err = few.GetBytes(context.Background(), "x/manifest.json")
	if !errors.Is(err, snapshot.ErrTransient) || !strings.Contains(err.Error(), "after 3 attempts") {
		t.Fatalf("persistent SlowDown: %v", err)
	}
}

// The server stopped in the middle of reading: the client retries until it is back, and the
// read completes with the right bytes.
func TestServerRestart(t *testing.T) {
	srv := s3test.Start(t)
	dir := packed(t, 4<<20, 4)
	c := newClient(t, srv, srv.Endpoint, "s3://snaps/x")
	if _, err := Push(context.Background(), dir, c, PushOptions{}); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(dir, "manifest.json"))
	srv.Stop()
	done := make(chan error, 1)
	var got []byte
	go func() {
		var err error
		got, err = c.GetBytes(context.Background(), "x/manifest.json")
		done <- err
	}()
	// Restarted once the client has been refused at least twice.
	for deadline := time.Now().Add(10 * time.Second); c.Stats().Retries < 2; {
		if time.Now().After(deadline) {
			t.Fatal("no retries while the server was down")
		}
		time.Sleep(time.Millisecond)
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("wrong bytes after the restart")
	}
}

// A server that accepts and never answers: each attempt is abandoned after Stall, and the error
// is transient; a cancelled context ends the wait at once.
func TestStall(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	loc, _ := ParseURL("s3://snaps/x")
	c, _ := New(loc, Config{Endpoint: "http://" + ln.Addr().String(), Credentials: credentials.NewStaticV4("a", "b", ""),
		Attempts: 2, Backoff: time.Millisecond, Stall: 200 * time.Millisecond})
	_, err = c.GetBytes(context.Background(), "x/manifest.json")
	if !errors.Is(err, snapshot.ErrTransient) || !strings.Contains(err.Error(), "no response within 200ms") {
		t.Fatalf("%v, want a transient error naming the stall limit", err)
	}
	if st := c.Stats(); st.Gets != 2 || st.Retries != 1 {
		t.Fatalf("%+v: want two attempts, each abandoned at the stall limit (one retry)", st)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c2, _ := New(loc, Config{Endpoint: "http://" + ln.Addr().String(), Credentials: credentials.NewStaticV4("a", "b", "")})
	go func() {
		for c2.Stats().Gets == 0 {
			time.Sleep(time.Millisecond)
		}
		cancel()
	}()
	_, err = c2.GetBytes(ctx, "x/manifest.json")
	if !errors.Is(err, snapshot.ErrTransient) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

// pushed packs and pushes a snapshot, returning its directory and the server.
func pushed(t *testing.T, size int64, seed uint64, url string) (*s3test.Server, string) {
	t.Helper()
	srv := s3test.Start(t)
	dir := packed(t, size, seed)
	if _, err := Push(context.Background(), dir, newClient(t, srv, srv.Endpoint, url), PushOptions{}); err != nil {
		t.Fatal(err)
	}
	return srv, dir
}

// openRemote opens the snapshot at url through endpoint, with a cache in cacheDir.
func openRemote(t *testing.T, srv *s3test.Server, endpoint, url, cacheDir string, limit int64) (*snapshot.Snapshot, *chunkcache.Cache, error) {
	t.Helper()
	s, cache, _, err := openRemoteWith(t, srv, endpoint, url, cacheDir, limit, FilesOptions{})
	return s, cache, err
}

func openRemoteWith(t *testing.T, srv *s3test.Server, endpoint, url, cacheDir string, limit int64, o FilesOptions) (*snapshot.Snapshot, *chunkcache.Cache, *Files, error) {
	t.Helper()
	cache, err := chunkcache.Open(cacheDir, limit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	files := NewFiles(newClient(t, srv, endpoint, url), cache, o)
	t.Cleanup(func() { files.Close() })
	s, err := snapshot.OpenFiles(context.Background(), url, files, snapshot.Options{})
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, cache, files, err
}

func image(t *testing.T, s interface {
	ReadAt([]byte, int64) (int, error)
}, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := s.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// snapshot.OpenFiles over a bucket reads the image right, and its working set.
func TestOpenFiles(t *testing.T) {
	const size = 8 << 20
	srv, dir := pushed(t, size, 5, "s3://snaps/o")
	local, err := snapshot.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	proxy := s3test.NewProxy(t, srv.Endpoint)
	s, _, files, err := openRemoteWith(t, srv, proxy.URL, "s3://snaps/o", t.TempDir(), 1<<30, FilesOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(image(t, s, size), image(t, local, size)) {
		t.Fatal("the remote snapshot's image differs from the local one's")
	}
	// Read in order: the chunks after the first were read ahead, and none fetched twice.
	if st := files.Stats(); st.Readaheads == 0 {
		t.Errorf("no chunk read ahead: %+v", st)
	}
	for path, n := range proxy.PerPath("GET", "/chunks/") {
		if n != 1 {
			t.Errorf("%s: %d GETs", path, n)
		}
	}
	var runs, lruns int
	if err := s.ReadWorkingSet(context.Background(), func(snapshot.Run) error { runs++; return nil }); err != nil {
		t.Fatal(err)
	}
	local.ReadWorkingSet(context.Background(), func(snapshot.Run) error { lruns++; return nil })
	if runs == 0 || runs != lruns {
		t.Fatalf("working set: %d runs remote, %d local", runs, lruns)
	}
}

// A chunk object missing from the bucket: OpenFiles says which, before any read.
func TestOpenFilesMissingChunk(t *testing.T) {
	srv, dir := pushed(t, 4<<20, 6, "s3://snaps/m")
	m, _ := snapshot.ReadManifest(dir)
	key := ChunkKey(m.ChunkFileName(1), m.Chunks[1].Stored)
	if err := newClient(t, srv, srv.Endpoint, "s3://snaps/m").Remove(context.Background(), key); err != nil {
		t.Fatal(err)
	}
	_, _, err := openRemote(t, srv, srv.Endpoint, "s3://snaps/m", t.TempDir(), 1<<30)
	if !errors.Is(err, snapshot.ErrMissing) || !strings.Contains(err.Error(), key) {
		t.Fatalf("err %v, want ErrMissing naming %s", err, key)
	}
}

// A corrupt object in the bucket: the read fails (corrupt, naming the chunk) after fetching it
// once more, and never returns its bytes. A corrupt copy in the cache (a torn write the size
// check cannot see) is dropped and fetched again: the read succeeds.
func TestCorruptObjectAndCache(t *testing.T) {
	const size = 4 << 20
	srv, dir := pushed(t, size, 7, "s3://snaps/c")
	m, _ := snapshot.ReadManifest(dir)
	local, _ := snapshot.Open(dir)
	defer local.Close()
	want := image(t, local, size)

	// The cache first: fill it, then flip a byte of chunk 0's cached file.
	cacheDir := t.TempDir()
	proxy := s3test.NewProxy(t, srv.Endpoint)
	s, cache, err := openRemote(t, srv, proxy.URL, "s3://snaps/c", cacheDir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(image(t, s, size), want) {
		t.Fatal("wrong bytes")
	}
	s.Close()
	cache.Close()
	name0 := sizedName(m.ChunkFileName(0), m.Chunks[0].Stored)
	flip(t, filepath.Join(cacheDir, name0))
	key0 := ChunkKey(m.ChunkFileName(0), m.Chunks[0].Stored)
	before := proxy.Count("GET", key0)
	s, _, err = openRemote(t, srv, proxy.URL, "s3://snaps/c", cacheDir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if got := image(t, s, size); !bytes.Equal(got, want) {
		t.Fatal("wrong bytes after a corrupt cache file")
	}
	if n := proxy.Count("GET", key0) - before; n != 1 {
		t.Fatalf("the corrupt cached chunk was fetched %d times, want 1", n)
	}

	// Now the object itself (versitygw's posix backend keeps it as a file).
	key1 := ChunkKey(m.ChunkFileName(1), m.Chunks[1].Stored)
	flip(t, filepath.Join(srv.Dir, "snaps", key1))
	before = proxy.Count("GET", key1)
	s, _, err = openRemote(t, srv, proxy.URL, "s3://snaps/c", t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, m.ChunkSize)
	n, err := s.ReadAt(b, m.ChunkSize)
	if !errors.Is(err, snapshot.ErrCorrupt) || !strings.Contains(err.Error(), "chunk 1") {
		t.Fatalf("read of the corrupt chunk: %d bytes, %v", n, err)
	}
	if got := proxy.Count("GET", key1) - before; got != 2 {
		t.Fatalf("corrupt object fetched %d times, want 2 (once more after it failed)", got)
	}
	// The other chunk still reads right.
	if _, err := s.ReadAt(b, 0); err != nil || !bytes.Equal(b, want[:m.ChunkSize]) {
		t.Fatalf("chunk 0 after chunk 1 failed: %v", err)
	}
}

// flip changes a byte in the middle of the file at path.
func flip(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A cache smaller than the snapshot: it evicts, stays within its bound, and every byte is right.
func TestSmallCache(t *testing.T) {
	const size = 8 << 20
	srv, dir := pushed(t, size, 8, "s3://snaps/s")
	local, _ := snapshot.Open(dir)
	defer local.Close()
	m := local.Manifest()
	limit := 2 * m.Chunks[0].Stored
	s, cache, err := openRemote(t, srv, srv.Endpoint, "s3://snaps/s", t.TempDir(), limit)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(image(t, s, size), image(t, local, size)) {
		t.Fatal("wrong bytes through a small cache")
	}
	st := cache.Stats()
	if st.Evictions == 0 || st.Bytes > limit {
		t.Fatalf("cache stats %+v, limit %d: want evictions and bytes within the limit", st, limit)
	}
}

// Warming fetches every chunk into the cache in the background from the open; the image is
// then read without another GET.
func TestWarm(t *testing.T) {
	const size = 8 << 20
	srv, dir := pushed(t, size, 9, "s3://snaps/w")
	m, _ := snapshot.ReadManifest(dir)
	files := 0
	for _, c := range m.Chunks {
		if c.Enc != snapshot.EncZero {
			files++
		}
	}
	proxy := s3test.NewProxy(t, srv.Endpoint)
	s, cache, f, err := openRemoteWith(t, srv, proxy.URL, "s3://snaps/w", t.TempDir(), 1<<30, FilesOptions{Warm: true, Readahead: -1})
	if err != nil {
		t.Fatal(err)
	}
	// The dictionary (read at open) and every chunk.
	for deadline := time.Now().Add(20 * time.Second); cache.Stats().Files < files+1; {
		if time.Now().After(deadline) {
			t.Fatalf("not warmed: %+v", cache.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	before := proxy.Count("GET", "/chunks/")
	local, _ := snapshot.Open(dir)
	defer local.Close()
	if !bytes.Equal(image(t, s, size), image(t, local, size)) {
		t.Fatal("wrong bytes")
	}
	if n := proxy.Count("GET", "/chunks/") - before; n != 0 {
		t.Fatalf("%d chunk GETs after warming", n)
	}
	if st := f.Stats(); st.Warmed != int64(files) {
		t.Fatalf("warmed %d chunks of %d", st.Warmed, files)
	}
}

// A push interrupted part-way leaves no manifest in the bucket (nothing there looks like a
// snapshot), and pushing again uploads only what is missing and makes the snapshot whole.
func TestPushInterrupted(t *testing.T) {
	const size = 16 << 20
	srv := s3test.Start(t)
	dir := packed(t, size, 8)
	c := newClient(t, srv, srv.Endpoint, "s3://snaps/int")
	ctx, cancel := context.WithCancel(context.Background())
	_, err := Push(ctx, dir, c, PushOptions{Parallel: 1, Progress: func(done, total int64) {
		if done > total/3 {
			cancel() // a third of the way: the push is killed
		}
	}})
	if err == nil {
		t.Fatal("the interrupted push succeeded")
	}
	if _, err := c.GetBytes(context.Background(), "int/manifest.json"); err == nil {
		t.Fatal("an interrupted push left a manifest in the bucket")
	}
	if _, _, _, err := openRemoteWith(t, srv, srv.Endpoint, "s3://snaps/int", t.TempDir(), 1<<30, FilesOptions{}); err == nil {
		t.Fatal("the half-pushed snapshot opened")
	}
	first, err := Push(context.Background(), dir, c, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if first.Skipped == 0 || first.Uploaded == 0 {
		t.Fatalf("the second push: %+v, want some objects skipped (uploaded before the interruption) and the rest uploaded", first)
	}
	s, _, _, err := openRemoteWith(t, srv, srv.Endpoint, "s3://snaps/int", t.TempDir(), 1<<30, FilesOptions{})
	if err != nil {
		t.Fatal(err)
	}
	local, err := snapshot.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	if !bytes.Equal(image(t, s, size), image(t, local, size)) {
		t.Fatal("the re-pushed snapshot's image differs from the local one's")
	}
}
