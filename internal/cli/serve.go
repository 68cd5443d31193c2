//go:build linux

package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/remote"
)

func init() {
	register(&Command{
		Name:    "serve",
		Summary: "serve Firecracker snapshot memory lazily over the UFFD handshake",
		Run:     runServe,
	})
}

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("serve", "--socket PATH (--mem-file PATH | --snapshot DIR) [flags]\n"+
		"       faultline serve --control PATH [--socket PATH (--mem-file PATH | --snapshot DIR)] [flags]\n\n"+
		"Serve listens on a Unix socket for Firecracker's UFFD handshake (snapshot load with\n"+
		"\"mem_backend\": {\"backend_type\": \"Uffd\", \"backend_path\": PATH}) and serves every VM that\n"+
		"connects from the memory snapshot file or packed snapshot directory (faultline pack), until\n"+
		"SIGINT/SIGTERM: the first signal stops accepting and serves live VMs until they exit; a\n"+
		"second one exits at once. With --record it stores the working set of the VMs it serves in\n"+
		"the snapshot; a later serve of that snapshot prefetches it into every VM from its handshake.\n\n"+
		"With --control it serves a fleet: VMs bound to UFFD sockets and snapshots through the control\n"+
		"API on that socket (faultline vm create|ls|rm), --cache-size bounding the chunk cache memory\n"+
		"of all packed snapshots together; a --socket given too is the binding \"default\".\n\n"+
		"With --state-dir DIR (on tmpfs, e.g. /run/faultline) it keeps each VM's state there: after a\n"+
		"crash, a daemon started on DIR serves again every VM still running (root: it takes each\n"+
		"VM's userfaultfd back with pidfd_getfd). An upgrade starts the new binary with --takeover\n"+
		"--state-dir DIR: it takes the socket and every VM over from the running daemon, which\n"+
		"exits (with no live daemon there, it recovers DIR's VMs as after a crash). Without\n"+
		"--state-dir, the VMs of a daemon that dies hang until killed.", stderr)
	socket := fs.String("socket", "", "Unix socket to listen on (required)")
	memFile := fs.String("mem-file", "", "raw memory snapshot file (this or --snapshot)")
	snapDir := fs.String("snapshot", "", "packed snapshot: a directory from faultline pack, or s3://BUCKET/PREFIX from faultline push (this or --mem-file)")
	cacheSize := fs.String("cache-size", "256M", "bound of the decompressed frames of --snapshot kept in memory, its decoded working set included (K, M, G); with --control, of every packed snapshot together; "+
		"with --cache-dir, of that disk cache instead (and --mem-cache-size of the memory)")
	rf := addRemoteFlags(fs)
	record := fs.Bool("record", false, "record the working set of the VMs served into --snapshot (one page per fault meanwhile; no prefetch)")
	recordWindow := fs.Duration("record-window", 0, "record only this long after each VM's handshake (0: until the VM ends)")
	noPrefetch := fs.Bool("no-prefetch", false, "do not prefetch --snapshot's working set")
	group := fs.String("socket-group", "", "make the socket 0660 and owned by this group (name or gid); default 0600")
	allow := fs.String("allow-uid", "", "comma-separated uids allowed to connect (default: any)")
	onFailure := fs.String("on-failure", "kill", "what to do with a VM that cannot be served: kill (SIGKILL the VMM) or log")
	workers := fs.Int("workers", 1, "engine workers per userfaultfd")
	around := fs.String("fault-around", "adaptive", "pages installed per fault, or 'adaptive'")
	maxAround := fs.Int("max-around", 64, "adaptive fault-around ceiling in pages")
	metrics := fs.String("metrics-addr", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9464)")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	verbose := fs.Bool("v", false, "debug logging")
	maxRegions := fs.Int("max-regions", 4096, "most regions one handshake may carry")
	timeout := fs.Duration("handshake-timeout", 5*time.Second, "how long a started handshake may take")
	maxHandshakes := fs.Int("max-handshakes", 8, "most handshakes one connection may send (Firecracker sends one)")
	stateDir := fs.String("state-dir", "", "keep each VM's state here (tmpfs, e.g. /run/faultline): a daemon restarted on it after a crash serves the VMs again")
	takeover := fs.Bool("takeover", false, "take the socket and every VM over from the daemon running on --state-dir, which then exits (a live upgrade)")
	fl := fleetFlags(fs)
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if *fl.control != "" && *socket == "" && *memFile == "" && *snapDir == "" && !*record && fs.NArg() == 0 {
		// A fleet with no single VM: the bindings come through the control API.
	} else if *socket == "" || (*memFile == "") == (*snapDir == "") || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "faultline serve: --socket and one of --mem-file or --snapshot are required, and nothing else")
		fs.Usage()
		return 2
	}
	if *takeover && *stateDir == "" {
		fmt.Fprintln(stderr, "faultline serve: --takeover needs --state-dir (the running daemon's)")
		return 2
	}
	if *record && *snapDir == "" {
		fmt.Fprintln(stderr, "faultline serve: --record needs --snapshot (a packed snapshot to store the working set in)")
		return 2
	}
	isRemote := remote.IsURL(*snapDir)
	if *record && isRemote {
		fmt.Fprintln(stderr, "faultline serve: --record needs a snapshot directory (record it locally, then push it)")
		return 2
	}
	cache, err := parseSize(*cacheSize)
	if err != nil || cache <= 0 {
		fmt.Fprintf(stderr, "faultline serve: --cache-size %q: want a size such as 256M\n", *cacheSize)
		return 2
	}
	// With --cache-dir, --cache-size is the disk cache's bound and --mem-cache-size the memory's.
	disk := int64(defaultDiskCache)
	if *rf.cacheDir != "" {
		disk = int64(cache)
		if cache, err = parseSize(*rf.memCache); err != nil || cache <= 0 {
			fmt.Fprintf(stderr, "faultline serve: --mem-cache-size %q: want a size such as 256M\n", *rf.memCache)
			return 2
		}
	}
	cfg := daemon.Config{Socket: *socket, MemFile: *memFile, Snapshot: *snapDir, CacheSize: int64(cache),
		Record: *record, RecordWindow: *recordWindow, NoPrefetch: *noPrefetch,
		OnFailure: daemon.Policy(*onFailure), MaxRegions: *maxRegions, HandshakeTimeout: *timeout, MaxHandshakes: *maxHandshakes,
		StateDir: *stateDir, Takeover: *takeover}
	if cfg.Engine.FaultAround, err = parseAround(*around, *maxAround); err != nil {
		fmt.Fprintln(stderr, "faultline serve:", err)
		return 2
	}
	cfg.Engine.Workers = *workers
	if *group != "" {
		if cfg.SocketGroup, err = lookupGroup(*group); err != nil {
			fmt.Fprintln(stderr, "faultline serve:", err)
			return 2
		}
	}
	if *allow != "" {
		for _, s := range strings.Split(*allow, ",") {
			u, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
			if err != nil {
				fmt.Fprintf(stderr, "faultline serve: --allow-uid %q: %v\n", s, err)
				return 2
			}
			cfg.AllowUIDs = append(cfg.AllowUIDs, uint32(u))
		}
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	hopts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(stderr, hopts)
	if *logFormat == "json" {
		h = slog.NewJSONHandler(stderr, hopts)
	} else if *logFormat != "text" {
		fmt.Fprintf(stderr, "faultline serve: --log-format %q: want text or json\n", *logFormat)
		return 2
	}
	log := slog.New(h)
	cfg.Logger = log
	rs := newRemoteServe(rf, disk, log)
	defer rs.close()
	if *fl.control != "" {
		openers := maps.Clone(snapshotOpeners)
		openers["s3"] = rs.open
		return serveFleet(fl, cfg, openers, *metrics, log, stderr)
	}
	if isRemote {
		// The daemon serves the snapshot opened from the bucket; it is closed after the
		// daemon, the disk cache after it.
		snap, err := rs.openSnapshot(*snapDir, cfg.CacheSize)
		if err != nil {
			fmt.Fprintln(stderr, "faultline serve:", err)
			return 1
		}
		defer snap.Close()
		cfg.Snapshot, cfg.Source = "", snap
	}
	// The metrics port is bound before the daemon starts: a daemon that recovered or took VMs
	// over must not have to let them go because of it. A successor waits for its predecessor,
	// which holds the port until it exits (serveMetricsOn).
	var metricsLn net.Listener
	if *metrics != "" && !*takeover {
		if metricsLn, err = net.Listen("tcp", *metrics); err != nil {
			fmt.Fprintln(stderr, "faultline serve: metrics:", err)
			return 1
		}
	}
	d, err := daemon.New(cfg)
	if err != nil {
		if metricsLn != nil {
			metricsLn.Close()
		}
		fmt.Fprintln(stderr, "faultline serve:", err)
		return 1
	}
	if *metrics != "" {
		defer serveMetricsOn(metricsLn, *metrics, d.Collector(), log)()
	}
	defer onSignals(log, d.Drain, d.Close, d.Live)()
	if *snapDir != "" {
		log.Info("serving", "socket", *socket, "snapshot", *snapDir, "record", *record, "prefetch", !*noPrefetch && !*record, "on_failure", cfg.OnFailure)
	} else {
		log.Info("serving", "socket", *socket, "mem_file", *memFile, "on_failure", cfg.OnFailure)
	}
	if err := d.Serve(); err != nil {
		log.Error("serve", "err", err)
		return 1
	}
	log.Info("stopped")
	return 0
}

// serveMetrics serves Prometheus metrics of c (and the Go runtime's and the process's) on addr
// until stop.
func serveMetrics(addr string, c prometheus.Collector, log *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return serveMetricsOn(ln, addr, c, log), nil
}

// serveMetricsOn serves the metrics on ln; with ln nil (a --takeover's successor, whose
// predecessor holds the port until it exits) it binds addr as soon as it is free, for up to
// 10 s, and serves without metrics if it never is.
func serveMetricsOn(ln net.Listener, addr string, c prometheus.Collector, log *slog.Logger) (stop func()) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		for deadline := time.Now().Add(10 * time.Second); ln == nil; time.Sleep(50 * time.Millisecond) {
			var err error
			if ln, err = net.Listen("tcp", addr); err != nil && time.Now().After(deadline) {
				log.Error("metrics: the port stayed taken; serving without metrics", "addr", addr, "err", err)
				return
			}
		}
		log.Info("metrics", "addr", ln.Addr().String(), "path", "/metrics")
		srv.Serve(ln)
	}()
	return func() { srv.Shutdown(context.Background()) }
}

// onSignals drains on the first SIGINT/SIGTERM and closes on the second, until stop.
func onSignals(log *slog.Logger, drain, close func(), live func() int) (stop func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		log.Info("signal: draining (send it again to exit now)", "signal", s.String())
		drain()
		s = <-sigs
		log.Warn("second signal: exiting; VMs still live are not served any more", "signal", s.String(), "live", live())
		close()
	}()
	return func() { signal.Stop(sigs) }
}

func parseAround(s string, maxPages int) (engine.FaultAround, error) {
	if s == "adaptive" {
		return engine.FaultAround{Min: 1, Max: max(maxPages, 1), Adaptive: true}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return engine.FaultAround{}, fmt.Errorf("--fault-around %q: want a page count or 'adaptive'", s)
	}
	return engine.FaultAround{Min: n, Max: n}, nil
}

func lookupGroup(s string) (int, error) {
	if gid, err := strconv.Atoi(s); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("--socket-group %q: %w", s, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, errors.New("--socket-group: bad gid " + g.Gid)
	}
	return gid, nil
}
