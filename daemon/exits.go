//go:build linux

package daemon

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// exitWatcher tells VMs that their VMM exited: every live VM's pidfd is in one epoll set, and
// one goroutine waits for that set in Go's netpoller (an epoll fd is pollable), so watching a
// VM costs an epoll entry, not a goroutine parked on its pidfd.
type exitWatcher struct {
	ep *os.File
	rc syscall.RawConn

	mu  sync.Mutex
	vms map[int64]*vm // by VM id: ids are never reused, so a late event cannot hit another VM
}

func newExitWatcher() (*exitWatcher, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("daemon: epoll_create1: %w", err)
	}
	// os.NewFile puts only non-blocking fds in the netpoller; epoll_wait ignores the flag.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("daemon: epoll fd: %w", err)
	}
	ep := os.NewFile(uintptr(fd), "epoll:pidfds")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, err
	}
	return &exitWatcher{ep: ep, rc: rc, vms: map[int64]*vm{}}, nil
}

// watch adds v's pidfd: when the VMM exits, v.end is called. A VMM already gone is reported at
// once (the pidfd is readable).
func (w *exitWatcher) watch(v *vm) error {
	w.mu.Lock()
	w.vms[v.id] = v
	w.mu.Unlock()
	var cerr error
	err := w.rc.Control(func(fd uintptr) {
		// One shot: an exited process's pidfd stays readable; one report is all a VM needs.
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLONESHOT, Fd: int32(v.id), Pad: int32(v.id >> 32)}
		cerr = unix.EpollCtl(int(fd), unix.EPOLL_CTL_ADD, v.pidfd, &ev)
	})
	if err = errors.Join(err, cerr); err != nil {
		w.forget(v)
		return fmt.Errorf("daemon: epoll_ctl(ADD, pidfd): %w", err)
	}
	return nil
}

// unwatch removes v's pidfd; call it before closing the pidfd.
func (w *exitWatcher) unwatch(v *vm) {
	w.forget(v)
	_ = w.rc.Control(func(fd uintptr) {
		unix.EpollCtl(int(fd), unix.EPOLL_CTL_DEL, v.pidfd, nil)
	})
}

func (w *exitWatcher) forget(v *vm) {
	w.mu.Lock()
	delete(w.vms, v.id)
	w.mu.Unlock()
}

// run reports exits until close.
func (w *exitWatcher) run() {
	evs := make([]unix.EpollEvent, 64)
	// The callback drains the set and then asks the netpoller to wait: readiness that arrives
	// after the drain wakes the wait, so no exit is missed.
	_ = w.rc.Read(func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), evs, 0)
			if err == unix.EINTR {
				continue
			}
			if n <= 0 {
				return false
			}
			for _, ev := range evs[:n] {
				id := int64(ev.Fd)&0xffffffff | int64(ev.Pad)<<32
				w.mu.Lock()
				v := w.vms[id]
				delete(w.vms, id)
				w.mu.Unlock()
				if v != nil {
					v.end("VMM exited")
				}
			}
		}
	})
}

// close stops run; VMs still watched are not told anything more.
func (w *exitWatcher) close() { w.ep.Close() }
