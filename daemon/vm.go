//go:build linux

package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
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
	d       *Daemon
	id      int64
	conn    *net.UnixConn
	pid     int
	uid     uint32
	pidfd   *os.File
	pidfdN  int // the pidfd's number: pidfd.Fd() would switch it to blocking mode
	started time.Time
	log     *slog.Logger

	mu       sync.Mutex
	engines  []*engine.Engine
	version  firecracker.Version
	regions  int
	failure  error
	endCause string
	wg       sync.WaitGroup
	ended    chan struct{}
	once     sync.Once
}

func newVM(d *Daemon, id int64, c *net.UnixConn, cred *unix.Ucred, pidfd int) *vm {
	return &vm{
		d: d, id: id, conn: c, pid: int(cred.Pid), uid: cred.Uid,
		pidfd: os.NewFile(uintptr(pidfd), fmt.Sprintf("pidfd:%d", cred.Pid)), pidfdN: pidfd,
		started: time.Now(), ended: make(chan struct{}),
		log: d.log.With("vm", id, "pid", cred.Pid),
	}
}

// run serves the VM until it is gone, then releases everything.
func (v *vm) run() {
	v.log.Info("VMM connected", "uid", v.uid)
	exited := make(chan struct{})
	go v.watchExit(exited)
	hs := firecracker.NewConn(v.conn, firecracker.Limits{
		MaxRegions: v.d.cfg.MaxRegions, FileSize: v.d.src.Size(), HostPageSize: uintptr(unix.Getpagesize()),
	})
	hs.Timeout = v.d.cfg.HandshakeTimeout
	for {
		h, err := hs.Next()
		if err != nil {
			switch {
			case errors.Is(err, io.EOF):
				switch {
				case v.version == 0:
					v.end("connection closed without a handshake")
				case v.version.KeepsSocketOpen():
					v.end("VMM closed its socket (exited)")
				}
				// Before v1.12 Firecracker closes the socket after the handshake: the pidfd
				// tells when it exits.
			case v.isEnded():
			case errors.Is(err, firecracker.ErrHandshake):
				v.fail(err)
			default:
				v.fail(fmt.Errorf("reading handshake: %w", err))
			}
			break
		}
		if err := v.serve(h); err != nil {
			v.fail(err)
			break
		}
	}
	// Wait for the end: the pidfd (exit), an engine that ended, a failure, or Close.
	select {
	case <-exited:
		v.end("VMM exited")
	case <-v.ended:
	}
	v.stopEngines()
	v.wg.Wait()
	v.conn.Close()
	v.pidfd.Close()
}

// watchExit waits for the VMM process to exit: its pidfd becomes readable.
func (v *vm) watchExit(exited chan<- struct{}) {
	// Ends by readability (exit) or by the deadline end() sets; either way the VM is over.
	if rc, err := v.pidfd.SyscallConn(); err == nil {
		_ = rc.Read(func(fd uintptr) bool {
			select {
			case <-v.ended:
				return true
			default:
			}
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(p, 0)
			return n > 0
		})
	}
	close(exited)
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
		v.mu.Unlock()
		close(v.ended)
		v.conn.SetReadDeadline(time.Unix(1, 0)) // unblock the handshake reader
		v.pidfd.SetReadDeadline(time.Unix(1, 0))
	})
}

// fail applies the failure policy: the VM cannot be served.
func (v *vm) fail(err error) {
	v.mu.Lock()
	if v.failure == nil {
		v.failure = err
	}
	v.mu.Unlock()
	if v.d.cfg.OnFailure == Kill {
		v.log.Error("cannot serve VM: killing the VMM", "err", err)
		if kerr := unix.PidfdSendSignal(v.pidfdN, unix.SIGKILL, nil, 0); kerr != nil && kerr != unix.ESRCH {
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
	e, err := engine.New(fd, regions, v.d.cfg.Engine)
	if err != nil {
		fd.Close()
		return err
	}
	v.mu.Lock()
	v.engines = append(v.engines, e)
	v.version = h.Version
	v.regions += len(h.Regions)
	v.mu.Unlock()
	v.log.Info("serving", "version", h.Version.String(), "regions", len(h.Regions), "uffd", h.UFFD)
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
	return nil
}

func (v *vm) stopEngines() {
	v.mu.Lock()
	es := append([]*engine.Engine(nil), v.engines...)
	v.mu.Unlock()
	for _, e := range es {
		e.Close()
	}
}
