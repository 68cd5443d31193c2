//go:build linux

package bench

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/vmm"
)

// The restore benchmark end to end at 32 MiB, one rep, the page cache left alone: every case
// restores the VM (the emulated File backend, and the daemon from the raw file, the packed
// snapshot and the recorded working set) and every byte of every page the vCPUs touched is
// compared with the image; the working set recorded on trace A cuts trace B's faults below
// those of the same snapshot served on demand. Correctness only: timings are not asserted.
func TestRestoreBenchTiny(t *testing.T) {
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		kerneltest.Require(t, "no /dev/userfaultfd: "+err.Error())
	}
	rep, err := RunRestore(RestoreOptions{Size: 32 << 20, Reps: 1, Seed: 7, Dir: t.TempDir(), Progress: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Medians) != len(RestoreCases) {
		t.Fatalf("%d cases reported, want %d", len(rep.Medians), len(RestoreCases))
	}
	for _, r := range append(rep.Medians, rep.Record) {
		if r.Wrong != 0 || r.Verified != r.Pages || r.Pages == 0 {
			t.Errorf("%s: %d of %d pages verified, %d wrong", r.Case, r.Verified, r.Pages, r.Wrong)
		}
	}
	if rep.Overlap < 0.8 || rep.Overlap > 0.95 {
		t.Errorf("traces overlap by %.2f, want about 0.9", rep.Overlap)
	}
	if rep.WorkingSet == 0 {
		t.Fatal("no working set recorded")
	}
	_, b := RestoreTraces(32<<20/4096, 7)
	if want := len(b) / 10; rep.NewRuns < want*8/10 || rep.NewRuns > want {
		t.Errorf("%d of trace B's %d runs have no page in A, want about %d (every tenth replaced)", rep.NewRuns, len(b), want)
	}
	packed, _ := rep.Median(CasePackedCold)
	pre, _ := rep.Median(CasePrefetchCold)
	if pre.Prefetched == 0 || pre.Faults >= packed.Faults {
		t.Errorf("with prefetch: %d pages prefetched, %d faults; on demand: %d faults", pre.Prefetched, pre.Faults, packed.Faults)
	}
	file, _ := rep.Median(CaseFileCold)
	if file.Faults == 0 {
		t.Errorf("the File backend reported no page faults")
	}
	t.Logf("faults: file %d, packed %d, prefetch %d (%d prefetched); working set %d pages", file.Faults, packed.Faults, pre.Faults, pre.Prefetched, rep.WorkingSet)
}

// The floors are the arithmetic they claim: a prefetch case's CPU over the machine's CPUs, and
// for the cold one at least new runs per vCPU times the on-demand case's mean device read.
func TestRestoreBounds(t *testing.T) {
	rep := &RestoreReport{NewRuns: 471, Threads: 2, CPUs: 2, Medians: []RestoreResult{
		{Case: CaseFileCold, Restore: 400 * time.Millisecond},
		{Case: CaseFileWarm, Restore: 20 * time.Millisecond},
		{Case: CasePackedCold, DiskReads: 1000, DiskReadTime: 100 * time.Millisecond},
		{Case: CasePrefetchCold, DaemonCPU: 30 * time.Millisecond, VMMCPU: 10 * time.Millisecond},
		{Case: CasePrefetchWarm, DaemonCPU: 90 * time.Millisecond, VMMCPU: 10 * time.Millisecond},
	}}
	bs := rep.Bounds()
	if len(bs) != 2 {
		t.Fatalf("%d bounds, want 2: %+v", len(bs), bs)
	}
	if cold := bs[0]; cold.Target != RestoreTargets[0].Name || cold.Floor != 236*100*time.Microsecond || cold.Allowed != 40*time.Millisecond {
		t.Errorf("cold bound %+v: want max(40ms CPU / 2, 236 runs × 100µs) = 23.6ms, allowed 40ms", cold)
	}
	rep.Medians[3].DaemonCPU = 70 * time.Millisecond
	if cold := rep.Bounds()[0]; cold.Floor != 40*time.Millisecond {
		t.Errorf("cold bound %+v: want max(80ms CPU / 2, 23.6ms) = 40ms", cold)
	}
	if warm := bs[1]; warm.Target != RestoreTargets[1].Name || warm.Floor != 50*time.Millisecond || warm.Allowed != 30*time.Millisecond {
		t.Errorf("warm bound %+v: want 100ms CPU / 2 = 50ms, allowed 30ms", warm)
	}
	rep.Medians = rep.Medians[:2] // neither measured case: no bound
	if bs := rep.Bounds(); len(bs) != 0 {
		t.Errorf("bounds without their cases: %+v", bs)
	}
}

// The check the benchmark relies on can fail: a VMM whose memory is not the reference image is
// caught (here the File backend over one sample image, verified against another).
func TestVerifyTraceCatchesWrongBytes(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	img, other := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	if err := writeSample(img, size, 1); err != nil {
		t.Fatal(err)
	}
	if err := writeSample(other, size, 2); err != nil {
		t.Fatal(err)
	}
	a, _ := RestoreTraces(size/4096, 3)
	m, err := vmm.StartFile(img, size, vmm.Options{Trace: a})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if _, err := m.RunTrace(2); err != nil {
		t.Fatal(err)
	}
	if pages, wrong, err := m.VerifyTrace(img); err != nil || wrong != 0 || pages != tracePages(a) {
		t.Fatalf("against its own image: %d pages, %d wrong, %v", pages, wrong, err)
	}
	pages, wrong, err := m.VerifyTrace(other)
	if err == nil || wrong == 0 {
		t.Fatalf("against another image: %d pages, %d wrong, err %v", pages, wrong, err)
	}
}
