//go:build linux

package daemon_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/internal/vmm"
	snap "github.com/faultline-go/faultline/snapshot"
)

// packed packs a pattern memory file of size bytes into a snapshot directory.
func packed(t testing.TB, size int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "snap")
	if _, err := snap.Pack(context.Background(), snapshot(t, size), dir, snap.PackOptions{}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func startPacked(t *testing.T, dir string, mod func(*daemon.Config)) *fixture {
	return start(t, "", func(c *daemon.Config) {
		c.MemFile, c.Snapshot = "", dir
		if mod != nil {
			mod(c)
		}
	})
}

// A packed snapshot serves every handshake generation, two regions laid out as Firecracker
// does: every byte right (the chunks decompressed and verified), then the VM exits.
func TestPackedEveryVersion(t *testing.T) {
	dir := packed(t, 24<<20)
	serveEveryVersion(t, func(t *testing.T) *fixture { return startPacked(t, dir, nil) })
}

// serve --record, then serve with the recorded working set: the second VM's working set is
// prefetched from its handshake on, and the same workload then takes under a tenth of the
// faults, every byte right.
func TestRecordThenPrefetchVM(t *testing.T) {
	const size = 32 << 20
	dir := packed(t, size)
	workload := func(m *vmm.VMM) {
		t.Helper()
		// Two scattered parts of guest memory, each walked by two threads.
		for _, off := range []int{2 << 20, 20 << 20} {
			got, err := m.TouchRange(0, off, 3<<20, 2, seed, false)
			if err != nil || got.Wrong != 0 {
				t.Fatalf("touch at %d: %+v, %v", off, got, err)
			}
		}
	}
	f := startPacked(t, dir, func(c *daemon.Config) { c.Record = true })
	m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	workload(m)
	if err := m.Exit(); err != nil {
		t.Fatal(err)
	}
	r1 := f.report()
	waitUntil(t, "the working set recorded", func() bool { return strings.Contains(f.logs.String(), "working set recorded") })
	info, err := snap.Inspect(dir)
	if err != nil {
		t.Fatal(err)
	}
	if info.WorkingSetPages == 0 || int64(info.WorkingSetPages) > int64(r1.Faults) {
		t.Fatalf("working set of %d pages after a VM with %d faults", info.WorkingSetPages, r1.Faults)
	}

	g := startPacked(t, dir, nil)
	m2, err := vmm.Start(vmm.Options{Socket: g.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the working set prefetched", func() bool { return strings.Contains(g.logs.String(), "working set prefetched") })
	before := g.d.Summary().Faults
	workload(m2)
	faults2 := g.d.Summary().Faults - before
	// And the rest of memory is right too (served on demand).
	if got, err := m2.TouchRange(0, 0, size, 2, seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("whole memory: %+v, %v", got, err)
	}
	if err := m2.Exit(); err != nil {
		t.Fatal(err)
	}
	r2 := g.report()
	t.Logf("recording run: %d faults; working set %d pages; with prefetch: %d pages prefetched in %v, then %d faults for the same workload",
		r1.Faults, info.WorkingSetPages, r2.Prefetched, r2.PrefetchTime, faults2)
	if r2.Prefetched < uint64(info.WorkingSetPages)*9/10 {
		t.Errorf("%d pages prefetched of a %d-page working set", r2.Prefetched, info.WorkingSetPages)
	}
	if faults2 > r1.Faults/10 {
		t.Errorf("%d faults with the working set prefetched, want at most a tenth of the recording run's %d", faults2, r1.Faults)
	}

	// The daemon holds the working set decoded now: a later VM is prefetched from memory, even
	// with the extent gone from the disk.
	man, err := snap.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, man.WorkingSet.Extent)); err != nil {
		t.Fatal(err)
	}
	m3, err := vmm.Start(vmm.Options{Socket: g.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the working set prefetched twice", func() bool { return strings.Count(g.logs.String(), "working set prefetched") == 2 })
	before = g.d.Summary().Faults
	workload(m3)
	faults3 := g.d.Summary().Faults - before
	if err := m3.Exit(); err != nil {
		t.Fatal(err)
	}
	r3 := g.report()
	if r3.Prefetched < uint64(info.WorkingSetPages)*9/10 || faults3 > r1.Faults/10 {
		t.Errorf("a VM after the extent went: %d pages prefetched of %d, %d faults (log: %s)", r3.Prefetched, info.WorkingSetPages, faults3, g.logs.String())
	}
}

// A corrupt chunk: the VM is killed (never served the wrong bytes), and the failure names the
// chunk.
func TestPackedCorruptChunkKillsVM(t *testing.T) {
	const size = 8 << 20
	dir := packed(t, size)
	chunks, _ := filepath.Glob(filepath.Join(dir, "chunks", "*.chunk"))
	if len(chunks) == 0 {
		t.Fatal("no chunk files")
	}
	for _, c := range chunks {
		b, err := os.ReadFile(c)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/2] ^= 0x40
		if err := os.WriteFile(c, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	f := startPacked(t, dir, nil)
	m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err == nil {
		got, terr := m.TouchRange(0, 0, size, 1, seed, false)
		if terr == nil {
			t.Fatalf("the VM read %d pages (%d wrong) of a corrupt snapshot", got.Pages, got.Wrong)
		}
		err = m.Wait()
	}
	r := f.report()
	if !strings.Contains(r.Failure, "chunk") || !strings.Contains(r.Failure, "corrupt") {
		t.Fatalf("failure %q, want it to name the corrupt chunk", r.Failure)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws := ee.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("VMM ended with %v, want SIGKILL", ws)
		}
	}
}
