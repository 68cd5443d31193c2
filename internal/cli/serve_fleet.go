//go:build linux

package cli

import (
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/fleet"
	"github.com/faultline-go/faultline/fleet/client"
)

// snapshotOpeners open the snapshot references of a fleet that are URLs, by scheme. A file of
// this package that adds a kind of reference fills it in from its init function; serve
// --control passes it to the fleet with s3:// added (an opener that needs serve's flags).
var snapshotOpeners = map[string]fleet.Opener{}

// defaultBinding is the id of the binding serve --control makes of --socket.
const defaultBinding = "default"

type fleetOpts struct {
	control, minCache *string
	maxVMs            *int
}

// fleetFlags adds the flags of serve --control to fs.
func fleetFlags(fs *flag.FlagSet) fleetOpts {
	return fleetOpts{
		control:  fs.String("control", "", "serve a fleet: the control API (HTTP/JSON, faultline vm) on this Unix socket (0600)"),
		maxVMs:   fs.Int("max-vms", fleet.DefaultMaxVMs, "with --control: most VM bindings at once"),
		minCache: fs.String("min-snapshot-cache", "16M", "with --control: smallest share of --cache-size a packed snapshot may get; one more is refused"),
	}
}

// serveFleet is serve --control: cfg is the daemon configuration of every binding, and of the
// binding "default" if it names a socket.
func serveFleet(o fleetOpts, cfg daemon.Config, openers map[string]fleet.Opener, metrics string, log *slog.Logger, stderr io.Writer) int {
	minCache, err := parseSize(*o.minCache)
	if err != nil || minCache <= 0 || int64(minCache) > cfg.CacheSize {
		fmt.Fprintf(stderr, "faultline serve: --min-snapshot-cache %q: want a size such as 16M, at most --cache-size\n", *o.minCache)
		return 2
	}
	tmpl := cfg
	tmpl.Socket, tmpl.MemFile, tmpl.Snapshot, tmpl.Record, tmpl.CacheSize = "", "", "", false, 0
	tmpl.StateDir, tmpl.Takeover = "", false // the fleet gives each binding's daemon its own
	s, err := fleet.New(fleet.Config{Daemon: tmpl, MaxVMs: *o.maxVMs, CacheSize: cfg.CacheSize,
		MinCacheSize: int64(minCache), Openers: openers, StateDir: cfg.StateDir, Takeover: cfg.Takeover})
	if err != nil {
		fmt.Fprintln(stderr, "faultline serve:", err)
		return 1
	}
	// Signals first: once the control socket is there, a signal drains rather than kills.
	defer onSignals(log, s.Drain, s.Close, func() int { return liveVMs(s) })()
	if err := s.ListenControl(*o.control); err != nil {
		fmt.Fprintln(stderr, "faultline serve:", err)
		return 1
	}
	if _, err := s.Get(defaultBinding); cfg.Socket != "" && err != nil {
		// (A binding "default" recovered or taken over from the state directory is kept.)
		spec := client.Spec{Snapshot: abs(cfg.Snapshot), MemFile: abs(cfg.MemFile), Socket: abs(cfg.Socket), Record: cfg.Record}
		if _, err := s.Create(defaultBinding, spec); err != nil {
			fmt.Fprintln(stderr, "faultline serve:", err)
			s.Close()
			<-s.Done()
			return 1
		}
	}
	if metrics != "" && cfg.Takeover {
		// The predecessor holds the port until it exits.
		defer serveMetricsOn(nil, metrics, s.Collector(), log)()
	} else if metrics != "" {
		stop, err := serveMetrics(metrics, s.Collector(), log)
		if err != nil {
			fmt.Fprintln(stderr, "faultline serve: metrics:", err)
			s.Close()
			<-s.Done()
			return 1
		}
		defer stop()
	}
	<-s.Done()
	log.Info("stopped")
	return 0
}

func liveVMs(s *fleet.Server) (n int) {
	for _, vm := range s.List() {
		n += vm.Stats.Live
	}
	return n
}
