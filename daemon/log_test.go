//go:build linux

package daemon_test

import (
	"encoding/json"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/uffd"
)

// The engines log through the daemon's logger, as JSON when it is JSON, with the VM's vm and
// pid attributes. The engine line triggered here: a forked child (the VMM's uffd asks for FORK
// events) faults on pages the memory file no longer holds, so the child's engine fails. Fails on
// main before the fix: engines logged to slog.Default in text. Against the kernel.
func TestEngineLogsThroughDaemonLogger(t *testing.T) {
	const size = 1 << 20
	mem := snapshot(t, size)
	logs := &syncbuf.Buffer{}
	f := start(t, mem, func(c *daemon.Config) {
		c.OnFailure = daemon.LogOnly
		c.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs.String())
		}
	})
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	rep, _, err := p.Do(puppet.Request{Op: "map", Kind: "anon", Size: size})
	if err != nil {
		t.Fatal(err)
	}
	area := rep.Area
	if _, fds, err := p.Do(puppet.Request{Op: "uffd", Features: uint64(uffd.FeatureEventRemove | uffd.FeatureEventFork)}); err != nil {
		t.Fatal(err)
	} else {
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
	if _, _, err := p.Do(puppet.Request{Op: "register", Area: area, Mode: uint64(uffd.ModeMissing)}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.Do(puppet.Request{Op: "fc-handshake", Str: f.d.Addr(), Ints: []int64{int64(firecracker.V1_12), int64(area), 0}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the VM to be served", func() bool { return strings.Contains(logs.String(), `"msg":"serving"`) })
	if err := os.Truncate(mem, 0); err != nil {
		t.Fatal(err)
	}
	// The child's fault cannot be served; once its engine gives up and closes its uffd the
	// kernel lets the fault through to an ordinary zero page, and the child exits.
	if _, _, err := p.Do(puppet.Request{Op: "fork", Area: area, Len: 4096}); err != nil {
		t.Fatal(err)
	}
	var vm float64
	waitUntil(t, "an engine's log line", func() bool {
		for _, line := range strings.Split(logs.String(), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil {
				continue
			}
			if msg, _ := rec["msg"].(string); strings.Contains(strings.ToLower(msg), "fork") {
				vm, _ = rec["vm"].(float64)
				if pid, _ := rec["pid"].(float64); int(pid) != p.Pid() || vm == 0 {
					t.Fatalf("engine line without the VM's attributes: %s", line)
				}
				t.Logf("engine line: %s", line)
				return true
			}
		}
		return false
	})
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if !json.Valid([]byte(line)) {
			t.Fatalf("a log line is not JSON: %q", line)
		}
	}
}
