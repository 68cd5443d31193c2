//go:build linux

package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/snapshot"
	"github.com/faultline-go/faultline/source"
)

// Daemon is a running server.
type Daemon struct {
	cfg   Config
	log   *slog.Logger
	src   source.Source
	snap  *snapshot.Snapshot // the packed snapshot served, if it is one
	recMu sync.Mutex         // one working-set write at a time
	ln    *Listener          // its path is removed on stop only while it names the socket bound
	path  string
	exits *exitWatcher

	warnedPidfd atomic.Bool

	state       *stateDir      // Config.StateDir, locked; nil without one
	srcID       string         // with a state directory: sourceIdentity, named once at start
	handingOver atomic.Bool    // VMs are going to a successor (--takeover): they end without a failure
	handoffLn   *Listener      // the hand-off socket: removed on stop only while the path names it
	handoffs    sync.WaitGroup // a hand-off in progress: Serve returns after it
	accepting   sync.WaitGroup // accepted connections not yet among d.vms
	acceptDone  chan struct{}  // closed when Serve's accept loop has ended
	// acceptPaused: the accept loop stopped for a hand-off; it then waits for handoffOutcome
	// (true: handed over, it ends; false: it failed, the loop goes on).
	acceptPaused   chan struct{}
	handoffOutcome chan bool
	early          []*net.UnixConn // accepted as a hand-off began, never served here

	mu       sync.Mutex
	vms      map[*vm]struct{}
	finished totals // of VMs that ended, for metrics
	nextID   int64

	draining atomic.Bool
	closing  atomic.Bool
	wg       sync.WaitGroup
	accepted chan struct{}
	done     chan struct{}
}

// New opens the memory file and listens on the socket.
func New(cfg Config) (*Daemon, error) {
	given := cfg.Source != nil
	if cfg.Socket == "" || (given && cfg.Snapshot != "") || (!given && (cfg.MemFile == "") == (cfg.Snapshot == "")) {
		return nil, errors.New("daemon: a socket path and one of a memory file, a snapshot directory or an opened source are required")
	}
	if _, packed := cfg.Source.(*snapshot.Snapshot); cfg.Record && cfg.Snapshot == "" && !packed {
		return nil, errors.New("daemon: recording a working set needs a packed snapshot (Snapshot), not a raw memory file")
	}
	if cfg.OnFailure == "" {
		cfg.OnFailure = Kill
	}
	if cfg.OnFailure != Kill && cfg.OnFailure != LogOnly {
		return nil, fmt.Errorf("daemon: unknown failure policy %q (want %q or %q)", cfg.OnFailure, Kill, LogOnly)
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	if cfg.MaxHandshakes <= 0 {
		cfg.MaxHandshakes = 8
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	var src source.Source
	var snap *snapshot.Snapshot
	var err error
	closeSrc := func() {
		if !given {
			src.Close()
		}
	}
	if given {
		src = cfg.Source
		snap, _ = src.(*snapshot.Snapshot)
	} else if cfg.Snapshot != "" {
		snap, err = snapshot.OpenWith(cfg.Snapshot, snapshot.Options{CacheSize: cfg.CacheSize})
		if err != nil {
			return nil, fmt.Errorf("daemon: snapshot: %w", err)
		}
		src = snap
	} else if src, err = source.OpenFile(cfg.MemFile); err != nil {
		return nil, fmt.Errorf("daemon: memory file: %w", err)
	}
	exits, err := newExitWatcher()
	if err != nil {
		closeSrc()
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, src: src, snap: snap, path: cfg.Socket, exits: exits, vms: map[*vm]struct{}{},
		accepted: make(chan struct{}), done: make(chan struct{}), acceptDone: make(chan struct{}),
		acceptPaused: make(chan struct{}, 1), handoffOutcome: make(chan bool, 1)}
	if err := d.start(); err != nil {
		exits.close()
		closeSrc()
		return nil, err
	}
	return d, nil
}

// errHandingOver stands for an accept's result while a hand-off stops the accept loop.
var errHandingOver = errors.New("handing over")

// start listens, or takes the listener over, and recovers the VMs of the state directory.
func (d *Daemon) start() error {
	dir := d.cfg.StateDir
	if dir == "" {
		if d.cfg.Takeover {
			return errors.New("daemon: a takeover needs the state directory of the daemon to take over from (StateDir, --state-dir)")
		}
		return d.listen()
	}
	// Named once: what the state files and a hand-off compare is the source this daemon opened,
	// whatever the path holds later.
	id, err := d.sourceIdentity()
	if err != nil {
		return err
	}
	d.srcID = id
	gen := time.Now().UnixNano()
	var hs *handoffSet
	var st *stateDir
	if d.cfg.Takeover {
		if hs, err = takeover(dir, d.srcID); err != nil {
			// No live daemon to take over from (none ran, or it died during the hand-off): with
			// the directory's lock free, its VMs are recovered as after a crash.
			var lerr error
			if st, lerr = openStateDir(dir, nil, gen); lerr != nil {
				return errors.Join(err, lerr)
			}
			d.log.Warn("takeover: no live daemon to take over from; recovering the VMs of the state directory", "err", err)
			hs, err = nil, nil
		} else {
			if testHookTakeover != nil {
				testHookTakeover()
			}
			if hs.socket != d.path {
				d.log.Warn("takeover: serving the predecessor's socket, not the one configured", "socket", hs.socket, "configured", d.path)
				d.path = hs.socket
			}
			d.ln = ListenerFrom(hs.ln, d.path)
			st, err = openStateDir(dir, hs.lock, gen)
		}
	} else {
		st, err = openStateDir(dir, nil, gen)
	}
	if err == nil {
		d.state = st
		if hs == nil {
			err = d.listen()
		}
	}
	if err == nil {
		err = d.listenHandoff()
	}
	if err == nil {
		err = d.recoverVMs(hs)
	}
	if err != nil {
		if hs != nil {
			hs.release()
			hs.finish(err)
		}
		if d.handoffLn != nil {
			d.closeHandoff()
		}
		if d.ln != nil {
			d.ln.Close()
		}
		st.close()
		return err
	}
	if hs != nil {
		d.adoptHanded(hs)
		hs.release()
		hs.finish(nil)
	}
	return nil
}

// listen listens on the configured socket (see Listen).
func (d *Daemon) listen() error {
	ln, err := Listen(d.path, d.cfg.SocketGroup)
	if err != nil {
		return err
	}
	d.ln = ln
	return nil
}

// Addr is the socket path.
func (d *Daemon) Addr() string { return d.path }

// Serve accepts VMs until Drain or Close, then waits for the live VMs to end. It returns nil
// after a drain or close.
func (d *Daemon) Serve() error {
	var err error
	go d.exits.run()
	for {
		c, aerr := d.ln.AcceptUnix()
		if aerr == nil && d.handingOver.Load() {
			// Accepted as the hand-off began: it goes to the successor with the VMs (a VMM
			// connecting during a hand-off is never refused).
			d.mu.Lock()
			d.early = append(d.early, c)
			d.mu.Unlock()
			aerr = errHandingOver
		}
		if aerr != nil {
			if d.handingOver.Load() && !d.draining.Load() {
				d.acceptPaused <- struct{}{}
				if <-d.handoffOutcome {
					break
				}
				continue // the hand-off failed: this daemon serves on
			}
			if d.draining.Load() {
				break
			}
			if ne, ok := aerr.(net.Error); ok && ne.Timeout() {
				continue
			}
			err = fmt.Errorf("daemon: accept: %w", aerr)
			break
		}
		d.wg.Add(1)
		d.accepting.Add(1)
		go func() {
			defer d.wg.Done()
			d.handle(c)
		}()
	}
	close(d.acceptDone)
	d.handoffs.Wait()
	d.stopListening()
	d.wg.Wait()
	d.closeHandoff()
	d.exits.close()
	if d.cfg.Source == nil {
		d.src.Close()
	}
	d.state.close()
	close(d.done)
	return err
}

// Drain stops accepting new VMs; live VMs are served until they exit. Serve then returns.
func (d *Daemon) Drain() {
	if d.draining.Swap(true) {
		return
	}
	d.log.Info("draining: no new VMs; serving live ones until they exit", "live", d.Live())
	d.stopListening()
}

func (d *Daemon) stopListening() {
	d.draining.Store(true)
	d.ln.Close()
	// Our socket, not a successor's (Listener.Remove); after a hand-off it is the successor's.
	if !d.handingOver.Load() {
		d.ln.Remove()
	}
}

// Close stops serving every VM now (applying the failure policy: a VM left without a handler
// hangs) and makes Serve return.
func (d *Daemon) Close() {
	d.closing.Store(true)
	d.Drain()
	d.mu.Lock()
	vms := make([]*vm, 0, len(d.vms))
	for v := range d.vms {
		vms = append(vms, v)
	}
	d.mu.Unlock()
	for _, v := range vms {
		v.abandon(errors.New("daemon shutting down"))
	}
}

// Done is closed when Serve has returned.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Live is the number of VMs being served.
func (d *Daemon) Live() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.vms)
}

func (d *Daemon) allowed(uid uint32) bool {
	return len(d.cfg.AllowUIDs) == 0 || slices.Contains(d.cfg.AllowUIDs, uid)
}

func (d *Daemon) handle(c *net.UnixConn) {
	registered := sync.OnceFunc(d.accepting.Done)
	defer registered()
	cred, err := firecracker.PeerCred(c)
	if err != nil {
		d.log.Error("peer credentials", "err", err)
		c.Close()
		return
	}
	if !d.allowed(cred.Uid) {
		d.log.Warn("refused a VMM: uid not allowed", "pid", cred.Pid, "uid", cred.Uid)
		c.Close()
		return
	}
	pidfd, how, err := peerPidfd(c, cred.Pid)
	if err != nil {
		d.log.Warn("VMM gone before it was served", "pid", cred.Pid, "err", err)
		c.Close()
		return
	}
	if how != pidfdPeer && !d.warnedPidfd.Swap(true) {
		d.log.Warn("the kernel has no SO_PEERPIDFD (Linux < 6.5): VMM pidfds are opened by pid, " +
			"so a VMM that exits before that and whose pid is reused names the wrong process")
	}
	d.mu.Lock()
	d.nextID++
	v := newVM(d, d.nextID, c, cred, pidfd, how)
	d.vms[v] = struct{}{}
	d.mu.Unlock()
	registered()
	d.runVM(v)
}

// runVM serves v, one of d.vms, until it ends, then reports it.
func (d *Daemon) runVM(v *vm) {
	v.run()
	d.mu.Lock()
	delete(d.vms, v)
	d.finished.add(v.totals())
	d.mu.Unlock()
	if !v.handedOver {
		v.saveRecording() // a partial recording of a VM that lives on elsewhere would be wrong
	}
	rep := v.report()
	d.log.Info("VM ended", rep.logAttrs()...)
	if d.cfg.OnVMEnd != nil {
		d.cfg.OnVMEnd(rep)
	}
}

// Serve a context: Drain when ctx is done. Convenience for callers that own a context.
func (d *Daemon) ServeContext(ctx context.Context) error {
	stop := context.AfterFunc(ctx, d.Drain)
	defer stop()
	return d.Serve()
}
