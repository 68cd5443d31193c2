//go:build linux

package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/faultline-go/faultline/internal/bench"
)

func runBenchRestore(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("bench restore", "[flags]\n\n"+
		"Bench restore restores a VM (the Firecracker-like VMM emulator, a child process) from a\n"+
		"sample guest memory image that compresses as real guest memory does, and has its vCPU\n"+
		"threads touch a REAP-like working set (about 9% of memory in runs of 2-3 pages scattered\n"+
		"over all of it, some written): trace A once with the working set recorded, then trace B\n"+
		"(about 90% of A) in every measured case: Firecracker's File backend emulated (the raw file\n"+
		"mapped MAP_PRIVATE) with a cold and a warm page cache, and faultline serving the raw file,\n"+
		"the packed snapshot on demand, and the packed snapshot with the recorded working set\n"+
		"prefetched. The page cache is dropped before every cold case (root). Every touched page is\n"+
		"checked against the image. RESTORE is from the handshake (File: from mapping the file) to\n"+
		"the last touch; FAULTS the daemon's, or the VMM's minor+major faults for the File backend;\n"+
		"P50 the daemon's median fault latency (reading the fault to the page installed); READ the\n"+
		"bytes read from storage by the VMM and this process (/proc/PID/io read_bytes), DISK the\n"+
		"device's sectors read (/proc/diskstats, system-wide); CPU the daemon's (from the VMM's\n"+
		"start) and the VMM's CPU time. Under the targets, the floors under the two against the File\n"+
		"backend, measured in the same run. With --rtt, the same snapshot pushed to a versitygw bucket is served through\n"+
		"a TCP proxy adding each RTT: trace B prefetched from the bucket, then by a second VM over the\n"+
		"same disk cache, and all of memory on demand (bytes from the bucket over the restore time).", stderr)
	size := fs.String("size", "512M", "guest memory (K, M, G suffixes)")
	reps := fs.Int("reps", 3, "repetitions of every case, round-robin (the median is reported)")
	threads := fs.Int("threads", 2, "vCPU threads")
	dir := fs.String("dir", "", "directory for the image and the snapshot (default: the temporary directory); its disk is measured")
	noDrop := fs.Bool("no-drop-caches", false, "do not drop the page cache before cold cases (they are then not cold)")
	cacheSize := fs.String("cache-size", "256M", "the daemon's bound of decompressed frames in memory, as serve --cache-size")
	chunkSize := fs.String("chunk-size", "2M", "the packed snapshot's chunk size, as pack --chunk-size")
	frameSize := fs.String("frame-size", "32K", "the packed snapshot's frame size, as pack --frame-size")
	seed := fs.Uint64("seed", 1, "seed of the image and the traces")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of this process (the daemon's side) to `file`, its samples labelled with their case (pprof -tagfocus case=NAME)")
	casesFlag := fs.String("cases", "", "comma-separated cases to run (default: all of "+strings.Join(bench.RestoreCases, ",")+")")
	asJSON := fs.Bool("json", false, "print the whole report as JSON")
	rbf := addRemoteBenchFlags(fs)
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	ro, err := rbf.options(fs, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench restore:", err)
		return 2
	}
	sz, err := parseSize(*size)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench restore:", err)
		return 2
	}
	cache, err := parseSize(*cacheSize)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench restore: --cache-size:", err)
		return 2
	}
	chunk, err := parseSize(*chunkSize)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench restore: --chunk-size:", err)
		return 2
	}
	frame, err := parseSize(*frameSize)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench restore: --frame-size:", err)
		return 2
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(stderr, "faultline bench restore:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(stderr, "faultline bench restore:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	var cases []string
	if *casesFlag != "" {
		for _, c := range strings.Split(*casesFlag, ",") {
			if !slices.Contains(bench.RestoreCases, c) {
				fmt.Fprintf(stderr, "faultline bench restore: --cases: unknown case %q (known: %s)\n", c, strings.Join(bench.RestoreCases, ","))
				return 2
			}
			cases = append(cases, c)
		}
	}
	rep, err := bench.RunRestore(bench.RestoreOptions{Cases: cases, Size: sz, CacheSize: int64(cache), ChunkSize: int64(chunk), FrameSize: int64(frame), Reps: *reps, Threads: *threads, Dir: *dir, Seed: *seed, Remote: ro,
		DropCaches: !*noDrop, Progress: func(f string, a ...any) { fmt.Fprintf(stderr, "  "+f+"\n", a...) }})
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench restore:", err)
		return 1
	}
	if *asJSON {
		b, _ := json.MarshalIndent(rep, "", "  ")
		fmt.Fprintln(stdout, string(b))
		return 0
	}
	printRestore(stdout, rep, *reps)
	return 0
}

func printRestore(w io.Writer, rep *bench.RestoreReport, reps int) {
	mib := func(b int64) string { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/1e6) }
	fmt.Fprintf(w, "guest %d MiB, image %s MiB packed to %s MiB; trace A %d pages, trace B %d pages (%.0f%% in A); working set recorded %d pages (%s MiB packed)\n",
		rep.Size>>20, mib(rep.Image), mib(rep.Packed), rep.TracePages[0], rep.TracePages[1], 100*rep.Overlap, rep.WorkingSet, mib(rep.WSStored))
	fmt.Fprintf(w, "device %s: /sys/block/%s/queue/read_ahead_kb = %d; %d KiB chunks of %d KiB frames, daemon frame cache %d MiB; median of %d reps\n\n",
		rep.Device, rep.Device, rep.ReadAheadKB, rep.ChunkSize>>10, rep.FrameSize>>10, rep.CacheSize>>20, reps)
	const row = "%-24s %10s %9s %7s %6s %7s %10s %11s %9s %9s %9s %9s  %s\n"
	fmt.Fprintf(w, row, "CASE", "RESTORE-ms", "TOUCH-ms", "FAULTS", "MAJOR", "P50-us", "PREFETCHED", "PREFETCH-ms", "READ-MiB", "DISK-MiB", "DAEMON-ms", "VMM-ms", "VERIFIED")
	for _, r := range append([]bench.RestoreResult{rep.Record}, rep.Medians...) {
		major, p50, pre, pret, dcpu := "-", "-", "-", "-", "-"
		if r.Case == bench.CaseFileCold || r.Case == bench.CaseFileWarm {
			major = fmt.Sprint(r.Major)
		} else {
			p50, pre, dcpu = fmt.Sprint(r.FaultP50.Microseconds()), fmt.Sprint(r.Prefetched), ms(r.DaemonCPU)
			if r.Prefetched > 0 {
				pret = ms(r.PrefetchTime)
			}
		}
		fmt.Fprintf(w, row, r.Case, ms(r.Restore), ms(r.Touch), fmt.Sprint(r.Faults), major, p50, pre, pret, mib(r.ProcRead), mib(r.DiskRead),
			dcpu, ms(r.VMMCPU), fmt.Sprintf("%d pages, %d wrong", r.Verified, r.Wrong))
	}
	fmt.Fprintln(w)
	for _, t := range bench.RestoreTargets {
		_, ok1 := rep.Median(t.Num)
		_, ok2 := rep.Median(t.Den)
		if !ok1 || !ok2 {
			continue // a case not run (--cases)
		}
		ratio, met := rep.Ratio(t)
		op := "<="
		if t.AtLeast {
			op = ">="
		}
		verdict := "met"
		if !met {
			verdict = "MISSED"
		}
		fmt.Fprintf(w, "%-45s %6.2fx  (%s / %s; target %s %.1fx: %s)\n", t.Name, ratio, t.Num, t.Den, op, t.Bound, verdict)
	}
	for _, b := range rep.Bounds() {
		fmt.Fprintf(w, "  floor under %q: %.1f ms (the target allows %.1f ms): %s\n", b.Target, float64(b.Floor)/1e6, float64(b.Allowed)/1e6, b.Why)
	}
	printRestoreRemote(w, rep)
}
