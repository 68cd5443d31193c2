//go:build linux

package cli

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/faultline-go/faultline/internal/bench"
	"github.com/faultline-go/faultline/internal/s3test"
)

// remoteBenchFlags are bench restore's flags for the remote cases.
type remoteBenchFlags struct {
	rtts, bandwidth, versitygw *string
}

func addRemoteBenchFlags(fs *flag.FlagSet) remoteBenchFlags {
	return remoteBenchFlags{
		rtts:      fs.String("rtt", "1ms,5ms,20ms", "round-trip times of the remote cases (a snapshot in a versitygw bucket behind a delaying TCP proxy), comma-separated; \"\" for none"),
		bandwidth: fs.String("bandwidth", "0", "the proxy's bandwidth cap per direction, bytes per second (K, M, G suffixes; 0: none)"),
		versitygw: fs.String("versitygw", "", "the versitygw binary (default: $FAULTLINE_VERSITYGW, PATH, $GOPATH/bin)"),
	}
}

// options turns the flags into bench.RemoteOptions. Without a versitygw binary the remote cases
// are left out with a note, unless --rtt was given.
func (f remoteBenchFlags) options(fs *flag.FlagSet, stderr io.Writer) (bench.RemoteOptions, error) {
	var o bench.RemoteOptions
	for _, s := range strings.Split(*f.rtts, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return o, fmt.Errorf("--rtt %q: want durations such as 5ms", s)
		}
		o.RTTs = append(o.RTTs, d)
	}
	if *f.bandwidth != "0" {
		bw, err := parseSize(*f.bandwidth)
		if err != nil {
			return o, fmt.Errorf("--bandwidth: %w", err)
		}
		o.Bandwidth = int64(bw)
	}
	o.Versitygw = *f.versitygw
	if len(o.RTTs) > 0 && o.Versitygw == "" {
		bin, err := s3test.Binary()
		if err != nil {
			explicit := false
			fs.Visit(func(fl *flag.Flag) { explicit = explicit || fl.Name == "rtt" })
			if explicit {
				return o, err
			}
			fmt.Fprintf(stderr, "  no remote cases: %v\n", err)
			o.RTTs = nil
		}
		o.Versitygw = bin
	}
	return o, nil
}

func printRestoreRemote(w io.Writer, rep *bench.RestoreReport) {
	if len(rep.Remote) == 0 {
		return
	}
	fmt.Fprintf(w, "\nremote: the snapshot in a versitygw bucket on 127.0.0.1, behind a TCP proxy adding the RTT; one run each\n\n")
	const row = "%-6s %-18s %10s %7s %10s %11s %10s %5s %6s %6s %8s  %s\n"
	fmt.Fprintf(w, row, "RTT", "CASE", "RESTORE-ms", "FAULTS", "PREFETCHED", "PREFETCH-ms", "BUCKET-MiB", "GETS", "AHEAD", "WARMED", "MB/s", "VERIFIED")
	for _, r := range rep.Remote {
		pret, verified := "-", fmt.Sprintf("%d pages, %d wrong", r.Verified, r.Wrong)
		if r.Case == bench.CaseRemoteFetch {
			verified = "- (no VM: chunks read and kept)"
		}
		if r.Prefetched > 0 {
			pret = fmt.Sprintf("%.1f", float64(r.PrefetchTime)/1e6)
		}
		rtt := r.RTT.String()
		if r.Case == bench.CaseLocalOnDemand {
			rtt = "local"
		}
		fmt.Fprintf(w, row, rtt, r.Case, fmt.Sprintf("%.1f", float64(r.Restore)/1e6), fmt.Sprint(r.Faults), fmt.Sprint(r.Prefetched), pret,
			fmt.Sprintf("%.1f", float64(r.BucketBytes)/(1<<20)), fmt.Sprint(r.Gets), fmt.Sprint(r.Readaheads), fmt.Sprint(r.Warmed), fmt.Sprintf("%.0f", r.MBps), verified)
	}
	fmt.Fprintln(w)
	for _, v := range rep.RemoteVerdicts() {
		verdict := "met"
		if !v.Met {
			verdict = "MISSED"
		}
		fmt.Fprintf(w, "%-62s %8.2f %s  (target %s: %s)\n", v.Name, v.Value, v.Unit, v.Target, verdict)
	}
}
