//go:build linux

// Package bench measures fault serving end to end, the way production splits it: a child
// process (the puppet, standing in for a VMM) owns the memory, creates the userfaultfd,
// registers the region and passes the fd over a Unix socket; this process serves the faults;
// the child's threads touch the pages and time themselves. The same child, workload and source
// are measured with the Go engine, with a minimal C handler (cref.c, compiled with the
// machine's C compiler), and with bulk UFFDIO_COPY and no faults at all, so the numbers of one
// run compare as ratios. Beside the child's wall time per page, each case reports the CPU time
// the serving process spent per page (user + system), so that a handler that spins shows what
// its speed costs.
package bench

import (
	"bufio"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

//go:embed cref/handler.c
var crefSource []byte

// Case is one measurement.
type Case struct {
	// Name names the case in a suite; Baseline names the case of the same run it is compared
	// with (ns/page over the baseline's), and Target is the ratio it should not exceed (0: none).
	Name     string  `json:"name,omitempty"`
	Baseline string  `json:"baseline,omitempty"`
	Target   float64 `json:"target,omitempty"`

	Handler     string `json:"handler"`      // "go", "c" or "bulk"
	Size        int    `json:"size"`         // bytes of memory touched
	Pattern     string `json:"pattern"`      // "seq" or "rand"
	Threads     int    `json:"threads"`      // touching threads in the child
	FaultAround int    `json:"fault_around"` // pages per fault; 0 = adaptive (Go only)
	MaxAround   int    `json:"max_around"`   // adaptive ceiling
	Source      string `json:"source"`       // "file" or "mem"
	Workers     int    `json:"workers"`      // Go engine workers
	Spin        int    `json:"spin"`         // Go engine SpinReads
	PollThread  bool   `json:"poll_thread"`  // Go engine PollThread
	// Pin runs the serving process and the faulting child on one CPU (CPU 0 where allowed).
	Pin bool `json:"pin,omitempty"`
}

// Result is a Case measured.
type Result struct {
	Case
	NsPerPage float64 `json:"ns_per_page"`
	// CPUNsPerPage is the serving process's CPU time (user + system) over the touch, per page:
	// for the Go engine the whole process's (it runs in this one), for the C handler its own
	// (wait4), for bulk the copying.
	CPUNsPerPage float64 `json:"cpu_ns_per_page"`
	Pages        int     `json:"pages"`
	Faults       uint64  `json:"faults"`
	NsPerFault   float64 `json:"ns_per_fault,omitempty"`
	// P50Ns and P99Ns are the engine's install latency quantiles, estimated by interpolation
	// within its histogram's power-of-two buckets.
	P50Ns          int64   `json:"p50_ns,omitempty"`
	P99Ns          int64   `json:"p99_ns,omitempty"`
	EngineBytes    int64   `json:"engine_bytes,omitempty"`
	AllocsPerFault float64 `json:"allocs_per_fault"`
	Wrong          int     `json:"wrong_pages"`
	// Ratio is NsPerPage over the reference's (RatioTo), measured in the same run.
	Ratio   float64 `json:"ratio,omitempty"`
	RatioTo string  `json:"ratio_to,omitempty"`
}

// Label names a case: its Name, or briefly what it runs, e.g. "c seq x1 k64".
func (c Case) Label() string {
	if c.Name != "" {
		return c.Name
	}
	h := c.Handler
	if c.Handler == "go" && c.Spin < 0 {
		h = "go(nospin)"
	}
	l := fmt.Sprintf("%s %s x%d k%d", h, c.Pattern, c.Threads, c.FaultAround)
	if c.FaultAround == 0 {
		l = fmt.Sprintf("%s %s x%d adaptive", h, c.Pattern, c.Threads)
	}
	if c.Pin {
		l += " pinned"
	}
	return l
}

// Met reports whether a result with a target is within it.
func (r Result) Met() bool { return r.Target == 0 || (r.Ratio > 0 && r.Ratio <= r.Target) }

// Env holds what the cases share: the snapshot file and the compiled C handler.
type Env struct {
	dir      string
	snapshot string
	size     int
	cref     string // path of the compiled C handler, "" if no compiler
	CrefErr  error
	mem      []byte
}

// Seed is the pattern every case serves and verifies.
const Seed = 0x5eed

// NewEnv writes a pattern snapshot of size bytes and compiles the C handler if it can.
func NewEnv(size int) (*Env, error) {
	dir, err := os.MkdirTemp("", "faultline-bench-")
	if err != nil {
		return nil, err
	}
	e := &Env{dir: dir, size: size, snapshot: filepath.Join(dir, "snapshot.mem")}
	e.mem, err = unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		e.Close()
		return nil, fmt.Errorf("bench: source memory: %w", err)
	}
	puppet.Fill(e.mem, Seed, 0)
	if err := writeSynced(e.snapshot, e.mem); err != nil {
		e.Close()
		return nil, fmt.Errorf("bench: snapshot: %w", err)
	}
	e.cref, e.CrefErr = compileCref(dir)
	return e, nil
}

// HasC reports whether the C reference could be built.
func (e *Env) HasC() bool { return e.cref != "" }

// Close removes the environment's files.
func (e *Env) Close() {
	if e.mem != nil {
		unix.Munmap(e.mem)
	}
	os.RemoveAll(e.dir)
}

func compileCref(dir string) (string, error) {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "cc"
	}
	if _, err := exec.LookPath(cc); err != nil {
		return "", fmt.Errorf("no C compiler (%s): %w", cc, err)
	}
	src := filepath.Join(dir, "cref.c")
	if err := os.WriteFile(src, crefSource, 0o600); err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "cref")
	out, err := exec.Command(cc, "-O2", "-o", bin, src).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s cref.c: %v: %s", cc, err, out)
	}
	return bin, nil
}

// target is the child with its registered region and the uffd it sent.
type target struct {
	p    *puppet.Puppet
	area int
	addr uintptr
	size int
	fd   *uffd.FD
}

func newTarget(size int) (*target, error) {
	p, err := puppet.Start()
	if err != nil {
		return nil, err
	}
	t := &target{p: p}
	rep, _, err := p.Do(puppet.Request{Op: "map", Kind: "anon", Size: size})
	if err != nil {
		p.Kill()
		return nil, err
	}
	t.area, t.addr, t.size = rep.Area, uintptr(rep.Addr), rep.Size
	_, fds, err := p.Do(puppet.Request{Op: "uffd"})
	if err != nil || len(fds) != 1 {
		p.Kill()
		return nil, fmt.Errorf("bench: uffd from child: %v", err)
	}
	if t.fd, err = uffd.NewFD(fds[0], false); err != nil {
		p.Kill()
		return nil, err
	}
	if _, _, err := p.Do(puppet.Request{Op: "register", Area: t.area, Mode: uint64(uffd.ModeMissing)}); err != nil {
		t.close()
		return nil, err
	}
	return t, nil
}

func (t *target) close() {
	if t.fd != nil {
		t.fd.Close()
	}
	t.p.Kill()
}

func (t *target) touch(c Case) (puppet.Reply, error) {
	call, err := t.p.Go(puppet.Request{Op: "touch", Area: t.area, Threads: c.Threads, Order: c.Pattern,
		Verify: "pattern-sample", Seed: Seed})
	if err != nil {
		return puppet.Reply{}, err
	}
	rep, _, err := call.Wait(10 * time.Minute)
	return rep, err
}

// Run measures one case.
func (e *Env) Run(c Case) (r Result, err error) {
	if c.Size > e.size {
		return Result{}, fmt.Errorf("bench: case size %d beyond the snapshot's %d", c.Size, e.size)
	}
	c.Threads = max(c.Threads, 1)
	cpu := -1 // the CPU everything is pinned to, if the case pins
	if c.Pin {
		unpin, n, err := pinSelf()
		if err != nil {
			return Result{}, err
		}
		defer func() {
			if uerr := unpin(); uerr != nil && err == nil {
				err = uerr
			}
		}()
		cpu = n
	}
	switch c.Handler {
	case "go":
		return e.runGo(c, cpu)
	case "c":
		return e.runC(c, cpu)
	case "bulk":
		return e.runBulk(c)
	}
	return Result{}, fmt.Errorf("bench: unknown handler %q", c.Handler)
}

// checkPins, for a pinned case (cpu >= 0), makes sure that every thread of the given processes
// ran pinned: one that escaped would make the case measure something else.
func checkPins(cpu int, pids ...int) error {
	if cpu < 0 {
		return nil
	}
	for _, pid := range pids {
		if err := checkPinned(pid, cpu); err != nil {
			return err
		}
	}
	return nil
}

// selfCPU is the CPU time (user + system) this process has used so far, all threads.
func selfCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (e *Env) source(c Case) (source.Source, error) {
	if c.Source == "mem" {
		return source.NewMemory(e.mem[:c.Size]), nil
	}
	return source.OpenFile(e.snapshot)
}

func (e *Env) runGo(c Case, cpu int) (Result, error) {
	t, err := newTarget(c.Size)
	if err != nil {
		return Result{}, err
	}
	defer t.close()
	src, err := e.source(c)
	if err != nil {
		return Result{}, err
	}
	defer src.Close()
	fa := engine.FaultAround{Min: 1, Max: max(c.FaultAround, 1)}
	if c.FaultAround == 0 {
		fa = engine.FaultAround{Min: 1, Max: max(c.MaxAround, 1), Adaptive: true}
	}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	eng, err := engine.New(t.fd, []engine.Region{{Name: "mem", Base: t.addr, Size: uintptr(t.size), PageSize: 4096, Source: src}},
		engine.Options{Workers: c.Workers, FaultAround: fa, SpinReads: c.Spin, PollThread: c.PollThread})
	if err != nil {
		return Result{}, err
	}
	t.fd = nil
	runtime.ReadMemStats(&after)
	engineBytes := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	errc := make(chan error, 1)
	go func() { errc <- eng.Run(context.Background()) }()
	runtime.ReadMemStats(&before)
	cpu0 := selfCPU()
	rep, err := t.touch(c)
	used := selfCPU() - cpu0
	runtime.ReadMemStats(&after)
	if err == nil {
		err = checkPins(cpu, os.Getpid(), t.p.Pid())
	}
	eng.Close()
	if rerr := <-errc; rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		return Result{}, err
	}
	st := eng.Stats()[0]
	r := Result{Case: c, Pages: rep.Pages, NsPerPage: float64(rep.Ns) / float64(rep.Pages),
		CPUNsPerPage: float64(used) / float64(rep.Pages), Faults: st.Faults,
		P50Ns: int64(st.Latency.Quantile(0.5)), P99Ns: int64(st.Latency.Quantile(0.99)),
		EngineBytes: engineBytes, Wrong: rep.Mismatch}
	if st.Faults > 0 {
		r.NsPerFault = float64(rep.Ns) / float64(st.Faults)
		r.AllocsPerFault = float64(after.Mallocs-before.Mallocs) / float64(st.Faults)
	}
	return r, nil
}

func (e *Env) runC(c Case, cpu int) (Result, error) {
	if e.cref == "" {
		return Result{}, fmt.Errorf("bench: C reference unavailable: %v", e.CrefErr)
	}
	if c.FaultAround == 0 {
		return Result{}, errors.New("bench: the C reference has no adaptive fault-around")
	}
	t, err := newTarget(c.Size)
	if err != nil {
		return Result{}, err
	}
	defer t.close()
	// A duplicate for the child: an *os.File of our own fd number would close it when collected.
	dup, err := unix.Dup(t.fd.Fd())
	if err != nil {
		return Result{}, err
	}
	f := os.NewFile(uintptr(dup), "uffd")
	defer f.Close()
	cmd := exec.Command(e.cref, strconv.FormatUint(uint64(t.addr), 10), strconv.Itoa(t.size), strconv.Itoa(c.FaultAround), e.snapshot)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return Result{}, err
	}
	if err := cmd.Start(); err != nil {
		return Result{}, err
	}
	waited := false
	defer func() {
		if !waited {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	// "ready N": N is the CPU time (ns) the handler used setting up, not counted below.
	var setup int64
	line, err := bufio.NewReader(out).ReadString('\n')
	if _, serr := fmt.Sscanf(line, "ready %d\n", &setup); err != nil || serr != nil {
		return Result{}, fmt.Errorf("bench: C handler did not start: %q %v", line, err)
	}
	rep, err := t.touch(c)
	if err == nil {
		err = checkPins(cpu, cmd.Process.Pid, t.p.Pid())
	}
	if err != nil {
		return Result{}, err
	}
	// The handler serves until killed; what it used in all (wait4's rusage) less its setup is
	// what the faults cost it.
	cmd.Process.Kill()
	cmd.Wait()
	waited = true
	used := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime() - time.Duration(setup)
	pages := rep.Pages
	faults := uint64((pages + c.FaultAround - 1) / c.FaultAround)
	if c.Pattern == "rand" {
		faults = 0 // unknown: the C handler does not count
	}
	return Result{Case: c, Pages: pages, NsPerPage: float64(rep.Ns) / float64(pages),
		CPUNsPerPage: float64(used) / float64(pages), Faults: faults, Wrong: rep.Mismatch}, nil
}

// runBulk installs the whole region with UFFDIO_COPY in 2 MiB chunks before any touch: the
// floor for serving the same bytes without faults.
func (e *Env) runBulk(c Case) (Result, error) {
	t, err := newTarget(c.Size)
	if err != nil {
		return Result{}, err
	}
	defer t.close()
	src, err := e.source(c)
	if err != nil {
		return Result{}, err
	}
	defer src.Close()
	res := src.(source.Resident)
	const chunk = 2 << 20
	cpu0 := selfCPU()
	start := time.Now()
	for off := 0; off < c.Size; off += chunk {
		n := min(chunk, c.Size-off)
		b := res.Bytes(int64(off), int64(n))
		if _, err := t.fd.Copy(t.addr+uintptr(off), addrOf(b), uintptr(n), 0); err != nil {
			return Result{}, err
		}
	}
	ns := time.Since(start).Nanoseconds()
	used := selfCPU() - cpu0
	pages := c.Size / 4096
	// Verify what landed (no faults now: every page is present).
	rep, err := t.touch(c)
	if err != nil {
		return Result{}, err
	}
	return Result{Case: c, Pages: pages, NsPerPage: float64(ns) / float64(pages),
		CPUNsPerPage: float64(used) / float64(pages), Wrong: rep.Mismatch}, nil
}

// writeSynced writes the snapshot and waits for it to reach the disk, so that writeback does not
// run during the first cases; the pages stay in the page cache, as a snapshot served often does.
func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
