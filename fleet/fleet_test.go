//go:build linux

package fleet_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/fleet"
	"github.com/faultline-go/faultline/fleet/client"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/snapshot"
)

// memFile writes a memory file of size bytes holding the pattern of seed.
func memFile(t testing.TB, size int, seed uint64) string {
	t.Helper()
	b := make([]byte, size)
	puppet.Fill(b, seed, 0)
	p := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// packed packs a memory file of the pattern of seed into a snapshot directory.
func packed(t testing.TB, size int, seed uint64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "snap")
	if _, err := snapshot.Pack(context.Background(), memFile(t, size, seed), dir, snapshot.PackOptions{}); err != nil {
		t.Fatal(err)
	}
	return dir
}

type fixture struct {
	t    *testing.T
	s    *fleet.Server
	c    *client.Client
	ctl  string
	dir  string // for sockets
	logs *syncbuf.Buffer
}

// start runs a fleet server with its control socket in a temporary directory.
func start(t *testing.T, mod func(*fleet.Config)) *fixture {
	t.Helper()
	f := &fixture{t: t, dir: t.TempDir(), logs: &syncbuf.Buffer{}}
	cfg := fleet.Config{Daemon: daemon.Config{
		Logger: slog.New(slog.NewTextHandler(f.logs, nil)),
		Engine: engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}},
	}}
	if mod != nil {
		mod(&cfg)
	}
	s, err := fleet.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f.s, f.ctl = s, filepath.Join(f.dir, "control.sock")
	if err := s.ListenControl(f.ctl); err != nil {
		t.Fatal(err)
	}
	f.c = client.New(f.ctl)
	t.Cleanup(func() {
		s.Close()
		select {
		case <-s.Done():
		case <-time.After(10 * time.Second):
			t.Error("fleet server did not stop")
		}
		if t.Failed() {
			t.Logf("log:\n%s", f.logs.String())
		}
	})
	return f
}

func (f *fixture) sock(name string) string { return filepath.Join(f.dir, name+".sock") }

func (f *fixture) create(id string, spec client.Spec) *client.VM {
	f.t.Helper()
	vm, err := f.c.Create(context.Background(), id, spec)
	if err != nil {
		f.t.Fatalf("create %s: %v", id, err)
	}
	return vm
}

func (f *fixture) get(id string) *client.VM {
	f.t.Helper()
	vm, err := f.c.Get(context.Background(), id)
	if err != nil {
		f.t.Fatalf("get %s: %v", id, err)
	}
	return vm
}

// waitUntil polls real state (counters, logs, files) for up to 10 s.
var waitUntil = kerneltest.WaitUntil

func touchAll(t *testing.T, m *vmm.VMM, size int, seed uint64) {
	t.Helper()
	got, err := m.TouchRange(0, 0, size, 2, seed, false)
	if err != nil || got.Wrong != 0 || got.Pages != size/4096 {
		t.Fatalf("touch: %+v, %v (want %d pages, 0 wrong)", got, err, size/4096)
	}
}

// Two bindings over two different snapshots (a packed one and a raw memory file, each of its
// own pattern) and a third sharing the packed one: a VMM on each gets every byte of its own
// snapshot; the stats count what each served; the packed snapshot is open once for its two
// bindings and closed when the last goes.
func TestTwoSnapshotsEveryByte(t *testing.T) {
	const size = 16 << 20
	dirA, memB := packed(t, size, 0xa1), memFile(t, size, 0xb2)
	f := start(t, nil)
	a := f.create("a", client.Spec{Snapshot: dirA, Socket: f.sock("a")})
	b := f.create("b", client.Spec{MemFile: memB, Socket: f.sock("b")})
	f.create("a2", client.Spec{Snapshot: dirA + "/", Socket: f.sock("a2")}) // the same directory, spelt otherwise
	if a.State != client.StateListening || b.State != client.StateListening || a.Socket != f.sock("a") {
		t.Fatalf("created: %+v %+v", a, b)
	}
	snaps, err := f.c.Snapshots(context.Background())
	if err != nil || len(snaps) != 2 || snaps[0].Ref != memB || snaps[0].Refs != 1 || snaps[0].CacheSize != 0 ||
		snaps[1].Ref != dirA || snaps[1].Refs != 2 || snaps[1].CacheSize != snapshot.DefaultCacheSize {
		t.Fatalf("snapshots open: %+v, %v", snaps, err)
	}

	ma, err := vmm.Start(vmm.Options{Socket: a.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer ma.Kill()
	mb, err := vmm.Start(vmm.Options{Socket: b.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer mb.Kill()
	touchAll(t, ma, size, 0xa1)
	touchAll(t, mb, size, 0xb2)

	for _, id := range []string{"a", "b"} {
		vm := f.get(id)
		st := vm.Stats
		if vm.State != client.StateListening || st.Live != 1 || st.Served != 1 || st.Faults == 0 ||
			st.Pages != size/4096 || st.Bytes != size || st.Prefetched != 0 || st.P99Nanos <= 0 {
			t.Errorf("%s: %+v", id, vm)
		}
	}
	if st := f.get("a2").Stats; st.Served != 0 || st.Faults != 0 {
		t.Errorf("a2 served nothing, but: %+v", st)
	}
	vms, err := f.c.List(context.Background())
	if err != nil || len(vms) != 3 || vms[0].ID != "a" || vms[1].ID != "a2" || vms[2].ID != "b" {
		t.Fatalf("list: %+v, %v", vms, err)
	}

	// The VMs exit: the bindings stay, listening, for the next restore.
	ma.Exit()
	mb.Exit()
	waitUntil(t, "both VMs to end", func() bool { return f.get("a").Stats.Live == 0 && f.get("b").Stats.Live == 0 })
	if vm := f.get("a"); vm.State != client.StateListening || vm.Stats.Served != 1 {
		t.Fatalf("after the VM exited: %+v", vm)
	}
	// Remove both bindings of the packed snapshot: it is closed.
	for _, id := range []string{"a", "a2"} {
		if _, err := f.c.Delete(context.Background(), id, false); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, "the packed snapshot closed", func() bool {
		snaps, _ := f.c.Snapshots(context.Background())
		return len(snaps) == 1 && snaps[0].Ref == memB
	})
}

// DELETE with a VM live: the socket stops accepting and its file is gone when the call
// returns; the VM is still served (draining) until it exits, then the binding is gone (404).
func TestDeleteDrains(t *testing.T) {
	const size = 8 << 20
	f := start(t, nil)
	vm := f.create("d", client.Spec{MemFile: memFile(t, size, 7), Socket: f.sock("d")})
	m, err := vmm.Start(vmm.Options{Socket: vm.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	got, err := f.c.Delete(context.Background(), "d", false)
	if err != nil || got.State != client.StateDraining || got.Stats.Live != 1 {
		t.Fatalf("delete: %+v, %v", got, err)
	}
	if _, err := os.Lstat(vm.Socket); !os.IsNotExist(err) {
		t.Fatalf("socket file after DELETE: %v", err)
	}
	if c, err := net.Dial("unix", vm.Socket); err == nil {
		c.Close()
		t.Fatal("connected to a deleted binding's socket")
	}
	// The id stays taken while draining; the socket path is free for a new binding.
	if _, err := f.c.Create(context.Background(), "d", client.Spec{MemFile: memFile(t, size, 7), Socket: f.sock("d2")}); !client.IsStatus(err, http.StatusConflict) {
		t.Fatalf("re-creating a draining id: %v", err)
	}
	touchAll(t, m, size, 7)
	if err := m.Exit(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the drained binding to go", func() bool {
		_, err := f.c.Get(context.Background(), "d")
		return client.IsStatus(err, http.StatusNotFound)
	})
	f.create("d", client.Spec{MemFile: memFile(t, size, 7), Socket: vm.Socket})
}

// DELETE ?force=true ends the VMs served by the failure policy (SIGKILL).
func TestDeleteForceKills(t *testing.T) {
	const size = 4 << 20
	f := start(t, nil)
	vm := f.create("k", client.Spec{MemFile: memFile(t, size, 3), Socket: f.sock("k")})
	m, err := vmm.Start(vmm.Options{Socket: vm.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if _, err := f.c.Delete(context.Background(), "k", true); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("the VMM of a force-deleted binding: %v, want killed", err)
	}
	waitUntil(t, "the binding to go", func() bool { return len(f.s.List()) == 0 })
}

// Working sets through the fleet: a binding with record, its VM exits, the working set is
// stored; a binding made after the snapshot was closed opens it again and prefetches it, and its
// stats count the pages prefetched.
func TestRecordThenPrefetch(t *testing.T) {
	const size = 16 << 20
	dir := packed(t, size, 0x5e)
	f := start(t, nil)
	rec := f.create("rec", client.Spec{Snapshot: dir, Socket: f.sock("rec"), Record: true})
	m, err := vmm.Start(vmm.Options{Socket: rec.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if got, err := m.TouchRange(0, 2<<20, 4<<20, 2, 0x5e, false); err != nil || got.Wrong != 0 {
		t.Fatalf("touch: %+v %v", got, err)
	}
	m.Exit()
	waitUntil(t, "the working set recorded", func() bool { return strings.Contains(f.logs.String(), "working set recorded") })
	f.c.Delete(context.Background(), "rec", false)
	waitUntil(t, "the snapshot closed", func() bool { s, _ := f.c.Snapshots(context.Background()); return len(s) == 0 })

	vm := f.create("pre", client.Spec{Snapshot: dir, Socket: f.sock("pre")})
	m2, err := vmm.Start(vmm.Options{Socket: vm.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Kill()
	waitUntil(t, "the working set prefetched", func() bool { return f.get("pre").Stats.Prefetched >= 1024 })
	touchAll(t, m2, size, 0x5e)
	if st := f.get("pre").Stats; st.Pages != size/4096 {
		t.Fatalf("stats after the whole memory: %+v", st)
	}

	// The bindings of one snapshot share it, and the working set it holds decoded since the
	// first prefetch: a VM of another binding is prefetched with the extent gone from the disk.
	man, err := snapshot.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, man.WorkingSet.Extent)); err != nil {
		t.Fatal(err)
	}
	vm2 := f.create("pre2", client.Spec{Snapshot: dir, Socket: f.sock("pre2")})
	m3, err := vmm.Start(vmm.Options{Socket: vm2.Socket, Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m3.Kill()
	waitUntil(t, "the working set prefetched from memory", func() bool { return f.get("pre2").Stats.Prefetched >= 1024 })
	touchAll(t, m3, size, 0x5e)
	if strings.Contains(f.logs.String(), "working set unreadable") {
		t.Fatalf("a binding read the working set's extent again: %s", f.logs.String())
	}
}

// Every error of the API, with its status and a message that says what is wrong.
func TestErrors(t *testing.T) {
	const size = 4 << 20
	mem := memFile(t, size, 1)
	f := start(t, func(c *fleet.Config) { c.MaxVMs = 4; c.CacheSize = 32 << 20; c.MinCacheSize = 16 << 20 })
	ctx := context.Background()
	f.create("one", client.Spec{MemFile: mem, Socket: f.sock("one")})

	// Another process's listener on a path: in use.
	other := f.sock("other")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	notSock := filepath.Join(f.dir, "file")
	os.WriteFile(notSock, nil, 0o600)

	raw := func(method, path, body string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://x"+path, strings.NewReader(body))
		resp, err := f.c.HTTP.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: Content-Type %q", method, path, ct)
		}
		return resp.StatusCode, b.String()
	}
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		msg                      string
	}{
		{"bad JSON", "PUT", "/vms/x", `{"mem_file": `, 400, "malformed JSON body"},
		{"unknown field", "PUT", "/vms/x", `{"memfile": "/m", "socket": "/s"}`, 400, `unknown field \"memfile\"`},
		{"two values", "PUT", "/vms/x", `{} {}`, 400, "more than one JSON value"},
		{"no snapshot", "PUT", "/vms/x", `{"socket": "/s"}`, 400, `exactly one of \"snapshot\" and \"mem_file\"`},
		{"both", "PUT", "/vms/x", `{"snapshot": "/a", "mem_file": "/b", "socket": "/s"}`, 400, "exactly one of"},
		{"relative socket", "PUT", "/vms/x", `{"mem_file": "` + mem + `", "socket": "x.sock"}`, 400, `socket \"x.sock\": an absolute path is required`},
		{"relative snapshot", "PUT", "/vms/x", `{"snapshot": "snap", "socket": "/s"}`, 400, "an absolute path is required"},
		{"bad id", "PUT", "/vms/-x", `{"mem_file": "` + mem + `", "socket": "/s"}`, 400, `id \"-x\": want 1 to 64 letters`},
		{"no opener", "PUT", "/vms/x", `{"snapshot": "s3://b/p", "socket": "/s"}`, 400, "no opener for s3://"},
		{"missing snapshot", "PUT", "/vms/x", `{"snapshot": "/nonexistent", "socket": "` + f.sock("x") + `"}`, 400, "no such file"},
		{"not a snapshot", "PUT", "/vms/x", `{"snapshot": "` + f.dir + `", "socket": "` + f.sock("x") + `"}`, 400, "not a snapshot"},
		{"duplicate id", "PUT", "/vms/one", `{"mem_file": "` + mem + `", "socket": "` + f.sock("x") + `"}`, 409, `VM \"one\" exists`},
		{"socket of a binding", "PUT", "/vms/x", `{"mem_file": "` + mem + `", "socket": "` + f.sock("one") + `"}`, 409, `in use by VM \"one\"`},
		{"socket of another process", "PUT", "/vms/x", `{"mem_file": "` + mem + `", "socket": "` + other + `"}`, 409, "another daemon is listening"},
		{"not a socket", "PUT", "/vms/x", `{"mem_file": "` + mem + `", "socket": "` + notSock + `"}`, 409, "is not a socket"},
		{"no directory", "PUT", "/vms/x", `{"mem_file": "` + mem + `", "socket": "/nonexistent/x.sock"}`, 400, "listen"},
		{"unknown id", "GET", "/vms/nope", "", 404, `no VM \"nope\"`},
		{"delete unknown id", "DELETE", "/vms/nope", "", 404, `no VM \"nope\"`},
		{"bad force", "DELETE", "/vms/one?force=maybe", "", 400, "force="},
		{"method", "POST", "/vms/one", "", 405, "allowed: GET, PUT, DELETE"},
		{"endpoint", "GET", "/vm", "", 404, "no endpoint /vm"},
	} {
		status, body := raw(tc.method, tc.path, tc.body)
		if status != tc.status || !strings.Contains(body, tc.msg) || !strings.HasPrefix(body, "{\n  \"error\": ") {
			t.Errorf("%s: %d %s, want %d and %q", tc.name, status, body, tc.status, tc.msg)
		}
	}
	if len(f.s.List()) != 1 {
		t.Fatalf("failed creates left bindings: %+v", f.s.List())
	}
	if s := f.s.Snapshots(); len(s) != 1 {
		t.Fatalf("failed creates left snapshots open: %+v", s)
	}

	// The cache memory bound: 32 MiB shared, 16 MiB at least each: two packed snapshots fit,
	// a third is refused (503), and fits once one is gone.
	p1, p2, p3 := packed(t, size, 11), packed(t, size, 12), packed(t, size, 13)
	f.create("p1", client.Spec{Snapshot: p1, Socket: f.sock("p1")})
	f.create("p2", client.Spec{Snapshot: p2, Socket: f.sock("p2")})
	for _, s := range f.s.Snapshots() {
		if s.Kind == "snapshot" && s.CacheSize != 16<<20 {
			t.Errorf("two snapshots sharing 32 MiB: %+v", s)
		}
	}
	if _, err := f.c.Create(ctx, "p3", client.Spec{Snapshot: p3, Socket: f.sock("p3")}); !client.IsStatus(err, http.StatusServiceUnavailable) ||
		!strings.Contains(err.Error(), "cache memory bound") {
		t.Fatalf("a third snapshot over the cache bound: %v", err)
	}
	// Over --max-vms (4 bindings: one, p1, p2, four).
	f.create("four", client.Spec{MemFile: mem, Socket: f.sock("four")})
	if _, err := f.c.Create(ctx, "five", client.Spec{MemFile: mem, Socket: f.sock("five")}); !client.IsStatus(err, http.StatusTooManyRequests) ||
		!strings.Contains(err.Error(), "most VMs (4") {
		t.Fatalf("over max VMs: %v", err)
	}
	for _, id := range []string{"p2", "four"} {
		if _, err := f.c.Delete(ctx, id, false); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, "p2 and four gone", func() bool { return len(f.s.List()) == 2 })
	f.create("p3", client.Spec{Snapshot: p3, Socket: f.sock("p3")})

	var e *client.Error
	if _, err := f.c.Get(ctx, "nope"); !errors.As(err, &e) || e.Status != 404 || e.Message != `no VM "nope"` {
		t.Fatalf("client error: %#v", err)
	}
}

// The control socket is 0600 like the UFFD sockets (and those are too), a stale one is
// replaced, and one another process listens on is refused.
func TestControlSocket(t *testing.T) {
	f := start(t, nil)
	vm := f.create("m", client.Spec{MemFile: memFile(t, 4<<20, 1), Socket: f.sock("m")})
	for _, p := range []string{f.ctl, vm.Socket} {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v, want a socket of mode 0600", p, fi.Mode(), err)
		}
	}
	g, err := fleet.New(fleet.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.ListenControl(f.ctl); !errors.Is(err, daemon.ErrSocketInUse) {
		t.Fatalf("a second server on a live control socket: %v", err)
	}
	// A stale socket file (nobody listening) is taken over.
	stale := filepath.Join(t.TempDir(), "stale.sock")
	ln, _ := net.Listen("unix", stale)
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if err := g.ListenControl(stale); err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	if vms, err := client.New(stale).List(context.Background()); err != nil || len(vms) != 0 {
		t.Fatalf("list on the new server: %v %v", vms, err)
	}
	g.Drain()
	<-g.Done()
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Fatalf("control socket left after the server is done: %v", err)
	}
}
