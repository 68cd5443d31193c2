//go:build linux

package cli

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/vmm"
)

func init() {
	register(&Command{
		Name:    "demo",
		Summary: "restore a sample VM memory lazily, end to end, and show what happened",
		Run:     runDemo,
	})
}

const demoSeed = 0xdec0de

func runDemo(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("demo", "[flags]\n\n"+
		"Demo makes a sample memory snapshot, starts the serve daemon on a temporary socket, and\n"+
		"runs a Firecracker-style VMM process against it: the VMM maps guest memory, sends the\n"+
		"UFFD handshake, its vCPU threads touch every page (each checked against the snapshot),\n"+
		"a balloon inflates (MADV_DONTNEED: those pages must read zero), and the VM exits. Then\n"+
		"the snapshot is packed, a VM restored from it with its working set recorded, and one more\n"+
		"with that working set prefetched: the table shows the faults and time of both.", stderr)
	size := fs.String("size", "256M", "guest memory size")
	threads := fs.Int("threads", 4, "vCPU threads touching memory")
	huge := fs.Bool("huge", false, "2 MiB hugetlb guest memory (reserve pages in /proc/sys/vm/nr_hugepages)")
	version := fs.String("version", "v1.12", "Firecracker handshake: v1.1, v1.7 or v1.12")
	balloon := fs.Int("balloon", 25, "percent of guest memory the balloon takes back")
	order := fs.String("order", "parts", "how vCPU threads walk memory: parts (each its own part, in order), seq (interleaved), rand")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	sz, err := parseSize(*size)
	if err != nil || sz < 8<<20 || sz%(4<<20) != 0 {
		fmt.Fprintln(stderr, "faultline demo: --size must be a multiple of 4 MiB, at least 8 MiB")
		return 2
	}
	v, ok := map[string]firecracker.Version{"v1.1": firecracker.V1_1, "v1.7": firecracker.V1_7, "v1.12": firecracker.V1_12}[*version]
	if !ok {
		fmt.Fprintf(stderr, "faultline demo: --version %q: want v1.1, v1.7 or v1.12\n", *version)
		return 2
	}
	if *balloon < 0 || *balloon > 100 {
		fmt.Fprintln(stderr, "faultline demo: --balloon is a percentage")
		return 2
	}
	if *order != "parts" && *order != "seq" && *order != "rand" {
		fmt.Fprintf(stderr, "faultline demo: --order %q: want parts, seq or rand\n", *order)
		return 2
	}
	if err := demo(stdout, sz, *threads, *huge, v, *balloon, *order); err != nil {
		fmt.Fprintln(stderr, "faultline demo:", err)
		return 1
	}
	return 0
}

func demo(out io.Writer, size, threads int, huge bool, version firecracker.Version, balloonPct int, order string) error {
	dir, err := os.MkdirTemp("", "faultline-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	mib := func(n uint64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

	fmt.Fprintf(out, "faultline demo: a microVM's memory restored lazily from a snapshot\n\n")
	start := time.Now()
	mem := filepath.Join(dir, "snapshot.mem")
	if err := writeSnapshot(mem, size); err != nil {
		return err
	}
	fmt.Fprintf(out, "  snapshot  %s, %s of sample guest memory (%v)\n", mem, mib(uint64(size)), time.Since(start).Round(time.Millisecond))

	var logs strings.Builder
	var reports = make(chan daemon.Report, 1)
	d, err := daemon.New(daemon.Config{
		Socket: filepath.Join(dir, "uffd.sock"), MemFile: mem,
		Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
		Engine:  engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 64, Adaptive: true}},
		OnVMEnd: func(r daemon.Report) { reports <- r },
	})
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- d.Serve() }()
	defer func() { d.Close(); <-served }()
	fmt.Fprintf(out, "  daemon    faultline serve on %s (in this process)\n", d.Addr())

	// Firecracker lays regions out top-down: the second region below the first, files back to back.
	r0 := size / 4 * 3
	m, err := vmm.Start(vmm.Options{Socket: d.Addr(), Version: version, Huge: huge,
		Regions: []vmm.Region{{Size: r0, FileOffset: 0}, {Size: size - r0, FileOffset: int64(r0)}}})
	if err != nil {
		return err
	}
	defer m.Kill()
	page := "4 KiB"
	if huge {
		page = "2 MiB hugetlb"
	}
	fmt.Fprintf(out, "  vmm       pid %d: %d regions, %s pages, %v handshake, %d vCPU threads\n\n", m.Pid(), len(m.Regions), page, version, threads)

	type phase struct {
		name    string
		pages   int
		wrong   int
		elapsed time.Duration
	}
	var phases []phase
	run := func(name string, fn func() (vmm.Touched, error)) error {
		fmt.Fprintf(out, "%s\n", name)
		done := make(chan struct{})
		go progress(out, d, done)
		t0 := time.Now()
		got, err := fn()
		close(done)
		if err != nil {
			return err
		}
		el := time.Since(t0)
		clear := ""
		if isTerminal(out) {
			clear = "\r" // overwrite the progress line
		}
		fmt.Fprintf(out, "%s  %d pages checked, %d wrong, %v%s\n", clear, got.Pages, got.Wrong, el.Round(time.Millisecond), strings.Repeat(" ", len(clear)*40))
		phases = append(phases, phase{name, got.Pages, got.Wrong, el})
		if got.Wrong != 0 {
			return fmt.Errorf("%d pages differ from the snapshot", got.Wrong)
		}
		return nil
	}
	walk := map[string]string{"parts": "each vCPU thread walks its own part of memory", "seq": "vCPU threads walk memory interleaved", "rand": "vCPU threads touch memory in random order"}[order]
	if err := run("1. restore: "+walk, func() (vmm.Touched, error) {
		return m.Touch(threads, order, demoSeed, false)
	}); err != nil {
		return err
	}
	bl := r0 / 100 * balloonPct / (4 << 20) * (4 << 20)
	if bl > 0 {
		if err := run(fmt.Sprintf("2. balloon inflates by %s (MADV_DONTNEED): those pages must now read zero", mib(uint64(bl))), func() (vmm.Touched, error) {
			if err := m.Balloon(0, 0, bl); err != nil {
				return vmm.Touched{}, err
			}
			return m.TouchRange(0, 0, bl, threads, demoSeed, true)
		}); err != nil {
			return err
		}
		if err := run("3. the rest of guest memory still holds the snapshot", func() (vmm.Touched, error) {
			return m.TouchRange(0, bl, r0-bl, threads, demoSeed, false)
		}); err != nil {
			return err
		}
	}
	if err := m.Exit(); err != nil {
		return fmt.Errorf("vmm exit: %w", err)
	}
	var r daemon.Report
	select {
	case r = <-reports:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("the daemon did not notice the VM exit; log:\n%s", logs.String())
	}
	fmt.Fprintf(out, "4. the VM exits; the daemon releases it (%s)\n\n", r.Cause)

	fmt.Fprintf(out, "%-62s %8s %6s %10s\n", "PHASE", "PAGES", "WRONG", "TIME")
	for _, p := range phases {
		name := p.name
		if len(name) > 62 {
			name = name[:59] + "..."
		}
		fmt.Fprintf(out, "%-62s %8d %6d %10v\n", name, p.pages, p.wrong, p.elapsed.Round(time.Millisecond))
	}
	fmt.Fprintf(out, "\nserved by faultline:\n")
	rows := [][2]string{
		{"page faults", fmt.Sprint(r.Faults)},
		{"pages installed", fmt.Sprintf("%d (%s copied from the snapshot)", r.Pages, mib(r.Bytes))},
		{"zero pages (after the balloon)", fmt.Sprint(r.ZeroPages)},
		{"time to first fault served", r.FirstFault.Round(time.Microsecond).String()},
		// Estimates, interpolated within the latency histogram's power-of-two buckets.
		{"fault latency p50 / p99 (est.)", fmt.Sprintf("%v / %v", r.P50.Round(100*time.Nanosecond), r.P99.Round(100*time.Nanosecond))},
		{"EAGAIN retries (events pending)", fmt.Sprint(r.Retries)},
	}
	for _, row := range rows {
		fmt.Fprintf(out, "  %-34s %s\n", row[0], row[1])
	}
	if huge {
		return nil // the working set is recorded and prefetched in 4 KiB pages
	}
	return demoPacked(out, dir, mem, size, threads, version)
}

func writeSnapshot(path string, size int) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	buf := make([]byte, 4<<20)
	for off := 0; off < size; off += len(buf) {
		n := min(len(buf), size-off)
		puppet.Fill(buf[:n], demoSeed, off)
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// progress prints the daemon's running totals until done: in place on a terminal, a line a
// second otherwise.
func progress(out io.Writer, d *daemon.Daemon, done <-chan struct{}) {
	tty := isTerminal(out)
	every := time.Second
	if tty {
		every = 200 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			s := d.Summary()
			line := fmt.Sprintf("  ... %d faults served, %.1f MiB installed, %d zero pages", s.Faults, float64(s.Bytes)/(1<<20), s.ZeroPages)
			if tty {
				fmt.Fprint(out, "\r"+line)
			} else {
				fmt.Fprintln(out, line)
			}
		}
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
