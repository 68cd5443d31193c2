//go:build linux

package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/snapshot"
)

// demoPacked shows why a platform packs its snapshots: the demo's snapshot is packed, a VM is
// restored from it with the working set recorded (serve --record), then another with that
// working set prefetched from its handshake on (serve --snapshot), both running the same
// workload — a function's working set: eight scattered ranges, a tenth of guest memory.
func demoPacked(out io.Writer, dir, mem string, size, threads int, version firecracker.Version) error {
	fmt.Fprintf(out, "\nwhy pack: the snapshot packed, a working set recorded once, then prefetched\n\n")
	packDir := filepath.Join(dir, "packed")
	st, err := snapshot.Pack(context.Background(), mem, packDir, snapshot.PackOptions{})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "  pack      %s: %.1f MiB stored for %.1f MiB (%.1fx), %d chunks, in %v\n", packDir,
		float64(st.Stored)/(1<<20), float64(st.Size)/(1<<20), st.Ratio(), st.Chunks, st.Elapsed.Round(time.Millisecond))

	r0 := size / 4 * 3
	part := r0 / 80 / 4096 * 4096
	workload := func(m *vmm.VMM) (int, error) {
		pages := 0
		for i := range 8 {
			got, err := m.TouchRange(0, i*(r0/8), part, threads, demoSeed, false)
			if err != nil {
				return pages, err
			}
			if got.Wrong != 0 {
				return pages, fmt.Errorf("%d pages differ from the snapshot", got.Wrong)
			}
			pages += got.Pages
		}
		return pages, nil
	}
	type result struct {
		name    string
		pages   int
		elapsed time.Duration
		r       daemon.Report
	}
	restore := func(name string, record bool) (result, error) {
		res := result{name: name}
		var logs strings.Builder
		reports := make(chan daemon.Report, 1)
		d, err := daemon.New(daemon.Config{Socket: filepath.Join(dir, "packed.sock"), Snapshot: packDir, Record: record,
			Logger: slog.New(slog.NewTextHandler(&logs, nil)), OnVMEnd: func(r daemon.Report) { reports <- r }})
		if err != nil {
			return res, err
		}
		served := make(chan error, 1)
		go func() { served <- d.Serve() }()
		defer func() { d.Close(); <-served }()
		t0 := time.Now()
		m, err := vmm.Start(vmm.Options{Socket: d.Addr(), Version: version,
			Regions: []vmm.Region{{Size: r0, FileOffset: 0}, {Size: size - r0, FileOffset: int64(r0)}}})
		if err != nil {
			return res, err
		}
		defer m.Kill()
		if res.pages, err = workload(m); err != nil {
			return res, err
		}
		res.elapsed = time.Since(t0)
		if err := m.Exit(); err != nil {
			return res, fmt.Errorf("vmm exit: %w", err)
		}
		select {
		case res.r = <-reports:
		case <-time.After(10 * time.Second):
			return res, fmt.Errorf("the daemon did not notice the VM exit; log:\n%s", logs.String())
		}
		return res, nil
	}
	rec, err := restore("restore with --record (one page per fault)", true)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "  record    %d pages touched, %d faults, working set stored in the snapshot\n", rec.pages, rec.r.Faults)
	pre, err := restore("restore with the working set prefetched", false)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "  prefetch  %d pages prefetched from the handshake on (%v), %d faults\n\n", pre.r.Prefetched, pre.r.PrefetchTime.Round(time.Microsecond), pre.r.Faults)
	fmt.Fprintf(out, "%-46s %8s %8s %10s %10s\n", "RESTORE (same workload, every byte checked)", "PAGES", "FAULTS", "PREFETCHED", "TIME")
	for _, x := range []result{rec, pre} {
		fmt.Fprintf(out, "%-46s %8d %8d %10d %10v\n", x.name, x.pages, x.r.Faults, x.r.Prefetched, x.elapsed.Round(time.Millisecond))
	}
	return nil
}
