//go:build linux

package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/faultline-go/faultline/internal/bench"
)

func init() {
	register(&Command{
		Name:    "bench",
		Summary: "measure fault serving against a C handler and bulk UFFDIO_COPY, as ratios",
		Run:     runBench,
	})
}

func runBench(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "restore" {
		return runBenchRestore(args[1:], stdout, stderr)
	}
	fs := newFlagSet("bench", "[flags]\n\n"+
		"Bench runs a child process that creates the userfaultfd, registers anonymous memory and\n"+
		"passes the fd over a Unix socket (the Firecracker split); this process serves its faults.\n"+
		"Each case runs with the Go engine and, where comparable, with a minimal C handler (built\n"+
		"with cc) and bulk UFFDIO_COPY, so the ratios of one run are what to compare.\n"+
		"Without --pattern, --threads or --fault-around it runs the standard suite: named cases,\n"+
		"each printed as a ratio of ns/page against its named baseline with the target it has.\n"+
		"CPU/PAGE is the serving process's CPU time (user + system) per page; P50 and P99 are the\n"+
		"engine's latency quantiles, interpolated within power-of-two histogram buckets.\n"+
		"'faultline bench restore' measures restoring a VM instead (faultline bench restore -h).", stderr)
	size := fs.String("size", "256M", "memory touched per case (K, M, G suffixes)")
	pattern := fs.String("pattern", "", "touch order: seq or rand (default: the suite)")
	threads := fs.Int("threads", 0, "touching threads (default: the suite)")
	around := fs.String("fault-around", "", "pages per fault, or 'adaptive' (default: the suite)")
	maxAround := fs.Int("max-around", 512, "adaptive fault-around ceiling in pages (512 x 4 KiB = the engine's 2 MiB window cap, bulk's chunk)")
	src := fs.String("source", "file", "source: file (a snapshot in the page cache) or mem")
	handlers := fs.String("handler", "c,go", "handlers to compare: go, c, bulk")
	workers := fs.Int("workers", 1, "engine workers")
	spin := fs.Int("spin", 0, "engine read spins before parking")
	pollThread := fs.Bool("poll-thread", false, "engine workers block in poll(2) on their own threads")
	pin := fs.Bool("pin", false, "run this process and the faulting child on one CPU (CPU 0 where allowed)")
	reps := fs.Int("reps", 3, "repetitions per case (the median is reported)")
	asJSON := fs.Bool("json", false, "print one JSON object per case")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	sz, err := parseSize(*size)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench:", err)
		return 2
	}
	var cases []bench.Case
	base := bench.Case{Size: sz, Source: *src, Workers: *workers, Spin: *spin, PollThread: *pollThread, MaxAround: *maxAround, Pin: *pin}
	if *pattern == "" && *threads == 0 && *around == "" {
		cases = bench.Suite(base)
	} else {
		c := base
		c.Pattern, c.Threads = *pattern, max(*threads, 1)
		if c.Pattern == "" {
			c.Pattern = "seq"
		}
		switch *around {
		case "adaptive":
			c.FaultAround = 0
		case "":
			c.FaultAround = 1
		default:
			if c.FaultAround, err = strconv.Atoi(*around); err != nil || c.FaultAround < 1 {
				fmt.Fprintf(stderr, "faultline bench: --fault-around %q: want a page count or 'adaptive'\n", *around)
				return 2
			}
		}
		for _, h := range strings.Split(*handlers, ",") {
			hc := c
			hc.Handler = h
			cases = append(cases, hc)
		}
	}
	env, err := bench.NewEnv(sz)
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench:", err)
		return 1
	}
	defer env.Close()
	if !env.HasC() {
		fmt.Fprintln(stderr, "faultline bench: C reference unavailable, its cases are skipped:", env.CrefErr)
		var keep []bench.Case
		for _, c := range cases {
			if c.Handler != "c" {
				keep = append(keep, c)
			}
		}
		cases = keep
	}
	fmt.Fprintf(stderr, "faultline bench: %d cases x %d reps (+1 warm-up), round-robin, %s each\n", len(cases), *reps, *size)
	results, err := bench.RunAll(env, cases, *reps, func(i, rep int, r bench.Result) {
		fmt.Fprintf(stderr, "  rep %d/%d  %-24s %9.0f ns/page %9.0f cpu ns/page\n", rep+1, *reps, r.Label(), r.NsPerPage, r.CPUNsPerPage)
	})
	if err != nil {
		fmt.Fprintln(stderr, "faultline bench:", err)
		return 1
	}
	const row = "%-24s %-13s %-4s %3s %-10s %2s %9s %9s %7s %9s %9s %7s  %s\n"
	if !*asJSON {
		fmt.Fprintf(stdout, row, "CASE", "HANDLER", "PAT", "THR", "AROUND", "WK", "NS/PAGE", "CPU/PAGE", "FAULTS", "P50~", "P99~", "ALLOC/F", "RATIO")
	}
	for _, r := range results {
		c := r.Case
		if *asJSON {
			b, _ := json.Marshal(r)
			fmt.Fprintln(stdout, string(b))
			continue
		}
		vs := ""
		if r.RatioTo != "" {
			vs = fmt.Sprintf("%.2fx %s", r.Ratio, r.RatioTo)
			if c.Target > 0 {
				verdict := "met"
				if !r.Met() {
					verdict = "MISSED"
				}
				vs += fmt.Sprintf(" (target <= %.2fx: %s)", c.Target, verdict)
			}
		}
		aroundS := strconv.Itoa(c.FaultAround)
		if c.FaultAround == 0 {
			aroundS = fmt.Sprintf("adapt<=%d", c.MaxAround)
		}
		p50, p99, allocs, wk := "-", "-", "-", "-"
		if c.Handler == "go" {
			p50 = time.Duration(r.P50Ns).Round(100 * time.Nanosecond).String()
			p99 = time.Duration(r.P99Ns).Round(100 * time.Nanosecond).String()
			allocs = fmt.Sprintf("%.3f", r.AllocsPerFault)
			wk = strconv.Itoa(max(c.Workers, 1))
		}
		faults := "-"
		if r.Faults > 0 {
			faults = strconv.FormatUint(r.Faults, 10)
		}
		h := c.Handler
		if h == "go" && c.Spin < 0 {
			h = "go-nospin"
		}
		if c.Pin {
			h += "/pin"
		}
		fmt.Fprintf(stdout, row, r.Label(), h, c.Pattern, strconv.Itoa(c.Threads), aroundS, wk,
			fmt.Sprintf("%.0f", r.NsPerPage), fmt.Sprintf("%.0f", r.CPUNsPerPage), faults, p50, p99, allocs, vs)
	}
	return 0
}

// parseSize parses "256M", "1G", "4096".
func parseSize(s string) (int, error) {
	mult := 1
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M or G suffix", s)
	}
	n *= mult
	if n%4096 != 0 {
		return 0, fmt.Errorf("size %d is not a multiple of 4 KiB", n)
	}
	return n, nil
}
