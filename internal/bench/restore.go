//go:build linux

package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/snapshot"
)

// The restore benchmark: the VMM emulator (internal/vmm, another process) restores a guest
// memory image that compresses as real guest memory does (snapshot.SampleImage), and its vCPU
// threads touch a working set modelled on REAP (ASPLOS'21): about 9% of guest memory in runs of
// 2–3 contiguous pages scattered over all of it, a quarter of the runs written. Trace A is the
// recording run's; trace B, which every measured case touches, shares about 90% of A's runs
// (inputs change between invocations). Served five ways: Firecracker's File backend (the raw
// file mapped MAP_PRIVATE, no userfaultfd) with a cold and a warm page cache, and the daemon
// from the raw file, from the packed snapshot on demand, and from the packed snapshot with the
// working set recorded on trace A prefetched.

// RestoreOptions configure RunRestore.
type RestoreOptions struct {
	Size    int    // guest memory bytes (a multiple of 4 KiB)
	Reps    int    // repetitions of every case (round-robin; the median is reported)
	Threads int    // vCPU threads (default 2)
	Dir     string // where the image and the snapshot go (default: a temporary directory)
	Seed    uint64
	// DropCaches drops the page cache (sync; echo 3 > /proc/sys/vm/drop_caches) before every
	// cold case: needs root. Without it "cold" cases run on whatever the cache holds.
	DropCaches bool
	// CacheSize bounds the daemon's decompressed frames (0: snapshot.DefaultCacheSize, as serve);
	// ChunkSize and FrameSize are the packed snapshot's (0: pack's defaults).
	CacheSize, ChunkSize, FrameSize int64
	// Cases are the cases to run (default RestoreCases); the recording run always runs.
	Cases []string
	// Remote adds the cases of a snapshot in a bucket behind an added RTT (restore_remote.go).
	Remote   RemoteOptions
	Progress func(format string, args ...any)
}

// RestoreResult is one restore measured.
type RestoreResult struct {
	Case string `json:"case"`
	Rep  int    `json:"rep"`
	// Restore is from the handshake (the File backend: from mapping the file) to the last touch;
	// Touch is the vCPUs' own time over the touches.
	Restore time.Duration `json:"restore_ns"`
	Touch   time.Duration `json:"touch_ns"`
	Pages   int           `json:"pages"`
	// Faults are the daemon's (its VM report), or for the File backend the VMM's minor + major
	// page faults over the touches (getrusage), Major the latter.
	Faults uint64 `json:"faults"`
	Major  uint64 `json:"major_faults,omitempty"`
	// Prefetched pages and the prefetch's time from the handshake (daemon report).
	Prefetched   uint64        `json:"prefetched,omitempty"`
	PrefetchTime time.Duration `json:"prefetch_ns,omitempty"`
	// FaultP50 and FaultP99 estimate the daemon's fault latency, from reading a fault to its
	// page installed (its VM report).
	FaultP50 time.Duration `json:"fault_p50_ns,omitempty"`
	FaultP99 time.Duration `json:"fault_p99_ns,omitempty"`
	// ProcRead is /proc/PID/io read_bytes of the VMM (over the touches) plus this process, the
	// daemon's (from before it opened the snapshot to the last touch; in the hot case from after
	// its first VM); DiskRead the sectors read
	// of the device holding the files (/proc/diskstats, system-wide: other processes' reads
	// count too) over the same span.
	ProcRead int64 `json:"proc_read_bytes"`
	DiskRead int64 `json:"disk_read_bytes"`
	// DiskReads are the device's reads over the same span, and DiskReadTime the time they
	// took, summed (reads at once each count their whole time).
	DiskReads    int64         `json:"disk_reads"`
	DiskReadTime time.Duration `json:"disk_read_ns"`
	// VMMCPU is the VMM's CPU time over the touches; DaemonCPU this process's (the daemon's,
	// harness included) from just before the VMM started (its start and handshake included) to
	// the last touch: a restore's work, not the daemon's start (opening the snapshot once,
	// whatever VMs it then serves).
	VMMCPU    time.Duration `json:"vmm_cpu_ns"`
	DaemonCPU time.Duration `json:"daemon_cpu_ns"`
	Verified  int           `json:"verified_pages"`
	Wrong     int           `json:"wrong_pages"`
}

// RestoreReport is a whole run.
type RestoreReport struct {
	Size        int     `json:"size"`
	CacheSize   int64   `json:"cache_size"`
	ChunkSize   int64   `json:"chunk_size"`
	FrameSize   int64   `json:"frame_size"`
	Device      string  `json:"device"`
	ReadAheadKB int     `json:"read_ahead_kb"`
	TracePages  [2]int  `json:"trace_pages"` // A, B
	Overlap     float64 `json:"overlap"`     // of B's pages, the fraction in A
	// NewRuns are trace B's runs with no page in A: no recording of A can prefetch them, so
	// each is a fault its vCPU waits for. Threads and CPUs are the vCPU threads and this
	// machine's CPUs.
	NewRuns    int             `json:"new_runs"`
	Threads    int             `json:"threads"`
	CPUs       int             `json:"cpus"`
	Record     RestoreResult   `json:"record"` // run 1: trace A with --record
	WorkingSet int             `json:"working_set_pages"`
	WSStored   int64           `json:"working_set_bytes"` // its compressed extent
	Image      int64           `json:"image_bytes"`
	Packed     int64           `json:"packed_bytes"`
	Results    []RestoreResult `json:"results"` // every rep
	Medians    []RestoreResult `json:"medians"` // per case, the rep of median Restore (the lower one of an even count)
	Remote     []RemoteResult  `json:"remote,omitempty"`
}

// Restore cases, in the order they run within a rep.
const (
	CaseFileCold     = "file-backend-cold"
	CaseFileWarm     = "file-backend-warm"
	CaseRawCold      = "faultline-raw-cold"
	CasePackedCold   = "faultline-packed-cold"
	CasePrefetchCold = "faultline-prefetch-cold"
	// CasePrefetchSame touches trace A itself with the working set prefetched: what prefetch
	// gives when the inputs do not change (no target; it shows what trace B's new pages cost).
	CasePrefetchSame = "prefetch-same-trace-cold"
	// CasePrefetchWarm is CasePrefetchCold with the snapshot's files in the page cache: the
	// counterpart of the File backend's warm case (a host that restored the snapshot before).
	CasePrefetchWarm = "faultline-prefetch-warm"
	// CasePrefetchHot is CasePrefetchWarm served by a daemon that restored a VM of the snapshot
	// before (trace A, not measured): a daemon serving a fleet, whose snapshot holds the working
	// set decoded (snapshot.OpenWorkingSet; the case fails if it does not) and whose frame cache
	// holds the frames of that VM's few faults. Trace B's new runs are not in A: their frames
	// are read and decompressed as in the warm case.
	CasePrefetchHot = "faultline-prefetch-hot"
)

// RestoreCases are the cases, in the order they run within a rep.
var RestoreCases = []string{CaseFileCold, CaseFileWarm, CaseRawCold, CasePackedCold, CasePrefetchCold, CasePrefetchWarm, CasePrefetchHot, CasePrefetchSame}

// RestoreTarget is a ratio of the targets: Num's restore time over Den's.
type RestoreTarget struct {
	Name     string
	Num, Den string
	// AtLeast: the ratio must be ≥ Bound, else ≤ Bound.
	Bound   float64
	AtLeast bool
}

// RestoreTargets are the targets the restore benchmark is measured against.
var RestoreTargets = []RestoreTarget{
	{"prefetch vs File backend, cold: faster by", CaseFileCold, CasePrefetchCold, 10, true},
	{"prefetch vs File backend, warm: time ratio", CasePrefetchWarm, CaseFileWarm, 1.5, false},
	{"prefetch vs on-demand packed: faster by", CasePackedCold, CasePrefetchCold, 4, true},
}

// Median returns the median result of case name.
func (r *RestoreReport) Median(name string) (RestoreResult, bool) {
	for _, m := range r.Medians {
		if m.Case == name {
			return m, true
		}
	}
	return RestoreResult{}, false
}

// Ratio is t's ratio in r and whether it meets the bound.
func (r *RestoreReport) Ratio(t RestoreTarget) (ratio float64, met bool) {
	n, ok1 := r.Median(t.Num)
	d, ok2 := r.Median(t.Den)
	if !ok1 || !ok2 || d.Restore <= 0 {
		return 0, false
	}
	ratio = float64(n.Restore) / float64(d.Restore)
	if t.AtLeast {
		return ratio, ratio >= t.Bound
	}
	return ratio, ratio <= t.Bound
}

// RestoreTraces makes the two working sets of a guest of pages 4 KiB pages: A, about 9% of the
// pages in runs of 2–3 at random places in random order, a quarter of the runs written; and B,
// A with every tenth run (chosen at random) replaced by a new one elsewhere.
func RestoreTraces(pages int, seed uint64) (a, b []puppet.TraceRun) {
	r := rand.New(rand.NewPCG(seed, 0x7ace))
	taken := make([]bool, pages)
	fresh := func() puppet.TraceRun {
		for {
			n := 2 + r.IntN(2)
			p := r.IntN(pages - n + 1)
			if !slices.Contains(taken[p:p+n], true) {
				for i := p; i < p+n; i++ {
					taken[i] = true
				}
				return puppet.TraceRun{Page: p, Count: n, Write: r.IntN(4) == 0}
			}
		}
	}
	want := pages * 9 / 100
	for got := 0; got < want; {
		run := fresh()
		a = append(a, run)
		got += run.Count
	}
	b = slices.Clone(a)
	for _, i := range r.Perm(len(b))[:len(b)/10] {
		b[i] = fresh()
	}
	return a, b
}

func tracePages(t []puppet.TraceRun) int {
	n := 0
	for _, r := range t {
		n += r.Count
	}
	return n
}

// RunRestore runs the restore benchmark.
func RunRestore(o RestoreOptions) (*RestoreReport, error) {
	if o.Size <= 0 || o.Size%4096 != 0 {
		return nil, fmt.Errorf("bench restore: size %d: want a positive multiple of 4 KiB", o.Size)
	}
	o.Reps = max(o.Reps, 1)
	o.Threads = max(o.Threads, 2)
	if o.Progress == nil {
		o.Progress = func(string, ...any) {}
	}
	dir, err := os.MkdirTemp(o.Dir, "faultline-restore-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if o.CacheSize <= 0 {
		o.CacheSize = snapshot.DefaultCacheSize
	}
	if o.ChunkSize <= 0 {
		o.ChunkSize = snapshot.DefaultChunkSize
	}
	rb := &restoreBench{o: o, dir: dir, raw: filepath.Join(dir, "mem.raw"), snap: filepath.Join(dir, "snap")}
	rep := &RestoreReport{Size: o.Size, CacheSize: o.CacheSize, ChunkSize: o.ChunkSize}
	rep.Device, rep.ReadAheadKB, err = blockDevice(dir)
	if err != nil {
		return nil, err
	}
	rb.dev = rep.Device
	o.Progress("writing a %d MiB sample image and packing it (device %s, read_ahead_kb %d)", o.Size>>20, rep.Device, rep.ReadAheadKB)
	if err := writeSample(rb.raw, int64(o.Size), o.Seed); err != nil {
		return nil, err
	}
	st, err := snapshot.Pack(context.Background(), rb.raw, rb.snap, snapshot.PackOptions{ChunkSize: o.ChunkSize, FrameSize: o.FrameSize})
	if err != nil {
		return nil, err
	}
	if m, err := snapshot.ReadManifest(rb.snap); err == nil {
		rep.FrameSize = m.FrameSize
	}
	rep.Image, rep.Packed = st.Size, st.Stored
	traceA, traceB := RestoreTraces(o.Size/4096, o.Seed)
	rb.traceA = traceA
	rep.TracePages = [2]int{tracePages(traceA), tracePages(traceB)}
	inA := map[int]bool{}
	for _, r := range traceA {
		for p := r.Page; p < r.Page+r.Count; p++ {
			inA[p] = true
		}
	}
	shared := 0
	for _, r := range traceB {
		for p := r.Page; p < r.Page+r.Count; p++ {
			if inA[p] {
				shared++
			}
		}
	}
	rep.Overlap = float64(shared) / float64(rep.TracePages[1])
	for _, r := range traceB {
		anyInA := false
		for p := r.Page; p < r.Page+r.Count; p++ {
			anyInA = anyInA || inA[p]
		}
		if !anyInA {
			rep.NewRuns++
		}
	}
	rep.Threads, rep.CPUs = o.Threads, runtime.NumCPU()

	o.Progress("run 1: trace A (%d pages) with Record", rep.TracePages[0])
	if rep.Record, err = rb.run("record-trace-A", traceA); err != nil {
		return nil, err
	}
	info, err := waitWorkingSet(rb.snap)
	if err != nil {
		return nil, err
	}
	rep.WorkingSet, rep.WSStored = info.WorkingSetPages, info.WorkingSetStored
	cases := RestoreCases
	if len(o.Cases) > 0 {
		cases = o.Cases
	}
	for i := range o.Reps {
		for _, c := range cases {
			t := traceB
			if c == CasePrefetchSame {
				t = traceA
			}
			res, err := rb.run(c, t)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", c, err)
			}
			res.Rep = i
			o.Progress("rep %d/%d %-24s restore %8.1f ms  faults %6d (p50 %v, p99 %v)  read %7.1f MiB", i+1, o.Reps, c,
				float64(res.Restore)/1e6, res.Faults, res.FaultP50.Round(time.Microsecond), res.FaultP99.Round(time.Microsecond), float64(res.ProcRead)/(1<<20))
			rep.Results = append(rep.Results, res)
		}
	}
	for _, c := range cases {
		var rs []RestoreResult
		for _, r := range rep.Results {
			if r.Case == c {
				rs = append(rs, r)
			}
		}
		slices.SortFunc(rs, func(a, b RestoreResult) int { return int(a.Restore - b.Restore) })
		rep.Medians = append(rep.Medians, rs[(len(rs)-1)/2]) // the lower median of an even count
	}
	if err := rb.runRemote(rep, traceB); err != nil {
		return nil, fmt.Errorf("remote: %w", err)
	}
	return rep, nil
}

type restoreBench struct {
	o                   RestoreOptions
	dir, raw, snap, dev string
	traceA              []puppet.TraceRun // the hot case's first VM touches it
}

// readTree reads every file under dir, so that it is in the page cache.
func readTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		return readAll(p)
	})
}

func writeSample(path string, size int64, seed uint64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	if err := snapshot.SampleImage(w, size, seed); err != nil {
		f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// waitWorkingSet waits for the recording daemon to store the working set (it does at VM end).
func waitWorkingSet(dir string) (*snapshot.Info, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		info, err := snapshot.Inspect(dir)
		if err == nil && info.WorkingSetPages > 0 {
			return info, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no working set recorded in %s (%v)", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run restores one VM for case c touching trace t, and checks every page it touched.
func (rb *restoreBench) run(c string, t []puppet.TraceRun) (RestoreResult, error) {
	return rb.runWith(c, t, nil)
}

// runWith is run with the daemon's configuration changed by mod, if set.
func (rb *restoreBench) runWith(c string, t []puppet.TraceRun, mod func(*daemon.Config)) (RestoreResult, error) {
	res := RestoreResult{Case: c}
	// A CPU profile (bench restore --cpuprofile) tells the cases apart by this label, which
	// the daemon's goroutines started below inherit: pprof -tagfocus case=NAME.
	defer pprof.SetGoroutineLabels(context.Background())
	pprof.SetGoroutineLabels(pprof.WithLabels(context.Background(), pprof.Labels("case", c)))
	switch {
	case c == CaseFileWarm:
		if err := readAll(rb.raw); err != nil {
			return res, err
		}
	case c == CasePrefetchWarm, c == CasePrefetchHot:
		if err := readTree(rb.snap); err != nil {
			return res, err
		}
	case rb.o.DropCaches:
		if err := dropCaches(); err != nil {
			return res, err
		}
		// The VMM is this executable again: its text comes from the cache, not the disk.
		if exe, err := os.Executable(); err == nil {
			if err := readAll(exe); err != nil {
				return res, err
			}
		}
	}
	disk0, err := readDiskStats(rb.dev)
	if err != nil {
		return res, err
	}
	read0, cpu0 := readBytesSelf(), cpuSelf()
	var m *vmm.VMM
	var reports chan daemon.Report
	var d *daemon.Daemon
	var hot *snapshot.Snapshot
	if c == CaseFileCold || c == CaseFileWarm {
		m, err = vmm.StartFile(rb.raw, rb.o.Size, vmm.Options{Trace: t})
	} else {
		cfg := daemon.Config{Socket: filepath.Join(rb.dir, "uffd.sock"),
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), CacheSize: rb.o.CacheSize,
			Engine: engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}}}
		switch c {
		case CaseRawCold:
			cfg.MemFile = rb.raw
		case CasePackedCold:
			cfg.Snapshot, cfg.NoPrefetch = rb.snap, true
		case CasePrefetchHot:
			// Opened here, so that the warm-up is seen to leave the working set held.
			if hot, err = snapshot.OpenWith(rb.snap, snapshot.Options{CacheSize: rb.o.CacheSize}); err != nil {
				return res, err
			}
			defer hot.Close()
			cfg.Source = hot
		case CasePrefetchCold, CasePrefetchSame, CasePrefetchWarm:
			cfg.Snapshot = rb.snap
		default: // the recording run
			cfg.Snapshot, cfg.Record = rb.snap, true
		}
		if mod != nil {
			mod(&cfg)
		}
		reports = make(chan daemon.Report, 1)
		cfg.OnVMEnd = func(r daemon.Report) { reports <- r }
		if d, err = daemon.New(cfg); err != nil {
			return res, err
		}
		// Waited for: the next case's daemon binds the same socket path, and a closing one
		// still removes its socket file (by its inode, checked then removed: not atomic).
		defer func() { d.Close(); <-d.Done() }()
		go d.Serve()
		if c == CasePrefetchHot {
			if err := rb.warmUp(d, reports); err != nil {
				return res, fmt.Errorf("the first VM: %w", err)
			}
			if hot.CacheStats().WorkingSet == 0 {
				return res, fmt.Errorf("the first VM left no working set held in the daemon")
			}
			if disk0, err = readDiskStats(rb.dev); err != nil {
				return res, err
			}
			read0 = readBytesSelf()
		}
		cpu0 = cpuSelf()
		m, err = vmm.Start(vmm.Options{Socket: d.Addr(), Regions: []vmm.Region{{Size: rb.o.Size}}, Trace: t})
	}
	if err != nil {
		return res, err
	}
	tr, err := m.RunTrace(rb.o.Threads)
	if err != nil {
		m.Kill()
		return res, err
	}
	disk1, _ := readDiskStats(rb.dev)
	read1, cpu1 := readBytesSelf(), cpuSelf()
	res.Restore, res.Touch, res.Pages = tr.Restore, tr.Touch, tr.Pages
	res.VMMCPU, res.DaemonCPU = tr.CPU, cpu1-cpu0
	res.ProcRead = tr.ReadBytes + read1 - read0
	res.DiskRead = (disk1.sectors - disk0.sectors) * 512
	res.DiskReads = disk1.reads - disk0.reads
	res.DiskReadTime = time.Duration(disk1.ms-disk0.ms) * time.Millisecond
	if tr.Sigbus > 0 {
		m.Kill()
		return res, fmt.Errorf("%d pages raised SIGBUS", tr.Sigbus)
	}
	res.Verified, res.Wrong, err = m.VerifyTrace(rb.raw)
	if err != nil {
		m.Kill()
		return res, err
	}
	if res.Verified != tracePages(t) {
		m.Kill()
		return res, fmt.Errorf("verified %d pages of a %d-page trace", res.Verified, tracePages(t))
	}
	if err := m.Exit(); err != nil {
		return res, err
	}
	if d == nil {
		res.Faults, res.Major = uint64(tr.MinFaults+tr.MajFaults), uint64(tr.MajFaults)
		return res, nil
	}
	select {
	case r := <-reports:
		if r.Failure != "" {
			return res, fmt.Errorf("daemon: %s", r.Failure)
		}
		res.Faults, res.Prefetched, res.PrefetchTime = r.Faults, r.Prefetched, r.PrefetchTime
		res.FaultP50, res.FaultP99 = r.P50, r.P99
	case <-time.After(time.Minute):
		return res, fmt.Errorf("no VM report from the daemon")
	}
	return res, nil
}

// warmUp has d restore a VM that touches trace A, checks it, and waits for its report.
func (rb *restoreBench) warmUp(d *daemon.Daemon, reports <-chan daemon.Report) error {
	m, err := vmm.Start(vmm.Options{Socket: d.Addr(), Regions: []vmm.Region{{Size: rb.o.Size}}, Trace: rb.traceA})
	if err != nil {
		return err
	}
	if _, err := m.RunTrace(rb.o.Threads); err != nil {
		m.Kill()
		return err
	}
	if _, _, err := m.VerifyTrace(rb.raw); err != nil {
		m.Kill()
		return err
	}
	if err := m.Exit(); err != nil {
		return err
	}
	select {
	case r := <-reports:
		if r.Failure != "" {
			return fmt.Errorf("daemon: %s", r.Failure)
		}
	case <-time.After(time.Minute):
		return fmt.Errorf("no VM report from the daemon")
	}
	return nil
}

func readAll(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(io.Discard, f)
	return err
}

func dropCaches() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		return fmt.Errorf("drop the page cache (needs root): %w", err)
	}
	return nil
}

func cpuSelf() time.Duration {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// readBytesSelf is this process's read_bytes of /proc/self/io (0 if unreadable).
func readBytesSelf() int64 {
	b, _ := os.ReadFile("/proc/self/io")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "read_bytes: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// blockDevice names the block device holding dir (its whole disk, for a partition) and its
// read_ahead_kb.
func blockDevice(dir string) (string, int, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return "", 0, err
	}
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(uint64(st.Dev)), unix.Minor(uint64(st.Dev)))
	real, err := filepath.EvalSymlinks(sys)
	if err != nil {
		return "", 0, fmt.Errorf("the device of %s: %w", dir, err)
	}
	name := filepath.Base(real)
	queue := filepath.Join(real, "queue")
	if _, err := os.Stat(queue); err != nil {
		queue = filepath.Join(filepath.Dir(real), "queue") // a partition: its disk's queue
	}
	b, err := os.ReadFile(filepath.Join(queue, "read_ahead_kb"))
	if err != nil {
		return name, 0, err
	}
	ra, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	return name, ra, err
}

// diskReads is dev's read counters since boot (/proc/diskstats).
type diskReads struct {
	reads, sectors int64 // reads completed; 512-byte sectors read
	ms             int64 // milliseconds spent reading, summed over the reads
}

func readDiskStats(dev string) (diskReads, error) {
	b, err := os.ReadFile("/proc/diskstats")
	if err != nil {
		return diskReads{}, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 6 && f[2] == dev {
			var d diskReads
			var errs [3]error
			d.reads, errs[0] = strconv.ParseInt(f[3], 10, 64)
			d.sectors, errs[1] = strconv.ParseInt(f[5], 10, 64)
			d.ms, errs[2] = strconv.ParseInt(f[6], 10, 64)
			for _, err := range errs {
				if err != nil {
					return diskReads{}, fmt.Errorf("/proc/diskstats %s: %w", dev, err)
				}
			}
			return d, nil
		}
	}
	return diskReads{}, fmt.Errorf("device %s not in /proc/diskstats", dev)
}

// A RestoreBound is a floor under one of the targets' cases, measured in the same run: the
// restore time that case cannot go below for the reason Why.
type RestoreBound struct {
	Target  string        // the RestoreTarget's Name
	Floor   time.Duration // the case's restore cannot be shorter
	Allowed time.Duration // the restore time that meets the target
	Why     string
}

// Bounds are the floors under the two targets against the File backend: where one is above
// what its target allows, the case cannot meet its target on this machine without less work
// (CPU time) or fewer reads from the cold disk.
//
// CPU (both): the prefetch case's CPU time, daemon and VMM, spread over every CPU of the
// machine; a restore cannot take less wall time than that.
//
// Device (cold): trace B's runs with no page in A cannot be known from A's recording, so each
// is a fault its vCPU waits for while its frame is read from the cold disk; split over the vCPU
// threads, at the device's mean read time in the on-demand case (reads of single frames), they
// take at least that long, before the working set's own bytes are read.
func (r *RestoreReport) Bounds() []RestoreBound {
	var out []RestoreBound
	cpuFloor := func(c RestoreResult) (time.Duration, string) {
		cpu := c.DaemonCPU + c.VMMCPU
		return cpu / time.Duration(r.CPUs), fmt.Sprintf("%s took %.1f ms of CPU (daemon %.1f, VMM %.1f) on %d CPUs: %.1f ms at the least",
			c.Case, float64(cpu)/1e6, float64(c.DaemonCPU)/1e6, float64(c.VMMCPU)/1e6, r.CPUs, float64(cpu)/1e6/float64(r.CPUs))
	}
	const copying = "; every page it installs is allocated and copied (UFFDIO_COPY), most decompressed and verified first, where the File backend maps the cached page"
	fileCold, ok1 := r.Median(CaseFileCold)
	cold, ok2 := r.Median(CasePrefetchCold)
	if ok1 && ok2 && r.CPUs > 0 {
		b := RestoreBound{Target: RestoreTargets[0].Name, Allowed: time.Duration(float64(fileCold.Restore) / RestoreTargets[0].Bound)}
		b.Floor, b.Why = cpuFloor(cold)
		b.Why += copying
		if packed, ok := r.Median(CasePackedCold); ok && packed.DiskReads > 0 && r.Threads > 0 {
			perRead := packed.DiskReadTime / time.Duration(packed.DiskReads)
			perVCPU := (r.NewRuns + r.Threads - 1) / r.Threads
			dev := time.Duration(perVCPU) * perRead
			b.Floor = max(b.Floor, dev)
			b.Why += fmt.Sprintf("; and trace B has %d runs with no page in A (%d per vCPU), each a read from the cold disk its vCPU waits for: %v per read (the device's mean in %s), %.1f ms at the least",
				r.NewRuns, perVCPU, perRead.Round(time.Microsecond), CasePackedCold, float64(dev)/1e6)
		}
		out = append(out, b)
	}
	fileWarm, ok1 := r.Median(CaseFileWarm)
	warm, ok2 := r.Median(CasePrefetchWarm)
	if ok1 && ok2 && r.CPUs > 0 {
		b := RestoreBound{Target: RestoreTargets[1].Name, Allowed: time.Duration(float64(fileWarm.Restore) * RestoreTargets[1].Bound)}
		b.Floor, b.Why = cpuFloor(warm)
		b.Why += copying
		out = append(out, b)
	}
	return out
}
