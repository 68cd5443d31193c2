//go:build linux

package puppet

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Puppet is the parent's handle on a child process.
type Puppet struct {
	cmd *exec.Cmd

	mu sync.Mutex // guards the fields below, and sends on sock
	// sock is the control socket, -1 once closed. Only recvLoop closes it (under mu, after it
	// stops receiving), so no goroutine ever uses the number after it may have been reused.
	sock    int
	nextID  int
	waiting map[int]chan result
	dead    error
	done    chan struct{}
}

type result struct {
	rep Reply
	fds []int
}

// Start starts a puppet: this executable again, with the control socket as fd 3. Callers must
// call Main early in their main or TestMain so the child turns into a puppet.
func Start() (*Puppet, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("puppet: socketpair: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	childEnd := os.NewFile(uintptr(fds[1]), "puppet-control")
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), EnvVar+"=3")
	if os.Getenv("GOMAXPROCS") == "" {
		// A goroutine blocked in a page fault keeps its P. With one P per CPU, two threads
		// blocked on faults (or inside non-preemptible copies) would leave none to answer the
		// parent; plenty of Ps keep the command loop running whatever the touching threads do.
		cmd.Env = append(cmd.Env, "GOMAXPROCS=32")
	}
	cmd.ExtraFiles = []*os.File{childEnd}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		childEnd.Close()
		unix.Close(fds[0])
		return nil, fmt.Errorf("puppet: start: %w", err)
	}
	childEnd.Close()
	p := &Puppet{cmd: cmd, sock: fds[0], waiting: map[int]chan result{}, done: make(chan struct{})}
	go p.recvLoop(fds[0])
	return p, nil
}

// Pid is the child's process id.
func (p *Puppet) Pid() int { return p.cmd.Process.Pid }

// recvLoop receives the replies on sock until the child closes its end or Wait shuts the socket
// down, then closes sock.
func (p *Puppet) recvLoop(sock int) {
	defer func() {
		p.mu.Lock()
		unix.Close(sock)
		p.sock = -1
		p.mu.Unlock()
	}()
	buf := make([]byte, 1<<22)
	oob := make([]byte, unix.CmsgSpace(4*8))
	for {
		n, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			p.fail(errors.New("puppet: child closed its control socket (exited?)"))
			return
		}
		var fds []int
		if oobn > 0 {
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				if r, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, r...)
				}
			}
		}
		var rep Reply
		if err := json.Unmarshal(buf[:n], &rep); err != nil {
			p.fail(fmt.Errorf("puppet: bad reply: %w", err))
			return
		}
		p.mu.Lock()
		ch := p.waiting[rep.ID]
		delete(p.waiting, rep.ID)
		p.mu.Unlock()
		if ch != nil {
			ch <- result{rep, fds}
		} else {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}
}

func (p *Puppet) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dead == nil {
		p.dead = err
		close(p.done)
	}
}

// Call is a pending command; Wait collects its reply.
type Call struct {
	p  *Puppet
	ch chan result
}

// Go sends a command without waiting for it to finish.
func (p *Puppet) Go(req Request) (*Call, error) {
	p.mu.Lock()
	if p.dead != nil {
		p.mu.Unlock()
		return nil, p.dead
	}
	p.nextID++
	req.ID = p.nextID
	ch := make(chan result, 1)
	p.waiting[req.ID] = ch
	b, err := json.Marshal(req)
	if err != nil {
		p.mu.Unlock()
		return nil, err
	}
	err = unix.EPIPE
	for p.sock >= 0 {
		err = unix.Sendmsg(p.sock, b, nil, nil, 0)
		if err != unix.EINTR {
			break
		}
	}
	p.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("puppet: send %s: %w", req.Op, err)
	}
	return &Call{p: p, ch: ch}, nil
}

// Wait waits up to timeout for the reply. A reply with Err set is returned as an error too.
func (c *Call) Wait(timeout time.Duration) (Reply, []int, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-c.ch:
		if r.rep.Err != "" {
			return r.rep, r.fds, errors.New("puppet: " + r.rep.Err)
		}
		return r.rep, r.fds, nil
	case <-c.p.done:
		// The reply may have raced with the death notice.
		select {
		case r := <-c.ch:
			return r.rep, r.fds, nil
		default:
		}
		return Reply{}, nil, c.p.dead
	case <-t.C:
		return Reply{}, nil, fmt.Errorf("puppet: no reply within %v (child blocked on a fault?)", timeout)
	}
}

// Done reports whether a reply has arrived, without waiting.
func (c *Call) Done() bool { return len(c.ch) > 0 }

// Do sends a command and waits up to 30 s for its reply.
func (p *Puppet) Do(req Request) (Reply, []int, error) {
	c, err := p.Go(req)
	if err != nil {
		return Reply{}, nil, err
	}
	return c.Wait(30 * time.Second)
}

// Kill kills the child with SIGKILL and reaps it.
func (p *Puppet) Kill() {
	p.cmd.Process.Kill()
	p.Wait()
}

// Exit asks the child to exit with code and reaps it.
func (p *Puppet) Exit(code int) error {
	if _, _, err := p.Do(Request{Op: "exit", Expect: code}); err != nil {
		return err
	}
	return p.Wait()
}

// Wait reaps the child and shuts the control socket down; the receiving goroutine then closes
// it.
func (p *Puppet) Wait() error {
	err := p.cmd.Wait()
	p.mu.Lock()
	if p.sock >= 0 {
		unix.Shutdown(p.sock, unix.SHUT_RDWR)
	}
	p.mu.Unlock()
	return err
}
