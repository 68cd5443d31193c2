//go:build linux

package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// vm is one connected VMM and the engines serving its userfaultfds.
type vm struct {
	d    *Daemon
	id   int64
	conn *net.UnixConn
	pid  int
	uid  uint32
	// pidfd names the VMM process itself, whatever its pid becomes (see peerPidfd); run sets
	// it to -1, under mu, when it closes it.
	pidfd   int
	pidfdBy string // how the pidfd was obtained
	started time.Time
	log     *slog.Logger

	mu         sync.Mutex
	engines    []*engine.Engine
	handshakes int
	version    firecracker.Version
	regions    int
	failure    error
	endCause   string
	// origin is how this daemon came to serve the VM: "" (its handshake), originRecovered or
	// originTakenOver; states are its engines' state files (Config.StateDir), and handedOver
	// says the VM went to a successor, which owns those files now.
	origin     string
	states     []*stateFile
	handedOver bool
	uffds      []int         // our number of each engine's uffd, valid while the engine runs
	reading    chan struct{} // closed when the handshake reader has returned
	released   chan struct{} // closed when run has released everything
	wg         sync.WaitGroup
	ended      chan struct{}
	once       sync.Once
}

// newVM: the pid (SO_PEERCRED's) and a pidfd from SO_PEERPIDFD both come from the struct pid
// the socket recorded at connect, so they name the same process; the pid serves the reports.
func newVM(d *Daemon, id int64, c *net.UnixConn, cred *unix.Ucred, pidfd int, pidfdBy string) *vm {
	return &vm{
		d: d, id: id, conn: c, pid: int(cred.Pid), uid: cred.Uid, pidfd: pidfd, pidfdBy: pidfdBy,
		started: time.Now(), ended: make(chan struct{}), reading: make(chan struct{}), released: make(chan struct{}),
		log: d.log.With("vm", id, "pid", cred.Pid),
	}
}

// run serves the VM until it is gone, then releases everything. It is the VM's only goroutine
// besides its engines': exits are watched by the daemon's exitWatcher.
func (v *vm) run() {
	if v.origin == "" {
		v.log.Info("VMM connected", "uid", v.uid, "pidfd", v.pidfdBy)
	}
	if err := v.d.exits.watch(v); err != nil {
		v.fail(err)
	}
	if v.conn != nil {
		v.readHandshakes()
	}
	close(v.reading)
	// Wait for the end: the pidfd (exit), an engine that ended, a failure, Close or a hand-off.
	<-v.ended
	v.d.exits.unwatch(v)
	v.stopEngines()
	v.wg.Wait()
	if v.conn != nil {
		v.conn.Close()
	}
	v.mu.Lock()
	unix.Close(v.pidfd)
	v.pidfd = -1
	v.mu.Unlock()
	v.releaseStates()
	close(v.released)
}

// readHandshakes serves the handshakes of the VM's connection until it ends.
func (v *vm) readHandshakes() {
	hs := firecracker.NewConn(v.conn, firecracker.Limits{
		MaxRegions: v.d.cfg.MaxRegions, FileSize: v.d.src.Size(), HostPageSize: uintptr(unix.Getpagesize()),
	})
	hs.Timeout = v.d.cfg.HandshakeTimeout
	for !v.isEnded() {
		h, err := hs.Next()
		if err != nil {
			switch {
			case v.isEnded(), v.d.handingOver.Load(): // the read was cut short by end or a hand-off
			case errors.Is(err, io.EOF):
				switch {
				case v.version == 0:
					v.end("connection closed without a handshake")
				case v.version.KeepsSocketOpen():
					v.end("VMM closed its socket (exited)")
				}
				// Before v1.12 Firecracker closes the socket after the handshake: the pidfd
				// tells when it exits.
			case errors.Is(err, firecracker.ErrHandshake):
				v.fail(err)
			default:
				v.fail(fmt.Errorf("reading handshake: %w", err))
			}
			break
		}
		if v.handshakes == v.d.cfg.MaxHandshakes {
			unix.Close(h.UFFD)
			v.fail(fmt.Errorf("handshake %d on one connection refused: the limit is %d (MaxHandshakes, --max-handshakes)",
				v.handshakes+1, v.d.cfg.MaxHandshakes))
			break
		}
		if err := v.serve(h); err != nil {
			v.fail(err)
			break
		}
	}
}

func (v *vm) isEnded() bool {
	select {
	case <-v.ended:
		return true
	default:
		return false
	}
}

// end marks the VM ended (first cause wins) and wakes everything waiting on it.
func (v *vm) end(cause string) {
	v.once.Do(func() {
		v.mu.Lock()
		v.endCause = cause
		handed := v.handedOver
		v.mu.Unlock()
		close(v.ended)
		// Unblock the handshake reader for good: a read deadline would be reset by its next
		// read, a shut-down read side keeps returning EOF. Not for a VM handed over: the
		// socket is the successor's, and shutdown(2) would cut it for it too (the hand-off
		// stops the reader with a deadline instead, and no more reads follow).
		if v.conn != nil && !handed {
			v.conn.CloseRead()
		}
	})
}

// fail applies the failure policy: the VM cannot be served.
func (v *vm) fail(err error) {
	kill := v.d.cfg.OnFailure == Kill
	var kerr error
	v.mu.Lock()
	if v.failure == nil {
		v.failure = err
	}
	// Under mu, which run holds to close the pidfd: the number is never used after it may
	// name another VM's pidfd.
	if kill && v.pidfd >= 0 {
		kerr = unix.PidfdSendSignal(v.pidfd, unix.SIGKILL, nil, 0)
	}
	v.mu.Unlock()
	if kill {
		v.log.Error("cannot serve VM: killing the VMM", "err", err)
		if kerr != nil && kerr != unix.ESRCH {
			v.log.Error("SIGKILL through pidfd failed", "err", kerr)
		}
	} else {
		v.log.Error("cannot serve VM (policy: log only; its faulting vCPUs stay blocked)", "err", err)
	}
	v.end("failed: " + err.Error())
}

// abandon is Close's path: the daemon stops, the VM will not be served any more.
func (v *vm) abandon(err error) {
	if v.isEnded() {
		return
	}
	v.fail(err)
}

// serve starts an engine for one handshake's uffd.
func (v *vm) serve(h *firecracker.Handshake) error {
	fd, err := uffd.NewFD(h.UFFD, false)
	if err != nil {
		unix.Close(h.UFFD)
		return err
	}
	regions := make([]engine.Region, len(h.Regions))
	for i, r := range h.Regions {
		regions[i] = engine.Region{Name: fmt.Sprintf("region%d", v.regions+i), Base: r.Base, Size: r.Size,
			PageSize: r.PageSize, Offset: r.Offset, Source: v.d.src}
		if r.PageSize > uintptr(unix.Getpagesize()) {
			if hp, err := memory.ReadHugePages(); err == nil && hp.Free == 0 {
				v.log.Warn("hugetlb guest memory but no free huge pages: faults will fail", "region", i)
			}
		}
	}
	opts := v.engineOptions()
	if opts.Record = v.d.cfg.Record && v.d.snap != nil; opts.Record {
		// One page per fault while recording, as REAP records: a page installed ahead of its
		// touch never faults, so fault-around would leave it out of the working set.
		opts.FaultAround = engine.FaultAround{Min: 1, Max: 1}
	}
	if v.d.state != nil {
		sf, err := v.createState(h, fd, regions)
		if err != nil {
			fd.Close()
			return err
		}
		opts.Durable = sf.durable
	}
	e, err := engine.New(fd, regions, opts)
	if err != nil {
		fd.Close()
		return err
	}
	v.addEngine(e, fd, len(h.Regions))
	v.mu.Lock()
	v.version = h.Version
	v.mu.Unlock()
	v.log.Info("serving", "version", h.Version.String(), "regions", len(h.Regions), "uffd", h.UFFD)
	v.startWorkingSet(e)
	v.runEngine(e)
	return nil
}

// addEngine counts in an engine of the VM serving its uffd fd (our number) and regions.
func (v *vm) addEngine(e *engine.Engine, fd *uffd.FD, regions int) {
	v.mu.Lock()
	v.engines = append(v.engines, e)
	v.uffds = append(v.uffds, fd.Fd())
	v.handshakes++
	v.regions += regions
	v.mu.Unlock()
}

// runEngine runs one of the VM's engines until it ends.
func (v *vm) runEngine(e *engine.Engine) {
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		err := e.Run(context.Background())
		switch {
		case err == nil:
		case errors.Is(err, engine.ErrProcessGone):
			v.end("VMM exited (its memory is gone)")
		default:
			v.fail(err)
		}
	}()
}

// engineOptions are the options of the VM's engines, logging with the VM's attributes.
func (v *vm) engineOptions() engine.Options {
	opts := v.d.cfg.Engine
	if opts.Logger == nil {
		opts.Logger = v.log
	} else {
		opts.Logger = opts.Logger.With("vm", v.id, "pid", v.pid)
	}
	return opts
}

func (v *vm) stopEngines() {
	v.mu.Lock()
	es := append([]*engine.Engine(nil), v.engines...)
	v.mu.Unlock()
	for _, e := range es {
		e.Close()
	}
}
