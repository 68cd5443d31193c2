//go:build linux

package uffd

import (
	"errors"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reader reads messages from an FD into caller-owned buffers, many per read(2), without
// allocating. On a non-blocking fd (the default) a Read with nothing pending parks the goroutine
// in Go's netpoller; Close on the FD wakes it with ErrClosed. On a blocking fd Read blocks its
// thread in read(2).
//
// A Reader is for one goroutine at a time; make one per reading goroutine.
type Reader struct {
	f      *FD
	rc     syscall.RawConn
	buf    []byte
	n      int
	errno  error
	readFn func(fd uintptr) bool // bound once, so Read does not allocate a closure
}

// NewReader returns a Reader of f's messages.
func (f *FD) NewReader() (*Reader, error) {
	r := &Reader{f: f}
	if !f.blocking && f.file != nil {
		rc, err := f.file.SyscallConn()
		if err != nil {
			return nil, err
		}
		r.rc = rc
	}
	r.readFn = r.readOnce
	return r, nil
}

func (r *Reader) readOnce(fd uintptr) bool {
	for {
		n, err := unix.Read(int(fd), r.buf)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return false // park in the netpoller until the fd is readable
		}
		r.n, r.errno = n, err
		return true
	}
}

// Read fills msgs with at least one message, waiting for one if none is pending, and returns how
// many it read. len(msgs) must be at least 1.
func (r *Reader) Read(msgs []Msg) (int, error) {
	if len(msgs) == 0 {
		return 0, errors.New("uffd: Read with an empty buffer")
	}
	if r.f.life.closed() {
		return 0, ErrClosed
	}
	if r.rc == nil && !r.f.blocking {
		// Made before the handshake: the fd joins the netpoller only after it (FD.initFile).
		if r.f.file == nil {
			return 0, errNoHandshake("read")
		}
		rc, err := r.f.file.SyscallConn()
		if err != nil {
			return 0, err
		}
		r.rc = rc
	}
	r.buf = unsafe.Slice(&msgs[0][0], len(msgs)*MsgSize)
	r.n, r.errno = 0, nil
	if r.rc == nil {
		// Blocking: hold the fd across read(2), so Close cannot free its number meanwhile (the
		// read, not Close, then closes it; see FD.Close).
		if !r.f.life.acquire() {
			r.buf = nil
			return 0, ErrClosed
		}
		r.readFn(uintptr(r.f.fd))
		for r.errno == nil && r.n == 0 { // a blocking fd returns EAGAIN only if made non-blocking elsewhere
			r.readFn(uintptr(r.f.fd))
		}
		r.f.life.release()
	} else if err := r.rc.Read(r.readFn); err != nil {
		r.buf = nil
		return 0, r.mapErr(err)
	}
	r.buf = nil
	if r.errno != nil {
		return 0, r.mapErr(r.errno)
	}
	return r.n / MsgSize, nil
}

// TryRead reads the messages pending now, without waiting: 0 and nil when there are none.
func (r *Reader) TryRead(msgs []Msg) (int, error) {
	if len(msgs) == 0 {
		return 0, errors.New("uffd: TryRead with an empty buffer")
	}
	if !r.f.life.acquire() {
		return 0, ErrClosed
	}
	defer r.f.life.release()
	buf := unsafe.Slice(&msgs[0][0], len(msgs)*MsgSize)
	for {
		var n int
		var err error
		if r.f.blocking {
			// read(2) of a blocking fd waits for a message (and poll(2) reports POLLERR on
			// one): RWF_NOWAIT makes this one read non-blocking.
			n, err = unix.Preadv2(r.f.fd, [][]byte{buf}, -1, unix.RWF_NOWAIT)
		} else {
			n, err = unix.Read(r.f.fd, buf)
		}
		switch err {
		case nil:
			return n / MsgSize, nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return 0, nil
		case unix.EOPNOTSUPP:
			return 0, &OpError{Op: "read", Errno: unix.EOPNOTSUPP, kind: ErrUnsupported,
				Detail: "this kernel cannot read a blocking userfaultfd without waiting (RWF_NOWAIT)"}
		}
		return 0, r.mapErr(err)
	}
}

func (r *Reader) mapErr(err error) error {
	if r.f.life.closed() {
		return ErrClosed
	}
	if errors.Is(err, unix.EINVAL) {
		return &OpError{Op: "read", Errno: unix.EINVAL, kind: ErrInvalid, Detail: "handshake (UFFDIO_API) not done"}
	}
	return err
}

// SetReadDeadline makes Read on a non-blocking fd return os.ErrDeadlineExceeded after t; the
// zero time clears it.
func (f *FD) SetReadDeadline(t time.Time) error {
	if f.file == nil {
		return errNoHandshake("SetReadDeadline")
	}
	return f.file.SetReadDeadline(t)
}
