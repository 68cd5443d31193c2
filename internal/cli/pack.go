package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/faultline-go/faultline/snapshot"
)

func init() {
	register(&Command{
		Name:    "pack",
		Summary: "pack a raw memory file (or a diff over a base) into a snapshot directory",
		Run:     runPack,
	})
}

func runPack(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("pack", "--mem-file M --out DIR [--base DIR] [--store DIR] [--chunk-size 2M] [--frame-size 32K] [--page-size 4K] [--level N]\n\n"+
		"Pack cuts the memory file into chunks, drops the zero pages, compresses each chunk's frames\n"+
		"with zstd on every core and names the chunk by its SHA-256. With --base, M is a Firecracker diff memory file\n"+
		"(its holes are the base's pages) and unchanged chunks are the base's. DIR holds its chunks\n"+
		"(cp -a DIR copies the snapshot) unless --store names a chunk store shared by snapshots.", stderr)
	mem := fs.String("mem-file", "", "the raw memory file (required)")
	out := fs.String("out", "", "the snapshot directory to write (required)")
	base := fs.String("base", "", "a snapshot the memory file is a diff over")
	store := fs.String("store", "", "a chunk store shared by several snapshots")
	chunk := fs.String("chunk-size", "2M", "image bytes per chunk (K, M suffixes), a multiple of the page size")
	frame := fs.String("frame-size", "32K", "image bytes per frame, the unit of a read (default 32K, or the page size if larger)")
	page := fs.String("page-size", "4K", "the zero map's unit: the guest's page size (2M for a hugetlb guest)")
	level := fs.Int("level", 1, "zstd level: 1 fastest (the default: 2% bigger than 3 and 1.5x faster), 3, 7, 11 smallest")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if *mem == "" || *out == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "faultline pack: --mem-file and --out are required, and nothing else")
		fs.Usage()
		return 2
	}
	o := snapshot.PackOptions{Store: *store, Base: *base, Level: *level}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	// A diff keeps its base's sizes unless told otherwise (and then they must match).
	for _, sf := range []struct {
		name string
		val  string
		to   *int64
	}{{"chunk-size", *chunk, &o.ChunkSize}, {"page-size", *page, &o.PageSize}, {"frame-size", *frame, &o.FrameSize}} {
		if (*base != "" || sf.name == "frame-size") && !set[sf.name] {
			continue // the base's, or the default for the page size
		}
		n, err := parseBytes(sf.val)
		if err != nil {
			fmt.Fprintf(stderr, "faultline pack: --%s: %v\n", sf.name, err)
			return 2
		}
		*sf.to = n
	}
	var bar *progressbar.ProgressBar
	if f, ok := stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		bar = progressbar.NewOptions64(-1, progressbar.OptionSetWriter(stderr),
			progressbar.OptionShowBytes(true), progressbar.OptionSetDescription("packing"),
			progressbar.OptionClearOnFinish(), progressbar.OptionThrottle(100e6))
		o.Progress = func(done, total int64) {
			bar.ChangeMax64(total)
			bar.Set64(done)
		}
	}
	st, err := snapshot.Pack(context.Background(), *mem, *out, o)
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		fmt.Fprintln(stderr, "faultline pack:", err)
		return 1
	}
	secs := st.Elapsed.Seconds()
	fmt.Fprintf(stdout, "packed %s into %s: %d chunks (%d zero, %d reused), %.1f%% zero pages\n",
		snapshot.FormatBytes(st.Size), *out, st.Chunks, st.ZeroChunks, st.Reused, pct(st.ZeroPages, st.Pages))
	fmt.Fprintf(stdout, "%s stored, ratio %.2f; %.2fs, %.0f MB/s of raw image\n",
		snapshot.FormatBytes(st.Stored), st.Ratio(), secs, float64(st.Size)/1e6/max(secs, 1e-9))
	return 0
}

func pct(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

// parseBytes parses "4096", "512K", "2M", "1G" (powers of 1024; "KiB", "MB" spellings too).
func parseBytes(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	return v * mult, nil
}
