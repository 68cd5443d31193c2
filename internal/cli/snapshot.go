package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/faultline-go/faultline/snapshot"
)

func init() {
	register(&Command{
		Name:    "snapshot",
		Summary: "inspect, verify or unpack a snapshot directory made by pack",
		Run:     runSnapshot,
	})
}

const snapshotSynopsis = "inspect|verify|unpack DIR [--out M]\n\n" +
	"  inspect DIR           sizes, compression ratio, zero pages, chunks shared, working set\n" +
	"  verify DIR            read every chunk and working-set frame and check its SHA-256\n" +
	"  unpack DIR --out M    write the raw memory file back (zero pages as holes)"

func runSnapshot(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" {
		w := stderr
		if len(args) > 0 {
			w = stdout
		}
		fmt.Fprintln(w, "Usage: faultline snapshot "+snapshotSynopsis)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	sub, args := args[0], args[1:]
	fs := newFlagSet("snapshot "+sub, "DIR", stderr)
	var out *string
	switch sub {
	case "inspect", "verify":
	case "unpack":
		fs = newFlagSet("snapshot unpack", "DIR --out M", stderr)
		out = fs.String("out", "", "the raw memory file to write (required)")
	default:
		fmt.Fprintf(stderr, "faultline snapshot: unknown subcommand %q\n", sub)
		fmt.Fprintln(stderr, "Usage: faultline snapshot "+snapshotSynopsis)
		return 2
	}
	pos, code, ok := parseInterspersed(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 || out != nil && *out == "" {
		fmt.Fprintf(stderr, "faultline snapshot %s: want one snapshot directory%s\n", sub, map[bool]string{true: " and --out"}[out != nil])
		fs.Usage()
		return 2
	}
	dir := pos[0]
	switch sub {
	case "inspect":
		return snapshotInspect(dir, stdout, stderr)
	case "verify":
		return snapshotVerify(dir, stdout, stderr)
	default:
		if err := snapshot.Unpack(context.Background(), dir, *out); err != nil {
			fmt.Fprintln(stderr, "faultline snapshot unpack:", err)
			return 1
		}
		fmt.Fprintf(stdout, "unpacked %s to %s\n", dir, *out)
		return 0
	}
}

// parseInterspersed parses flags placed before or after the positional arguments, which it
// returns.
func parseInterspersed(fs *flag.FlagSet, args []string) (pos []string, code int, ok bool) {
	for {
		if code, ok := parseFlags(fs, args); !ok {
			return nil, code, false
		}
		if fs.NArg() == 0 {
			return pos, 0, true
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func snapshotInspect(dir string, stdout, stderr io.Writer) int {
	in, err := snapshot.Inspect(dir)
	if err != nil {
		fmt.Fprintln(stderr, "faultline snapshot inspect:", err)
		return 1
	}
	tw := tabwriter.NewWriter(stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "snapshot\t%s\n", dir)
	fmt.Fprintf(tw, "image\t%s (%d bytes), pages of %s, chunks of %s in frames of %s\n",
		snapshot.FormatBytes(in.Size), in.Size, snapshot.FormatBytes(in.PageSize), snapshot.FormatBytes(in.ChunkSize), snapshot.FormatBytes(in.FrameSize))
	if in.DictSize > 0 {
		fmt.Fprintf(tw, "dictionary	%s (zstd, sampled from the image)\n", snapshot.FormatBytes(in.DictSize))
	}
	fmt.Fprintf(tw, "stored\t%s in %d chunk files, ratio %.2f\n", snapshot.FormatBytes(in.Stored), in.Files, in.Ratio())
	fmt.Fprintf(tw, "zero\t%.1f%% of pages (%d of %d); %d of %d chunks all zero\n",
		pct(in.ZeroPages, in.Pages), in.ZeroPages, in.Pages, in.ZeroChunks, in.Chunks)
	if in.Store == "" {
		fmt.Fprintf(tw, "chunks\tin %s/%s\n", dir, snapshot.ChunksDir)
	} else {
		fmt.Fprintf(tw, "store\t%s: %d of %d chunk files shared with %d other %s\n",
			in.Store, in.SharedInStore, in.Files, in.StoreSnapshots, map[bool]string{true: "snapshot", false: "snapshots"}[in.StoreSnapshots == 1])
	}
	if in.Base != "" {
		if in.SharedWithBase < 0 {
			fmt.Fprintf(tw, "base\t%s (gone or changed since the pack)\n", in.Base)
		} else {
			fmt.Fprintf(tw, "base\t%s: %d of %d chunk files shared\n", in.Base, in.SharedWithBase, in.Files)
		}
	}
	if in.WorkingSetPages > 0 {
		fmt.Fprintf(tw, "working set\t%d pages (%s), %s stored\n", in.WorkingSetPages,
			snapshot.FormatBytes(int64(in.WorkingSetPages)*in.PageSize), snapshot.FormatBytes(in.WorkingSetStored))
	} else {
		fmt.Fprintf(tw, "working set\tnone\n")
	}
	tw.Flush()
	return 0
}

func snapshotVerify(dir string, stdout, stderr io.Writer) int {
	bad, err := snapshot.Verify(context.Background(), dir)
	if err != nil {
		fmt.Fprintln(stderr, "faultline snapshot verify:", err)
		return 1
	}
	for _, e := range bad {
		fmt.Fprintln(stderr, "faultline snapshot verify:", e)
	}
	if len(bad) > 0 {
		fmt.Fprintf(stdout, "%s: %d bad\n", dir, len(bad))
		return 1
	}
	fmt.Fprintf(stdout, "%s: every checksum matches\n", dir)
	return 0
}
