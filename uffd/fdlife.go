//go:build linux

package uffd

import "sync/atomic"

// fdLife keeps an fd number open while a system call that names it is on its way: a number
// checked "not closed" and then used could otherwise be closed in between and handed by the
// kernel to the next file this process opens, and the call would act on that file. Every use
// of the number holds a reference (a compare-and-swap and an add, no allocation); Close marks the fd closing,
// after which no reference is granted, and the number is closed only once the last reference is
// dropped. This is what os.File does internally for its own reads and writes (internal/poll's
// fdMutex); ioctls through syscall.RawConn.Control would get the same guarantee, but at the cost
// of a closure allocated per call.
type fdLife struct {
	state atomic.Uint64 // fdClosing | the number of references held
	// drained is closed by the release that drops the last reference after Close has begun,
	// when Close waits (see closeOnRelease).
	drained chan struct{}
	// closeOnRelease: Close does not wait for references; the last release closes the fd. For
	// blocking fds, where a reference may be held by a read(2) waiting for a message.
	closeOnRelease bool
	closeFn        func() error
}

const fdClosing = 1 << 63

func newFDLife(closeOnRelease bool, closeFn func() error) fdLife {
	return fdLife{drained: make(chan struct{}), closeOnRelease: closeOnRelease, closeFn: closeFn}
}

// acquire takes a reference, or reports false once Close has begun. It never increments a
// closing state, so exactly one release can bring the count to zero after Close.
func (l *fdLife) acquire() bool {
	for {
		s := l.state.Load()
		if s&fdClosing != 0 {
			return false
		}
		if l.state.CompareAndSwap(s, s+1) {
			return true
		}
	}
}

// release drops a reference taken by acquire.
func (l *fdLife) release() {
	if l.state.Add(^uint64(0)) == fdClosing { // the last reference, and Close has begun
		if l.closeOnRelease {
			l.closeFn()
		} else {
			close(l.drained)
		}
	}
}

// closed reports whether Close has begun.
func (l *fdLife) closed() bool { return l.state.Load()&fdClosing != 0 }

// close marks the fd closing and closes it once no reference is held: at once if none is, else
// after waiting for the holders (or, with closeOnRelease, leaving it to the last of them and
// returning nil). A second close returns nil.
func (l *fdLife) close() error {
	old := l.state.Or(fdClosing)
	switch {
	case old&fdClosing != 0:
		return nil
	case old == 0:
		return l.closeFn()
	case l.closeOnRelease:
		return nil
	}
	<-l.drained
	return l.closeFn()
}
