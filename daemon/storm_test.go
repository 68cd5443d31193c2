//go:build linux

package daemon_test

import (
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/faultline-go/faultline/internal/vmm"
)

// Repeated balloon inflations at random chunks, each followed by a check of every byte of guest
// memory: inflated chunks read zero, every other chunk the snapshot. 4 KiB and 2 MiB guests.
func TestBalloonStorm(t *testing.T) {
	for _, huge := range []bool{false, true} {
		t.Run(map[bool]string{false: "4k", true: "2M"}[huge], func(t *testing.T) {
			if huge {
				needHugePages(t, 16)
			}
			const size, chunk = 16 << 20, 2 << 20
			f := start(t, snapshot(t, size), nil)
			m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Huge: huge, Regions: []vmm.Region{{Size: size}}})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Kill()
			rng := rand.New(rand.NewPCG(7, uint64(len(t.Name()))))
			zero := make([]bool, size/chunk)
			for round := 0; round < 12; round++ {
				c := rng.IntN(len(zero))
				if err := m.Balloon(0, c*chunk, chunk); err != nil {
					t.Fatal(err)
				}
				zero[c] = true
				for i, z := range zero {
					got, err := m.TouchRange(0, i*chunk, chunk, 4, seed, z)
					if err != nil {
						t.Fatal(err)
					}
					if got.Wrong != 0 {
						t.Fatalf("round %d: chunk %d (ballooned %v): %d wrong pages", round, i, z, got.Wrong)
					}
				}
			}
			m.Exit()
			r := f.report()
			if r.Failure != "" || r.ZeroPages == 0 {
				t.Fatalf("report %+v", r)
			}
		})
	}
}

// A memory file truncated under a running daemon (a corrupt snapshot store): the daemon cannot
// serve the missing part — reading it through the mapping faults — so it kills the VMM instead of
// serving anything wrong or leaving it hung.
func TestTruncatedMemoryFileKillsVM(t *testing.T) {
	const size = 8 << 20
	mem := snapshot(t, size)
	f := start(t, mem, nil) // policy: kill
	m, err := vmm.Start(vmm.Options{Socket: f.d.Addr(), Regions: []vmm.Region{{Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if got, err := m.TouchRange(0, 0, 1<<20, 1, seed, false); err != nil || got.Wrong != 0 {
		t.Fatalf("before: %+v %v", got, err)
	}
	if err := os.Truncate(mem, 2<<20); err != nil {
		t.Fatal(err)
	}
	got, err := m.TouchRange(0, 4<<20, 1<<20, 1, seed, false)
	if err == nil {
		t.Fatalf("the VM read %d pages (%d wrong) of a file that is gone", got.Pages, got.Wrong)
	}
	r := f.report()
	if !strings.Contains(r.Failure, "UFFDIO_COPY") || !strings.Contains(r.Failure, "bad address") {
		t.Fatalf("failure %q, want the copy from the file to fail with EFAULT", r.Failure)
	}
	t.Logf("daemon: %s", r.Failure)
	var ee *exec.ExitError
	if err := m.Wait(); !errors.As(err, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("VMM end: %v, want SIGKILL", err)
	}
}
