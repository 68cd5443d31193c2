//go:build linux

package fleet

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/fleet/client"
)

// A live hand-off of a fleet (Config.Takeover). The successor connects to control-handoff.sock
// in the state directory (SOCK_SEQPACKET, one JSON message per packet, fds over SCM_RIGHTS,
// the daemon's transport: daemon.SendPacket) and says takeover. The old fleet refuses PUT and
// DELETE from then on (503), lets those in progress end (each saved in fleet.json), stops
// accepting on the control socket without closing it (a client connecting meanwhile waits in
// its backlog), finishes the requests it accepted, and sends the control listener and the
// fleet's lock. The successor reads fleet.json and starts every binding's daemon with
// daemon.Config.Takeover on its state directory: each takes its VMs over from the old binding's
// daemon through that daemon's own hand-off socket, and that daemon's Serve returns. Then the
// successor serves the control API on the listener it received and says done; the old fleet
// drains what is left (bindings a DELETE was draining: served to their end) and exits when
// every binding's daemon has returned. If the successor goes before done, the old fleet serves
// the control API again.

type handoffMsg struct {
	Op     string `json:"op"`               // takeover, listener, done, abort
	Socket string `json:"socket,omitempty"` // listener: the control socket's path
	Err    string `json:"err,omitempty"`    // abort
}

// errHandingOver is the answer to PUT and DELETE during a hand-off.
var errHandingOver = &client.Error{Status: http.StatusServiceUnavailable,
	Message: "the daemon is handing over to its successor (a live upgrade): retry in a moment"}

func sendMsg(c *net.UnixConn, m handoffMsg, fds ...int) error { return daemon.SendPacket(c, m, fds...) }

func recvMsg(c *net.UnixConn) (handoffMsg, []int, error) {
	var m handoffMsg
	fds, err := daemon.RecvPacket(c, &m)
	return m, fds, err
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func abortHandoff(c *net.UnixConn, err error) {
	sendMsg(c, handoffMsg{Op: "abort", Err: err.Error()})
	c.Close()
}

// takeover asks the fleet owning dir for its control listener and lock (the successor's side);
// c stays open to say done once the bindings are taken over.
func takeover(dir string) (ln *daemon.Listener, lock *os.File, c *net.UnixConn, err error) {
	path := filepath.Join(dir, handoffSock)
	c, err = net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("fleet: takeover: no fleet to take over from at %s: %w", path, err)
	}
	fail := func(err error) (*daemon.Listener, *os.File, *net.UnixConn, error) {
		c.Close()
		return nil, nil, nil, fmt.Errorf("fleet: takeover: %w", err)
	}
	if err := sendMsg(c, handoffMsg{Op: "takeover"}); err != nil {
		return fail(err)
	}
	m, fds, err := recvMsg(c)
	switch {
	case err != nil:
		return fail(err)
	case m.Op == "abort":
		closeFDs(fds)
		return fail(fmt.Errorf("refused: %s", m.Err))
	case m.Op != "listener" || len(fds) != 2:
		closeFDs(fds)
		return fail(fmt.Errorf("%q with %d fds, want the listener and the lock", m.Op, len(fds)))
	}
	lock = os.NewFile(uintptr(fds[1]), filepath.Join(dir, lockFile))
	f := os.NewFile(uintptr(fds[0]), "control")
	l, err := net.FileListener(f)
	f.Close()
	ul, ok := l.(*net.UnixListener)
	if err != nil || !ok {
		if l != nil {
			l.Close()
		}
		lock.Close()
		return fail(fmt.Errorf("control listener: %v", err))
	}
	stampLock(lock)
	return daemon.ListenerFrom(ul, m.Socket), lock, c, nil
}

// listenHandoff listens on control-handoff.sock for a successor (a stale file, a dead
// predecessor's or one that handed over, is replaced).
func (s *Server) listenHandoff() error {
	hl, err := daemon.ListenPacket(filepath.Join(s.cfg.StateDir, handoffSock))
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.handoffLn = hl
	s.mu.Unlock()
	go s.acceptHandoffs(hl)
	return nil
}

// acceptHandoffs serves successors on hl until it closes or one took over.
func (s *Server) acceptHandoffs(hl *daemon.Listener) {
	for {
		c, err := hl.AcceptUnix()
		if err != nil {
			return
		}
		cred, err := firecracker.PeerCred(c)
		if err != nil || (cred.Uid != 0 && cred.Uid != uint32(os.Getuid())) {
			s.log.Warn("hand-off refused: the peer is neither root nor this fleet's user", "err", err)
			c.Close()
			continue
		}
		m, fds, err := recvMsg(c)
		closeFDs(fds)
		if err != nil || m.Op != "takeover" {
			s.log.Warn("hand-off: not a takeover request", "err", err, "op", m.Op)
			c.Close()
			continue
		}
		done := s.handOver(c, cred.Pid)
		c.Close()
		if done {
			return
		}
	}
}

// handOver gives the control listener and the lock to the successor on c and reports whether
// it took over: then this fleet drains and is done.
func (s *Server) handOver(c *net.UnixConn, succ int32) bool {
	s.mu.Lock()
	if s.draining || s.handingOver || s.http == nil {
		s.mu.Unlock()
		sendMsg(c, handoffMsg{Op: "abort", Err: "the fleet is stopping or handing over already"})
		return false
	}
	s.handingOver = true
	srv, ln, served, conns, hl := s.http, s.ctlLn, s.served, s.conns, s.handoffLn
	s.mu.Unlock()
	s.log.Info("hand-off: a successor takes the fleet over", "successor_pid", succ, "bindings", len(s.List()))
	s.ops.Wait() // PUT and DELETE in progress end, saved

	// Stop accepting (the socket stays open), then let the requests accepted end.
	ln.paused.Store(true)
	s.ctl.SetDeadline(time.Unix(1, 0))
	<-served
	// Not Shutdown, which drops a connection accepted whose request it has not read yet: with
	// keep-alives off each connection closes after its answer (idle ones now), and the
	// requests of those accepted are answered here.
	srv.SetKeepAlivesEnabled(false)
	closed := make(chan struct{})
	go func() {
		conns.Wait()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second): // a request stuck: ReadHeaderTimeout bounds a silent one
		srv.Close()
	}
	lf, err := s.ctl.File()
	if err == nil {
		err = sendMsg(c, handoffMsg{Op: "listener", Socket: s.ctl.Path()}, int(lf.Fd()), int(s.lock.Fd()))
		lf.Close()
	}
	// The successor binds its own hand-off socket at the path.
	hl.Close()
	var m handoffMsg
	for err == nil {
		var fds []int
		m, fds, err = recvMsg(c)
		closeFDs(fds)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = nil // its bindings are being taken over, which may take longer
			continue
		}
		if err == nil && m.Op != "done" {
			err = fmt.Errorf("the successor gave up: %s", m.Err)
		}
		if err == nil {
			break
		}
	}
	if err != nil {
		s.takeBack(err)
		return false
	}
	s.mu.Lock()
	s.handedOver = true
	s.mu.Unlock()
	s.log.Info("hand-off done: exiting once every binding's daemon has handed over or drained")
	s.ctl.Close()
	s.stop(false)
	return true
}

// takeBack serves the control API again after a hand-off that failed before the successor
// said done. Bindings whose daemons handed over to it meanwhile are listed as stopped here:
// their VMs' state is in their state directories, for the next fleet started on it.
func (s *Server) takeBack(err error) {
	s.log.Error("hand-off failed: serving the control API again", "err", err)
	stampLock(s.lock)
	s.ctl.SetDeadline(time.Time{})
	s.mu.Lock()
	s.handingOver = false
	s.serveControlLocked()
	s.mu.Unlock()
	if err := s.save(); err != nil {
		s.log.Error("fleet.json not saved", "err", err)
	}
	if err := s.listenHandoff(); err != nil {
		s.log.Error("no live upgrade of this fleet: hand-off socket", "err", err)
	}
}
