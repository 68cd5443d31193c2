//go:build linux

package daemon_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/faultline-go/faultline/chunkcache"
	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/internal/s3test"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/remote"
	snap "github.com/faultline-go/faultline/snapshot"
)

// Snapshots in a bucket (package remote), served by the daemon through a disk chunk cache. The
// bucket is a real S3-compatible server, versitygw, in its own process (internal/s3test).

// bucketSnapshot is a packed snapshot of size bytes, with a working set of every fourth page of
// its first quarter, pushed to a fresh versitygw as s3://snaps/vm.
type bucketSnapshot struct {
	srv  *s3test.Server
	dir  string
	url  string
	m    *snap.Manifest
	logs *syncbuf.Buffer // what Files logs (objects that failed verification)
}

func pushSnapshot(t *testing.T, size int) *bucketSnapshot {
	t.Helper()
	srv := s3test.Start(t)
	dir := packed(t, size)
	var pages []uint64
	for p := uint64(0); p < uint64(size/4096/4); p += 4 {
		pages = append(pages, p)
	}
	if err := snap.WriteWorkingSet(dir, pages); err != nil {
		t.Fatal(err)
	}
	b := &bucketSnapshot{srv: srv, dir: dir, url: "s3://snaps/vm", logs: &syncbuf.Buffer{}}
	if _, err := remote.Push(context.Background(), dir, b.client(t, srv.Endpoint), remote.PushOptions{}); err != nil {
		t.Fatal(err)
	}
	m, err := snap.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	b.m = m
	return b
}

func (b *bucketSnapshot) client(t *testing.T, endpoint string) *remote.Client {
	t.Helper()
	loc, _ := remote.ParseURL(b.url)
	c, err := remote.New(loc, remote.Config{Endpoint: endpoint, Credentials: credentials.NewStaticV4(b.srv.Access, b.srv.Secret, ""),
		Backoff: 5e6, MaxBackoff: 200e6})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// files is the snapshot's files through endpoint and a new disk cache.
func (b *bucketSnapshot) files(t *testing.T, endpoint string, limit int64) (*remote.Files, *chunkcache.Cache) {
	t.Helper()
	cache, err := chunkcache.Open(t.TempDir(), limit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	files := remote.NewFiles(b.client(t, endpoint), cache, remote.FilesOptions{Log: slog.New(slog.NewTextHandler(b.logs, nil))})
	t.Cleanup(func() { files.Close() })
	return files, cache
}

// chunkKey is chunk i's object key.
func (b *bucketSnapshot) chunkKey(i int) string {
	return remote.ChunkKey(b.m.ChunkFileName(i), b.m.Chunks[i].Stored)
}

// startRemote serves the bucket's snapshot, opened through files as serve does: the daemon is
// given the open snapshot (Config.Source), closed after the daemon.
func startRemote(t *testing.T, b *bucketSnapshot, files *remote.Files, mod func(*daemon.Config)) *fixture {
	t.Helper()
	cfg := daemon.Config{}
	if mod != nil {
		mod(&cfg)
	}
	s, err := snap.OpenFiles(context.Background(), b.url, files, snap.Options{CacheSize: cfg.CacheSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() }) // after the daemon's cleanup (registered later, run first)
	return start(t, "", func(c *daemon.Config) {
		if mod != nil {
			mod(c)
		}
		c.MemFile, c.Snapshot, c.Source = "", "", s
	})
}

// A snapshot pushed to a bucket, served: the working set prefetched from the bucket, every
// byte right; a second VM reads nothing from the bucket (all from the disk cache).
func TestRemoteEveryByte(t *testing.T) {
	const size = 16 << 20
	b := pushSnapshot(t, size)
	proxy := s3test.NewProxy(t, b.srv.Endpoint)
	files, cache := b.files(t, proxy.URL, 1<<30)
	f := startRemote(t, b, files, nil)
	for vmNo := range 2 {
		gets := files.Client().Stats().GetBytes
		m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := m.TouchRange(0, 0, size, 2, seed, false); err != nil || got.Wrong != 0 {
			t.Fatalf("VM %d: %+v, %v", vmNo, got, err)
		}
		if err := m.Exit(); err != nil {
			t.Fatal(err)
		}
		r := f.report()
		if r.Prefetched == 0 {
			t.Errorf("VM %d: nothing prefetched from the working set", vmNo)
		}
		read := files.Client().Stats().GetBytes - gets
		t.Logf("VM %d: %d faults, %d pages prefetched, %d bytes from the bucket", vmNo, r.Faults, r.Prefetched, read)
		if vmNo == 1 && read != 0 {
			t.Errorf("the second VM read %d bytes from the bucket, want 0 (all cached)", read)
		}
	}
	for path, n := range proxy.PerPath("GET", "/chunks/") {
		if n != 1 {
			t.Errorf("%s: %d GETs, want 1", path, n)
		}
	}
	if st := cache.Stats(); st.Fetches == 0 || st.Failed != 0 {
		t.Errorf("cache stats %+v", st)
	}
}

// Two VMs of one snapshot at once: each chunk object is fetched once.
func TestRemoteTwoVMsAtOnce(t *testing.T) {
	const size = 16 << 20
	b := pushSnapshot(t, size)
	proxy := s3test.NewProxy(t, b.srv.Endpoint)
	files, _ := b.files(t, proxy.URL, 1<<30)
	f := startRemote(t, b, files, func(c *daemon.Config) { c.NoPrefetch = true })
	var vms []*vmm.VMM
	for range 2 {
		m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
		if err != nil {
			t.Fatal(err)
		}
		vms = append(vms, m)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for i, m := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := m.TouchRange(0, 0, size, 2, seed, false); err != nil || got.Wrong != 0 {
				errs <- errorf("VM %d: %+v, %v", i, got, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, m := range vms {
		m.Exit()
		f.report()
	}
	chunks := proxy.PerPath("GET", "/chunks/")
	stored := 0
	for i, c := range b.m.Chunks {
		if c.Enc == snap.EncZero {
			continue
		}
		stored++
		if n := chunks["/snaps/"+b.chunkKey(i)]; n != 1 {
			t.Errorf("chunk %d: %d GETs, want 1", i, n)
		}
	}
	t.Logf("%d chunk objects, %d GETs of chunks for two VMs", stored, proxy.Count("GET", "/chunks/"))
}

// The server killed and restarted in the middle of a restore: the restore completes (the
// fetches retried until the server is back), every byte right.
func TestRemoteServerRestart(t *testing.T) {
	const size = 16 << 20
	b := pushSnapshot(t, size)
	files, _ := b.files(t, b.srv.Endpoint, 1<<30)
	f := startRemote(t, b, files, func(c *daemon.Config) { c.NoPrefetch = true })
	m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	// The first page is in (vmm.Start touched it): one chunk fetched. Now the server goes.
	b.srv.Stop()
	done := make(chan error, 1)
	go func() {
		got, err := m.TouchRange(0, 0, size, 2, seed, false)
		if err == nil && got.Wrong != 0 {
			err = errorf("%d wrong pages", got.Wrong)
		}
		done <- err
	}()
	waitUntil(t, "fetches failing and retried", func() bool { return files.Client().Stats().Retries >= 3 })
	if err := b.srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := m.Exit(); err != nil {
		t.Fatal(err)
	}
	r := f.report()
	if r.Failure != "" {
		t.Fatalf("failure %q", r.Failure)
	}
	t.Logf("restore across a server restart: %d faults, %d retries", r.Faults, files.Client().Stats().Retries)
}

// A corrupt object in the bucket: the VM is killed by the failure policy (never served a wrong
// byte), the failure names the chunk, and the log names the object.
func TestRemoteCorruptObjectKillsVM(t *testing.T) {
	const size = 8 << 20
	b := pushSnapshot(t, size)
	for i, c := range b.m.Chunks {
		if c.Enc == snap.EncZero {
			continue
		}
		path := filepath.Join(b.srv.Dir, "snaps", b.chunkKey(i))
		buf, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		buf[len(buf)-100] ^= 0x40 // in the frames, past the header
		if err := os.WriteFile(path, buf, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	files, _ := b.files(t, b.srv.Endpoint, 1<<30)
	f := startRemote(t, b, files, func(c *daemon.Config) { c.NoPrefetch = true })
	m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err == nil {
		got, terr := m.TouchRange(0, 0, size, 1, seed, false)
		if terr == nil {
			t.Fatalf("the VM read %d pages (%d wrong) of a corrupt snapshot", got.Pages, got.Wrong)
		}
		if got.Wrong != 0 {
			t.Fatalf("%d wrong pages served", got.Wrong)
		}
		err = m.Wait()
	}
	r := f.report()
	if !strings.Contains(r.Failure, "chunk") || !strings.Contains(r.Failure, "corrupt") {
		t.Fatalf("failure %q, want it to name the corrupt chunk", r.Failure)
	}
	if !strings.Contains(b.logs.String(), "s3://snaps/chunks/") || !strings.Contains(b.logs.String(), "failed verification") {
		t.Fatalf("the log does not name the object:\n%s", b.logs.String())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws := ee.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("VMM ended with %v, want SIGKILL", ws)
		}
	}
}

// A disk cache smaller than the snapshot: evictions, within the bound, every byte right.
func TestRemoteSmallCache(t *testing.T) {
	const size = 16 << 20
	b := pushSnapshot(t, size)
	limit := 3 * b.m.Chunks[0].Stored
	files, cache := b.files(t, b.srv.Endpoint, limit)
	f := startRemote(t, b, files, func(c *daemon.Config) { c.NoPrefetch = true; c.CacheSize = 1 << 20 })
	m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := m.TouchRange(0, 0, size, 2, seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("%+v, %v", got, err)
	}
	m.Exit()
	f.report()
	if st := cache.Stats(); st.Evictions == 0 || st.Bytes > limit {
		t.Fatalf("cache %+v with limit %d: want evictions, within the limit", st, limit)
	}
}

// A fetch that fails for good is the failure policy's: a chunk object deleted after the open
// (missing), and the server gone for good (transient, after the retries). The VM is killed,
// never served a wrong byte, and the failure names the chunk and why.
func TestRemoteFetchFailsForGood(t *testing.T) {
	const size = 8 << 20
	for _, tc := range []struct {
		name, want string
		spoil      func(b *bucketSnapshot) error
	}{
		{"missing", "missing", func(b *bucketSnapshot) error {
			return b.client(t, b.srv.Endpoint).Remove(context.Background(), b.chunkKey(len(b.m.Chunks)-1))
		}},
		{"server gone", "attempts", func(b *bucketSnapshot) error { b.srv.Stop(); return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := pushSnapshot(t, size)
			files, _ := b.files(t, b.srv.Endpoint, 1<<30)
			f := startRemote(t, b, files, func(c *daemon.Config) { c.NoPrefetch = true })
			if err := tc.spoil(b); err != nil {
				t.Fatal(err)
			}
			m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
			if err == nil {
				got, terr := m.TouchRange(0, 0, size, 1, seed, false)
				if terr == nil {
					t.Fatalf("the VM read all of memory: %+v", got)
				}
				if got.Wrong != 0 {
					t.Fatalf("%d wrong pages served", got.Wrong)
				}
				m.Wait()
			}
			r := f.report()
			if !strings.Contains(r.Failure, "chunk") || !strings.Contains(r.Failure, tc.want) {
				t.Fatalf("failure %q, want it to name the chunk and %q", r.Failure, tc.want)
			}
			t.Logf("failure: %s", r.Failure)
		})
	}
}
