//go:build linux

package daemon_test

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/uffd"
)

// rawPeer is a child with a registered area and a uffd that sends whatever bytes and fds a test
// wants, as a broken or hostile VMM would.
func rawPeer(t *testing.T) *puppet.Puppet {
	t.Helper()
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	rep, _, err := p.Do(puppet.Request{Op: "map", Kind: "anon", Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, fds, err := p.Do(puppet.Request{Op: "uffd", Features: uint64(uffd.FeatureEventRemove)}); err != nil {
		t.Fatal(err)
	} else {
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
	if _, _, err := p.Do(puppet.Request{Op: "register", Area: rep.Area, Mode: uint64(uffd.ModeMissing)}); err != nil {
		t.Fatal(err)
	}
	return p
}

// Malformed handshakes get a clear error in the log, lose nothing, and the daemon keeps serving
// a well-behaved VM connected alongside. With the log-only policy the broken VMM lives on.
func TestMalformedHandshakes(t *testing.T) {
	const size = 8 << 20
	f := start(t, snapshot(t, size), func(c *daemon.Config) {
		c.OnFailure = daemon.LogOnly
		c.HandshakeTimeout = 300 * time.Millisecond
		c.MaxRegions = 8
	})
	good, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer good.Kill()
	region := `{"base_host_virt_addr":1073741824,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}`
	many := "[" + strings.Repeat(region+",", 8) + region + "]"
	for _, tc := range []struct {
		name string
		data string
		fds  int
		want string
	}{
		{"no fd", "[" + region + "]", 0, "without a userfaultfd"},
		{"two fds", "[" + region + "]", 2, "2 file descriptors"},
		{"truncated JSON", `[{"base_host_virt_addr":10737`, 1, "handshake incomplete"},
		{"not JSON", `hello`, 1, "does not start with a JSON array"},
		{"zero regions", `[]`, 1, "no regions"},
		{"beyond the file", `[{"base_host_virt_addr":1073741824,"size":16777216,"offset":0,"page_size":4096}]`, 1, "beyond the memory file"},
		{"absurd size", `[{"base_host_virt_addr":1073741824,"size":18446744073709547520,"offset":0,"page_size":4096}]`, 1, "outside any address space"},
		{"bad page size", `[{"base_host_virt_addr":1073741824,"size":4096,"offset":0,"page_size":1000}]`, 1, "not a power of two"},
		{"too many regions", many, 1, "exceed the limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := rawPeer(t)
			if _, _, err := p.Do(puppet.Request{Op: "fc-raw", Str: f.d.Addr(), Data: []byte(tc.data), Ints: []int64{int64(tc.fds)}}); err != nil {
				t.Fatal(err)
			}
			r := f.report()
			if !strings.Contains(r.Failure, tc.want) {
				t.Fatalf("failure %q, want it to mention %q", r.Failure, tc.want)
			}
			// Log-only: the VMM was not killed.
			if _, _, err := p.Do(puppet.Request{Op: "fds"}); err != nil {
				t.Fatalf("the VMM should still be alive: %v", err)
			}
			// The good VM is still served.
			if got, err := good.TouchRange(0, 0, 1<<20, 1, seed, false); err != nil || got.Wrong != 0 {
				t.Fatalf("good VM: %+v %v", got, err)
			}
		})
	}
	if got, err := good.Touch(2, "rand", seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("good VM at the end: %+v %v", got, err)
	}
}

// With the kill policy, a VMM the daemon cannot serve is killed with SIGKILL.
func TestKillPolicy(t *testing.T) {
	f := start(t, snapshot(t, 4<<20), nil) // default policy: kill
	p := rawPeer(t)
	// The kill may come before the child's reply: the error of Do does not matter.
	p.Do(puppet.Request{Op: "fc-raw", Str: f.d.Addr(), Data: []byte(`[]`), Ints: []int64{1}})
	r := f.report()
	if !strings.Contains(r.Failure, "no regions") {
		t.Fatalf("report %+v", r)
	}
	err := p.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("VMM wait: %v, want killed", err)
	}
	if ws := ee.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("VMM ended with %v, want SIGKILL", ws)
	}
}

// The allow-list admits only listed uids; others are refused before anything is read.
func TestAllowUIDs(t *testing.T) {
	f := start(t, snapshot(t, 4<<20), func(c *daemon.Config) { c.AllowUIDs = []uint32{12345} })
	p := rawPeer(t)
	// The daemon may close the connection before the send: its error does not matter.
	p.Do(puppet.Request{Op: "fc-raw", Str: f.d.Addr(), Data: []byte(`[]`), Ints: []int64{1}})
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(f.logs.String(), "uid not allowed") {
		if time.Now().After(deadline) {
			t.Fatalf("no refusal logged:\n%s", f.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if f.d.Live() != 0 {
		t.Fatalf("a refused VMM is being served")
	}
}

// The socket is created 0600 (0660 with a group) and a stale socket file is replaced.
func TestSocketMode(t *testing.T) {
	f := start(t, snapshot(t, 4<<20), nil)
	st, err := os.Stat(f.d.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a 0600 socket", st.Mode())
	}
	g := start(t, snapshot(t, 4<<20), func(c *daemon.Config) { c.SocketGroup = 100 })
	st, err = os.Stat(g.d.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 || st.Sys().(*syscall.Stat_t).Gid != 100 {
		t.Fatalf("socket mode %v gid %d, want 0660 group 100", st.Mode(), st.Sys().(*syscall.Stat_t).Gid)
	}
	// A regular file in the way is not clobbered.
	path := t.TempDir() + "/file.sock"
	os.WriteFile(path, []byte("x"), 0o600)
	if _, err := daemon.New(daemon.Config{Socket: path, MemFile: snapshot(t, 4096)}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("New over a regular file: %v", err)
	}
}
