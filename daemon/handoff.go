//go:build linux

package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/firecracker"
)

// A live hand-off (Config.Takeover): the new daemon connects to the hand-off socket in the state
// directory (SOCK_SEQPACKET, one JSON message per packet, fds over SCM_RIGHTS) and asks for
// everything. The old one stops accepting (its listening socket is passed on, not closed: a
// VMM that connects meanwhile waits in the backlog and the successor accepts it), stops every
// VM's engines — each stops reading at a batch's end; faults it read and did not serve are woken
// by the successor's engine.Resume, events it read are in the state files' journals — and, once
// they have stopped, sends the listener, the state directory's lock, and per VM its pidfd, its
// connection and its uffds. The successor resumes every VM from the state files with those
// fds, says done, and the old daemon's Serve returns.

type handoffMsg struct {
	Op     string `json:"op"`               // takeover, listener, vm, conn, end, done, abort
	Socket string `json:"socket,omitempty"` // listener: the serve socket's path
	VM     string `json:"vm,omitempty"`     // vm: its state files' key (stateMeta.key); "" if it has none
	Conn   bool   `json:"conn,omitempty"`   // vm: the connection follows the pidfd
	UFFDs  int    `json:"uffds,omitempty"`  // vm: that many uffds follow, one per engine in order
	Err    string `json:"err,omitempty"`    // abort
	Source string `json:"source,omitempty"` // takeover: the successor's snapshot identity
}

// handedVM is what the successor received for one VM.
type handedVM struct {
	pidfd int
	conn  *net.UnixConn
	uffds []int
	used  bool
}

// handoffSet is what the successor received.
type handoffSet struct {
	c      *net.UnixConn
	socket string
	ln     *net.UnixListener
	lock   *os.File
	vms    map[string]*handedVM // by state files' key; "" for VMs without files
	early  []*net.UnixConn      // connections accepted by the old daemon but never served
}

const handoffTimeout = 30 * time.Second

// testHookTakeover, if set (by tests only), runs in a successor once it has received
// everything, before it resumes a VM: a test makes the successor die there.
var testHookTakeover func()

func sendHandoff(c *net.UnixConn, m handoffMsg, fds ...int) error { return SendPacket(c, m, fds...) }

// SendPacket sends v as JSON in one packet on a SOCK_SEQPACKET connection, with copies of fds
// (SCM_RIGHTS): the hand-off sockets' transport.
func SendPacket(c *net.UnixConn, v any, fds ...int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

func recvHandoff(c *net.UnixConn) (handoffMsg, []int, error) {
	var m handoffMsg
	fds, err := RecvPacket(c, &m)
	return m, fds, err
}

// RecvPacket receives one packet (at most 64 KiB) sent by SendPacket into v, and the fds that
// came with it, waiting at most 30 s. An empty packet is the peer gone: an error.
func RecvPacket(c *net.UnixConn, v any) ([]int, error) {
	b := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(64*4))
	c.SetReadDeadline(time.Now().Add(handoffTimeout))
	n, oobn, _, _, err := c.ReadMsgUnix(b, oob)
	var fds []int
	if oobn > 0 {
		if cms, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
			for i := range cms {
				if f, err := unix.ParseUnixRights(&cms[i]); err == nil {
					fds = append(fds, f...)
				}
			}
		}
	}
	if err == nil && n == 0 {
		err = errors.New("hand-off connection closed")
	}
	if err == nil {
		if err = json.Unmarshal(b[:n], v); err != nil {
			err = fmt.Errorf("hand-off message: %w", err)
		}
	}
	if err != nil {
		closeFDs(fds)
		return nil, err
	}
	return fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// listenHandoff binds the hand-off socket, under a temporary name renamed into place (over a
// predecessor's, during a takeover), 0600.
func (d *Daemon) listenHandoff() error {
	ln, err := bind("unixpacket", filepath.Join(d.state.dir, handoffName), 0)
	if err != nil {
		return fmt.Errorf("daemon: hand-off socket: %w", err)
	}
	d.handoffLn = ln
	go d.acceptHandoffs(ln.UnixListener)
	return nil
}

// closeHandoff closes the hand-off socket and removes its path while it still names ours.
func (d *Daemon) closeHandoff() {
	if d.handoffLn == nil {
		return
	}
	d.handoffLn.Close()
	d.handoffLn.Remove()
}

// acceptHandoffs serves successors on ln until it closes; the first hand-off that goes through
// ends this daemon.
func (d *Daemon) acceptHandoffs(ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		cred, err := firecracker.PeerCred(c)
		if err != nil || (cred.Uid != 0 && cred.Uid != uint32(os.Getuid())) {
			d.log.Warn("hand-off refused: the peer is neither root nor this daemon's user", "err", err)
			c.Close()
			continue
		}
		m, fds, err := recvHandoff(c)
		closeFDs(fds)
		if err != nil || m.Op != "takeover" {
			d.log.Warn("hand-off: not a takeover request", "err", err, "op", m.Op)
			c.Close()
			continue
		}
		if src := d.srcID; src != m.Source {
			// Refused before anything stops: its VMs would be killed for it.
			d.log.Warn("hand-off refused: the successor serves other bytes", "successor", m.Source, "ours", src)
			sendHandoff(c, handoffMsg{Op: "abort", Err: fmt.Sprintf("the successor serves %s, this daemon %s: take over with the same snapshot", m.Source, src)})
			c.Close()
			continue
		}
		if d.draining.Load() || d.handingOver.Swap(true) {
			sendHandoff(c, handoffMsg{Op: "abort", Err: "the daemon is draining or handing over already"})
			c.Close()
			continue
		}
		pidfd, _, err := peerPidfd(c, cred.Pid)
		if err != nil {
			d.handingOver.Store(false)
			c.Close()
			continue
		}
		d.handoffs.Add(1)
		done := d.handOver(c, cred.Pid, pidfd)
		d.handoffs.Done()
		c.Close()
		unix.Close(pidfd)
		if done {
			return
		}
	}
}

// handOver gives everything to the successor on c (succPidfd names it) and reports whether it
// went: then this daemon drains and Serve returns. If the hand-off fails after the VMs
// stopped and the successor is gone, this daemon takes them back from the state directory and
// serves on (takeBack).
func (d *Daemon) handOver(c *net.UnixConn, succ int32, succPidfd int) bool {
	start := time.Now()
	d.log.Info("hand-off: a successor takes over", "successor_pid", succ, "live", d.Live())
	lf, err := d.ln.File() // a copy: ours is closed when Serve returns
	if err != nil {
		d.log.Error("hand-off: listener", "err", err)
		sendHandoff(c, handoffMsg{Op: "abort", Err: err.Error()})
		d.handingOver.Store(false)
		return false
	}
	defer lf.Close()
	// Stop accepting: the accept loop sees handingOver at its deadline and pauses (or it ended:
	// a drain).
	d.ln.SetDeadline(time.Unix(1, 0))
	paused := false
	select {
	case <-d.acceptPaused:
		paused = true
	case <-d.acceptDone:
	}
	d.accepting.Wait()
	d.mu.Lock()
	vms := make([]*vm, 0, len(d.vms))
	for v := range d.vms {
		vms = append(vms, v)
	}
	early := d.early
	d.early = nil
	d.mu.Unlock()

	type out struct {
		v   *vm
		fds []int
		msg handoffMsg
	}
	var outs []out
	for _, v := range vms {
		v.mu.Lock()
		if v.isEnded() || v.pidfd < 0 {
			v.mu.Unlock()
			continue
		}
		// Named as its state files name it (the id of the daemon that wrote them, which may
		// be a predecessor's), so that the successor pairs the fds with the files.
		var key string
		if len(v.states) > 0 {
			key = v.states[0].meta.key()
		}
		o := out{v: v, msg: handoffMsg{Op: "vm", VM: key}}
		fd, err := unix.FcntlInt(uintptr(v.pidfd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			v.mu.Unlock()
			continue
		}
		o.fds = append(o.fds, fd)
		if v.conn != nil && (v.version == 0 || v.version.KeepsSocketOpen()) {
			if fd := connFD(v.conn); fd >= 0 {
				o.fds = append(o.fds, fd)
				o.msg.Conn = true
			}
		}
		for _, n := range v.uffds {
			fd, err := unix.FcntlInt(uintptr(n), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				break // the successor takes the rest from the VMM (pidfd_getfd)
			}
			o.fds = append(o.fds, fd)
			o.msg.UFFDs++
		}
		v.handedOver = true
		v.mu.Unlock()
		outs = append(outs, o)
	}
	// Stop them: each engine stops reading at the end of a batch; the handshake readers stop
	// at a deadline (set again until they return: a read in progress sets its own).
	for _, o := range outs {
		o.v.end(CauseHandedOver)
		if o.v.conn != nil {
			for done := false; !done; {
				o.v.conn.SetReadDeadline(time.Unix(1, 0))
				select {
				case <-o.v.reading:
					done = true
				case <-time.After(5 * time.Millisecond):
				}
			}
		}
	}
	for _, o := range outs {
		<-o.v.released
	}
	stopped := time.Since(start)
	err = sendHandoff(c, handoffMsg{Op: "listener", Socket: d.path}, int(lf.Fd()), int(d.state.lock.Fd()))
	for _, o := range outs {
		if err == nil {
			err = sendHandoff(c, o.msg, o.fds...)
		}
		closeFDs(o.fds)
	}
	var unsent []*net.UnixConn
	for _, ec := range early {
		if err != nil {
			unsent = append(unsent, ec)
			continue
		}
		if fd := connFD(ec); fd >= 0 {
			err = sendHandoff(c, handoffMsg{Op: "conn"}, fd) // what the successor reads as "a connection accepted but not served yet"
			unix.Close(fd)
		}
		ec.Close()
	}
	if err == nil {
		err = sendHandoff(c, handoffMsg{Op: "end"})
	}
	var reply handoffMsg
	if err == nil {
		var fds []int
		reply, fds, err = recvHandoff(c)
		closeFDs(fds)
		if err == nil && reply.Op != "done" {
			err = fmt.Errorf("the successor refused: %s", reply.Err)
		}
	}
	if err != nil {
		d.log.Error("hand-off failed after the VMs stopped", "err", err)
		if d.takeBack(succPidfd, unsent) {
			if paused {
				d.handoffOutcome <- false
			}
			return false
		}
		// Their state files stay: a daemon started on the state directory recovers them.
		d.log.Error("the VMs are not served: start faultline serve on the state directory to recover them")
	} else {
		d.log.Info("hand-off done: exiting", "vms", len(outs), "stopped_in", stopped, "took", time.Since(start))
	}
	for _, ec := range unsent {
		ec.Close()
	}
	d.draining.Store(true)
	if paused {
		d.handoffOutcome <- true
	}
	return true
}

// takeBack serves again the VMs of a hand-off that failed after they stopped, once the
// successor is gone (its pidfd readable within handoffTimeout): a successor still alive might
// be serving them, and two daemons must never serve one uffd. They come back from the state
// directory as after a crash; connections accepted meanwhile are served here.
func (d *Daemon) takeBack(succPidfd int, unsent []*net.UnixConn) bool {
	pfd := []unix.PollFd{{Fd: int32(succPidfd), Events: unix.POLLIN}}
	deadline := time.Now().Add(handoffTimeout)
	for {
		n, err := unix.Poll(pfd, int(time.Until(deadline)/time.Millisecond))
		if n > 0 {
			break
		}
		if (err != nil && err != unix.EINTR) || time.Now().After(deadline) {
			d.log.Error("hand-off: the successor is still running: not taking the VMs back")
			return false
		}
	}
	d.handingOver.Store(false)
	d.ln.SetDeadline(time.Time{})
	// The successor may have bound its hand-off socket over ours, and removed it.
	d.closeHandoff()
	if err := d.listenHandoff(); err != nil {
		d.log.Error("hand-off socket", "err", err)
	}
	if err := d.recoverVMs(nil); err != nil {
		d.log.Error("taking the VMs back", "err", err)
	}
	d.adoptHanded(&handoffSet{early: unsent})
	d.log.Warn("hand-off failed: the VMs are served here again", "live", d.Live())
	return true
}

// takeover asks the daemon owning the state directory for everything (the successor's side).
func takeover(dir, source string) (*handoffSet, error) {
	path := filepath.Join(dir, handoffName)
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("daemon: takeover: no daemon to take over from at %s: %w", path, err)
	}
	if err := sendHandoff(c, handoffMsg{Op: "takeover", Source: source}); err != nil {
		c.Close()
		return nil, fmt.Errorf("daemon: takeover: %w", err)
	}
	hs := &handoffSet{c: c, vms: map[string]*handedVM{}}
	for {
		m, fds, err := recvHandoff(c)
		if err != nil {
			hs.release()
			return nil, fmt.Errorf("daemon: takeover: %w", err)
		}
		switch m.Op {
		case "abort":
			closeFDs(fds)
			hs.release()
			return nil, fmt.Errorf("daemon: takeover refused: %s", m.Err)
		case "listener":
			if len(fds) != 2 {
				closeFDs(fds)
				hs.release()
				return nil, fmt.Errorf("daemon: takeover: %d fds with the listener, want 2", len(fds))
			}
			f := os.NewFile(uintptr(fds[0]), "listener")
			l, err := net.FileListener(f)
			f.Close()
			if err != nil {
				unix.Close(fds[1])
				hs.release()
				return nil, fmt.Errorf("daemon: takeover: listener: %w", err)
			}
			hs.ln = l.(*net.UnixListener)
			hs.ln.SetUnlinkOnClose(false)
			hs.lock = os.NewFile(uintptr(fds[1]), filepath.Join(dir, lockName))
			hs.socket = m.Socket
		case "conn": // a connection accepted but not served yet
			if len(fds) == 1 {
				if c, err := fileConn(fds[0]); err == nil {
					hs.early = append(hs.early, c)
				}
			} else {
				closeFDs(fds)
			}
		case "vm":
			want := 1 + m.UFFDs
			if m.Conn {
				want++
			}
			if len(fds) != want {
				closeFDs(fds)
				hs.release()
				return nil, fmt.Errorf("daemon: takeover: vm %q: %d fds, want %d", m.VM, len(fds), want)
			}
			hv := &handedVM{pidfd: fds[0]}
			rest := fds[1:]
			if m.Conn {
				if hv.conn, err = fileConn(rest[0]); err != nil {
					hv.conn = nil
				}
				rest = rest[1:]
			}
			hv.uffds = rest
			if m.VM == "" {
				// No handshake yet, so no state file: its connection is served afresh.
				unix.Close(hv.pidfd)
				closeFDs(hv.uffds)
				if hv.conn != nil {
					hs.early = append(hs.early, hv.conn)
				}
				continue
			}
			hs.vms[m.VM] = hv
		case "end":
			closeFDs(fds)
			if hs.ln == nil {
				hs.release()
				return nil, errors.New("daemon: takeover: no listener handed over")
			}
			return hs, nil
		default:
			closeFDs(fds)
		}
	}
}

// connFD returns a copy of c's fd, or -1.
func connFD(c *net.UnixConn) int {
	f, err := c.File()
	if err != nil {
		return -1
	}
	defer f.Close()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	return fd
}

func fileConn(fd int) (*net.UnixConn, error) {
	f := os.NewFile(uintptr(fd), "conn")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, errors.New("not a Unix socket")
	}
	return uc, nil
}

// release closes whatever of hs was not used; then done or abort tells the old daemon.
func (hs *handoffSet) release() {
	for _, hv := range hs.vms {
		if !hv.used {
			unix.Close(hv.pidfd)
			if hv.conn != nil {
				hv.conn.Close()
			}
		}
		closeFDs(hv.uffds)
	}
	for _, c := range hs.early {
		c.Close()
	}
	hs.early = nil
	hs.vms = nil
}

func (hs *handoffSet) finish(err error) {
	if err != nil {
		sendHandoff(hs.c, handoffMsg{Op: "abort", Err: err.Error()})
	} else {
		sendHandoff(hs.c, handoffMsg{Op: "done"})
	}
	hs.c.Close()
}
