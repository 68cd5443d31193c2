//go:build linux

package fleet

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/fleet/client"
	"github.com/faultline-go/faultline/snapshot"
)

// Defaults of Config.
const (
	DefaultMaxVMs       = 256
	DefaultMinCacheSize = 16 << 20
)

// Config configures a Server.
type Config struct {
	// Daemon is the configuration of every binding's daemon: failure policy, engine options,
	// limits, socket group, allowed uids, logger, OnVMEnd. Its Socket, MemFile, Snapshot, Source
	// and Record are set per binding.
	Daemon daemon.Config
	// MaxVMs bounds the bindings (default DefaultMaxVMs).
	MaxVMs int
	// CacheSize bounds the decompressed frames kept in memory over every packed snapshot open
	// (default snapshot.DefaultCacheSize); each open snapshot gets an equal share.
	// MinCacheSize is the smallest share (default DefaultMinCacheSize, at most CacheSize): a
	// snapshot whose opening would make the shares smaller is refused.
	CacheSize    int64
	MinCacheSize int64
	// Openers open snapshot references that are URLs, by scheme ("s3"). Paths are opened by
	// OpenLocal.
	Openers map[string]Opener
	// StateDir, if set, is a directory (on tmpfs, such as /run/faultline) where the fleet keeps
	// its bindings (fleet.json, rewritten atomically on every PUT and DELETE) and each binding's
	// daemon its VMs' state (bindings/<id>, daemon.Config.StateDir): a fleet started on it after
	// a crash makes the bindings again and serves their VMs. One fleet at a time owns it.
	StateDir string
	// Takeover makes ListenControl take the control socket and every binding over from the
	// fleet running on StateDir (a live upgrade), which then exits.
	Takeover bool
}

// Server is a fleet daemon: VM bindings made and removed through its control API, each served by
// a daemon.Daemon, and the snapshots they share.
type Server struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	vms      map[string]*binding
	sockets  map[string]string // socket path of each listening binding → its id
	snaps    map[string]*shared
	sized    int // snapshots counted in the cache memory bound
	draining bool
	wg       sync.WaitGroup // one per binding, until its daemon's Serve returned

	ctl      *daemon.Listener
	ctlLn    *ctlListener
	http     *http.Server
	served   chan struct{}   // closed when http's Serve returned
	conns    *sync.WaitGroup // http's connections open
	stopOnce sync.Once
	done     chan struct{}

	// With a StateDir (state.go, handoff.go).
	lock        *os.File   // fleet.lock, flocked
	saveMu      sync.Mutex // one fleet.json write at a time
	ops         sync.WaitGroup
	handingOver bool // under mu: a successor takes over; PUT and DELETE are refused
	handedOver  bool // under mu: it did; nothing of the state directory is ours
	handoffLn   *daemon.Listener
}

// binding is one VM binding: a socket, its daemon, the snapshot it serves.
type binding struct {
	id      string
	spec    client.Spec
	created time.Time
	// Set when the binding is made; then constant.
	d    *daemon.Daemon
	snap *shared
	// Under Server.mu.
	state   string
	err     string
	deleted bool // by DELETE: its state directory goes with it
}

// New returns a server with no bindings and no control socket (see ListenControl and Handler).
func New(cfg Config) (*Server, error) {
	if cfg.MaxVMs <= 0 {
		cfg.MaxVMs = DefaultMaxVMs
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = snapshot.DefaultCacheSize
	}
	if cfg.MinCacheSize <= 0 {
		cfg.MinCacheSize = min(DefaultMinCacheSize, cfg.CacheSize)
	}
	if cfg.MinCacheSize > cfg.CacheSize {
		return nil, fmt.Errorf("fleet: the smallest cache share (%d) is larger than the cache memory bound (%d)", cfg.MinCacheSize, cfg.CacheSize)
	}
	if cfg.Daemon.Logger == nil {
		cfg.Daemon.Logger = slog.Default()
	}
	return &Server{cfg: cfg, log: cfg.Daemon.Logger, vms: map[string]*binding{}, sockets: map[string]string{},
		snaps: map[string]*shared{}, done: make(chan struct{})}, nil
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Create makes a binding: it opens (or shares) the snapshot and listens on the socket, which
// accepts VMs when Create returns. Errors are *client.Error, with the status the API answers.
func (s *Server) Create(id string, spec client.Spec) (client.VM, error) {
	if !validID.MatchString(id) {
		return client.VM{}, badRequest("id %q: want 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", id)
	}
	if !filepath.IsAbs(spec.Socket) {
		return client.VM{}, badRequest("socket %q: an absolute path is required", spec.Socket)
	}
	spec.Socket = filepath.Clean(spec.Socket)
	if _, _, _, err := s.reference(spec); err != nil {
		return client.VM{}, err
	}
	b := &binding{id: id, spec: spec, created: time.Now(), state: client.StateCreating}
	s.mu.Lock()
	switch {
	case s.draining:
		s.mu.Unlock()
		return client.VM{}, &client.Error{Status: http.StatusServiceUnavailable, Message: "the daemon is shutting down: no new VMs"}
	case s.handingOver:
		s.mu.Unlock()
		return client.VM{}, errHandingOver
	case s.vms[id] != nil:
		st := s.vms[id].state
		s.mu.Unlock()
		return client.VM{}, &client.Error{Status: http.StatusConflict, Message: fmt.Sprintf("VM %q exists (%s)", id, st)}
	case s.sockets[spec.Socket] != "":
		other := s.sockets[spec.Socket]
		s.mu.Unlock()
		return client.VM{}, &client.Error{Status: http.StatusConflict, Message: fmt.Sprintf("socket %s is in use by VM %q", spec.Socket, other)}
	case len(s.vms) >= s.cfg.MaxVMs:
		s.mu.Unlock()
		return client.VM{}, &client.Error{Status: http.StatusTooManyRequests, Message: fmt.Sprintf(
			"the daemon serves its most VMs (%d, --max-vms): remove one first", s.cfg.MaxVMs)}
	}
	// Reserved: the id, the socket path and a place under MaxVMs are taken while the snapshot
	// opens; the WaitGroup counts the binding from now on, so a drain waits for it.
	s.vms[id] = b
	s.sockets[spec.Socket] = id
	s.wg.Add(1)
	s.ops.Add(1)
	s.mu.Unlock()
	defer s.ops.Done()

	vm, err := s.start(b, false)
	if err == nil {
		if err = s.save(); err != nil {
			s.log.Error("VM binding made but not saved: a fleet restarted on the state directory will not have it", "vm_id", id, "err", err)
			return client.VM{}, &client.Error{Status: http.StatusInternalServerError, Message: err.Error()}
		}
	}
	if err != nil {
		s.mu.Lock()
		delete(s.vms, id)
		delete(s.sockets, spec.Socket)
		s.mu.Unlock()
		s.wg.Done()
		return client.VM{}, err
	}
	return vm, nil
}

// start opens b's snapshot and its daemon and serves it; with takeover its daemon takes its VMs
// over from the predecessor's.
func (s *Server) start(b *binding, takeover bool) (client.VM, error) {
	sh, err := s.acquire(b.spec)
	if err != nil {
		return client.VM{}, err
	}
	if b.spec.Record {
		if _, ok := sh.src.(*snapshot.Snapshot); !ok {
			s.release(sh)
			return client.VM{}, badRequest("record: a packed snapshot directory is required (working sets are stored in it)")
		}
	}
	cfg := s.cfg.Daemon
	cfg.Socket, cfg.MemFile, cfg.Snapshot, cfg.Source, cfg.Record = b.spec.Socket, "", "", sh.src, b.spec.Record
	cfg.Logger = s.log.With("vm_id", b.id)
	cfg.StateDir, cfg.Takeover = s.bindingDir(b.id), takeover
	if sh.kind == kindMemFile {
		cfg.MemFile = sh.ref // its name, for the state directory
	}
	d, err := daemon.New(cfg)
	if err != nil {
		s.release(sh)
		status := http.StatusBadRequest
		if errors.Is(err, daemon.ErrSocketInUse) || errors.Is(err, daemon.ErrStateLocked) {
			status = http.StatusConflict
		}
		return client.VM{}, &client.Error{Status: status, Message: err.Error()}
	}
	s.mu.Lock()
	if s.draining { // a drain came while the snapshot opened: this binding never serves
		s.mu.Unlock()
		d.Close()
		d.Serve()
		s.release(sh)
		return client.VM{}, &client.Error{Status: http.StatusServiceUnavailable, Message: "the daemon is shutting down: no new VMs"}
	}
	b.d, b.snap, b.state = d, sh, client.StateListening
	vm, refs := s.describeLocked(b), sh.refs
	s.mu.Unlock()
	go s.serve(b)
	s.log.Info("VM binding created", "vm_id", b.id, "socket", b.spec.Socket, sh.kind, sh.ref, "bindings_of_snapshot", refs)
	return vm, nil
}

// serve runs b's daemon until it returned (deleted and drained, or its listener failed), then
// releases its snapshot and, if it was deleted, removes it.
func (s *Server) serve(b *binding) {
	defer s.wg.Done()
	err := b.d.Serve()
	s.mu.Lock()
	deleted := b.deleted
	if b.state == client.StateDraining {
		delete(s.vms, b.id)
	} else {
		b.state = client.StateStopped
		if err != nil {
			b.err = err.Error()
		}
		if s.sockets[b.spec.Socket] == b.id {
			delete(s.sockets, b.spec.Socket)
		}
	}
	s.mu.Unlock()
	if err != nil {
		s.log.Error("VM binding stopped listening", "vm_id", b.id, "err", err)
	}
	s.release(b.snap)
	if deleted && s.cfg.StateDir != "" {
		// Its daemon has returned: no VM of it is left to recover.
		if err := os.RemoveAll(s.bindingDir(b.id)); err != nil {
			s.log.Error("VM binding: removing its state directory", "vm_id", b.id, "err", err)
		}
		if err := s.save(); err != nil {
			s.log.Error("VM binding gone but not saved", "vm_id", b.id, "err", err)
		}
	}
	s.log.Info("VM binding done: its VMs ended", "vm_id", b.id)
}

// Delete removes a binding: when it returns, its socket no longer accepts and its file is gone.
// VMs connected are served until they exit, or with force ended now by the failure policy.
func (s *Server) Delete(id string, force bool) (client.VM, error) {
	s.mu.Lock()
	b := s.vms[id]
	switch {
	case s.handingOver:
		s.mu.Unlock()
		return client.VM{}, errHandingOver
	case b == nil:
		s.mu.Unlock()
		return client.VM{}, &client.Error{Status: http.StatusNotFound, Message: fmt.Sprintf("no VM %q", id)}
	case b.state == client.StateCreating:
		s.mu.Unlock()
		return client.VM{}, &client.Error{Status: http.StatusConflict, Message: fmt.Sprintf("VM %q is being created", id)}
	}
	stopped := b.state == client.StateStopped
	if stopped {
		// Its daemon's Serve returned already: nothing listens or is served.
		delete(s.vms, id)
	}
	b.state, b.deleted = client.StateDraining, true
	if s.sockets[b.spec.Socket] == id {
		delete(s.sockets, b.spec.Socket)
	}
	s.ops.Add(1)
	s.mu.Unlock()
	defer s.ops.Done()
	// Saved as draining before it drains: a fleet restarted meanwhile drains it again rather
	// than leave its VMs unserved.
	if err := s.save(); err != nil {
		s.log.Error("VM binding deletion not saved", "vm_id", id, "err", err)
	}
	if stopped && s.cfg.StateDir != "" {
		os.RemoveAll(s.bindingDir(id))
	}
	if force {
		b.d.Close()
	} else {
		b.d.Drain()
	}
	s.log.Info("VM binding deleted", "vm_id", id, "force", force, "live", b.d.Live())
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.describeLocked(b), nil
}

// Get describes a binding.
func (s *Server) Get(id string) (client.VM, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.vms[id]
	if b == nil {
		return client.VM{}, &client.Error{Status: http.StatusNotFound, Message: fmt.Sprintf("no VM %q", id)}
	}
	return s.describeLocked(b), nil
}

// List describes every binding, by id.
func (s *Server) List() []client.VM {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]client.VM, 0, len(s.vms))
	for _, b := range s.vms {
		out = append(out, s.describeLocked(b))
	}
	slices.SortFunc(out, func(a, b client.VM) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Snapshots lists the snapshots open, by reference.
func (s *Server) Snapshots() []client.Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	share := s.shareLocked()
	out := []client.Snapshot{}
	for _, sh := range s.snaps {
		select {
		case <-sh.ready:
		default:
			continue // opening
		}
		cs := client.Snapshot{Ref: sh.ref, Kind: sh.kind, Refs: sh.refs}
		if sh.sizer != nil {
			cs.CacheSize = share
		}
		out = append(out, cs)
	}
	slices.SortFunc(out, func(a, b client.Snapshot) int { return strings.Compare(a.Kind+a.Ref, b.Kind+b.Ref) })
	return out
}

func (s *Server) describeLocked(b *binding) client.VM {
	vm := client.VM{ID: b.id, Snapshot: b.spec.Snapshot, MemFile: b.spec.MemFile, Socket: b.spec.Socket,
		Record: b.spec.Record, State: b.state, Created: b.created, Error: b.err}
	if b.d != nil {
		// Summary takes the daemon's lock and its engines' (for their stats), never ours.
		sum := b.d.Summary()
		vm.Stats = client.Stats{Live: sum.Live, Served: sum.VMs, Faults: sum.Faults, Pages: sum.Pages,
			ZeroPages: sum.ZeroPages, Prefetched: sum.Prefetched, Removed: sum.Removed, Bytes: sum.Bytes,
			P50Nanos: int64(sum.P50), P99Nanos: int64(sum.P99)}
	}
	return vm
}

// Drain stops taking new bindings and drains every binding (see Delete); Done is closed when
// their VMs have all exited.
func (s *Server) Drain() { s.stop(false) }

// Close ends every binding's VMs now by the failure policy; Done is closed when they are gone.
func (s *Server) Close() { s.stop(true) }

func (s *Server) stop(force bool) {
	s.mu.Lock()
	s.draining = true
	var ds []*daemon.Daemon
	for _, b := range s.vms {
		if b.d != nil && b.state != client.StateStopped {
			b.state = client.StateDraining
			ds = append(ds, b.d)
		}
	}
	clear(s.sockets)
	s.mu.Unlock()
	for _, d := range ds {
		if force {
			d.Close()
		} else {
			d.Drain()
		}
	}
	s.stopOnce.Do(func() {
		go func() {
			s.wg.Wait()
			s.mu.Lock() // draining is set: ListenControl starts nothing from now on
			srv, ctl, handed, hl := s.http, s.ctl, s.handedOver, s.handoffLn
			s.mu.Unlock()
			if srv != nil {
				ctl.Close() // first: the HTTP server's Close waits for its Serve to return
				srv.Close()
				if !handed { // else the path is the successor's, and so is its socket
					ctl.Remove()
				}
			}
			if hl != nil {
				hl.Close()
				hl.Remove()
			}
			if s.lock != nil {
				s.lock.Close()
			}
			close(s.done)
		}()
	})
}

// Done is closed after Drain or Close, when every binding's VMs are gone and the control socket
// is closed and removed.
func (s *Server) Done() <-chan struct{} { return s.done }
