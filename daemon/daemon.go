//go:build linux

package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

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
	ln    *net.UnixListener
	path  string
	// sock is the (device, inode) of the socket file we bound: on stop the path is removed
	// only while it still names that file, not a successor's socket renamed over it.
	sock  fileID
	exits *exitWatcher

	warnedPidfd atomic.Bool

	state       *stateDir   // Config.StateDir, locked; nil without one
	handingOver atomic.Bool // VMs are going to a successor (--takeover): they end without a failure
	handoffLn   *net.UnixListener
	handoffID   fileID          // the hand-off socket we bound, as d.sock for the serve socket
	handoffs    sync.WaitGroup  // a hand-off in progress: Serve returns after it
	accepting   sync.WaitGroup  // accepted connections not yet among d.vms
	acceptDone  chan struct{}   // closed when Serve's accept loop has ended
	early       []*net.UnixConn // accepted as a hand-off began, never served here

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
	if cfg.Socket == "" || (cfg.MemFile == "") == (cfg.Snapshot == "") {
		return nil, errors.New("daemon: a socket path and either a memory file or a snapshot directory are required")
	}
	if cfg.Record && cfg.Snapshot == "" {
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
	if cfg.Snapshot != "" {
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
		src.Close()
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, src: src, snap: snap, path: cfg.Socket, exits: exits, vms: map[*vm]struct{}{},
		accepted: make(chan struct{}), done: make(chan struct{}), acceptDone: make(chan struct{})}
	if err := d.start(); err != nil {
		exits.close()
		src.Close()
		return nil, err
	}
	return d, nil
}

// start listens, or takes the listener over, and recovers the VMs of the state directory.
func (d *Daemon) start() error {
	dir := d.cfg.StateDir
	if dir == "" {
		if d.cfg.Takeover {
			return errors.New("daemon: a takeover needs the state directory of the daemon to take over from (StateDir, --state-dir)")
		}
		return d.listen()
	}
	gen := time.Now().UnixNano()
	var hs *handoffSet
	var st *stateDir
	var err error
	if d.cfg.Takeover {
		src, serr := d.sourceIdentity()
		if serr != nil {
			return serr
		}
		if hs, err = takeover(dir, src); err != nil {
			// No live daemon to take over from (none ran, or it died during the hand-off): with
			// the directory's lock free, its VMs are recovered as after a crash.
			var lerr error
			if st, lerr = openStateDir(dir, nil, gen); lerr != nil {
				return errors.Join(err, lerr)
			}
			d.log.Warn("takeover: no live daemon to take over from; recovering the VMs of the state directory", "err", err)
			hs, err = nil, nil
		} else {
			if hs.socket != d.path {
				d.log.Warn("takeover: serving the predecessor's socket, not the one configured", "socket", hs.socket, "configured", d.path)
				d.path = hs.socket
			}
			d.ln = hs.ln
			d.sock, _ = statID(d.path)
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

// fileID identifies a file: what a path names, whatever the path.
type fileID struct{ dev, ino uint64 }

func statID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fileID{}, err
	}
	return fileID{uint64(st.Dev), uint64(st.Ino)}, nil
}

// listen binds the socket under a temporary name, sets its mode and owner, then renames it into
// place, so no client can connect before the permissions hold. The rename replaces a stale
// socket file atomically, so the path never goes missing.
func (d *Daemon) listen() error {
	if fi, err := os.Lstat(d.path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("daemon: %s exists and is not a socket", d.path)
		}
		// Stale only if nobody listens: connect(2) is refused. EAGAIN means a listener with a
		// full backlog — a busy daemon, not a stale file.
		c, err := net.Dial("unix", d.path)
		switch {
		case err == nil:
			c.Close()
			return fmt.Errorf("daemon: %s: another daemon is listening", d.path)
		case errors.Is(err, unix.ECONNREFUSED), errors.Is(err, unix.ENOENT):
		default:
			return fmt.Errorf("daemon: %s: cannot tell whether it is stale: %w", d.path, err)
		}
	}
	tmp := filepath.Join(filepath.Dir(d.path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(d.path), os.Getpid()))
	os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return fmt.Errorf("daemon: listen: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	mode := os.FileMode(0o600)
	if d.cfg.SocketGroup > 0 {
		mode = 0o660
		if err := os.Chown(tmp, -1, d.cfg.SocketGroup); err != nil {
			ln.Close()
			os.Remove(tmp)
			return fmt.Errorf("daemon: chown socket: %w", err)
		}
	}
	if err := os.Chmod(tmp, mode); err != nil {
		ln.Close()
		os.Remove(tmp)
		return fmt.Errorf("daemon: chmod socket: %w", err)
	}
	// The temporary name is ours alone (it carries our pid); rename keeps the inode.
	id, err := statID(tmp)
	if err == nil {
		err = os.Rename(tmp, d.path)
	}
	if err != nil {
		ln.Close()
		os.Remove(tmp)
		return fmt.Errorf("daemon: %w", err)
	}
	d.ln, d.sock = ln, id
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
		if aerr != nil {
			if d.draining.Load() || d.handingOver.Load() {
				break
			}
			if ne, ok := aerr.(net.Error); ok && ne.Timeout() {
				continue
			}
			err = fmt.Errorf("daemon: accept: %w", aerr)
			break
		}
		if d.handingOver.Load() {
			// Accepted as the hand-off began: it goes to the successor with the VMs (a VMM
			// connecting during a hand-off is never refused).
			d.mu.Lock()
			d.early = append(d.early, c)
			d.mu.Unlock()
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
	d.src.Close()
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
	// Remove our socket, not a successor's: only if the path still names the file we bound. (A
	// successor renaming its socket over the path between the check and the unlink would still
	// lose it; the window is two system calls wide, where it used to be the whole drain.)
	if id, err := statID(d.path); err == nil && id == d.sock && !d.handingOver.Load() {
		os.Remove(d.path)
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
