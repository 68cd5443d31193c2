//go:build linux

package engine

import (
	"fmt"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// reader is the one goroutine that reads the userfaultfd (Run's own). It applies each batch's
// events under the exclusive lock, then resolves the batch's faults as an installer, handing
// all but the first to the helpers when there are any. Its buffers are allocated once.
type reader struct {
	e       *Engine
	in      *installer
	msgs    []uffd.Msg
	n       int
	readErr error
	readFn  func(fd uintptr) bool
	forks   []int // child uffds of the batch's FORK events, started once the lock is released
	clones  []forkState
	at      time.Time // when the batch was read
	spin    int       // current spin budget, adapted between 1 and Options.SpinReads
	// yieldScore says how well looking again after sched_yield(2) has paid lately (0..4): it
	// does when the faulting thread shares the reader's CPU. parks counts spins that found
	// nothing.
	yieldScore int
	parks      uint
	pfd        []unix.PollFd
	locked     bool // PollThread: this goroutine holds its OS thread
	// journaled is the bytes of the durable journal (msgs, when Options.Durable is set) that
	// the last read filled: cleared before the next read, so that what a successor finds there
	// is the last batch read, and nothing older.
	journaled int
}

func (e *Engine) newReader() *reader {
	r := &reader{e: e, in: e.newInstaller(), msgs: e.journal, spin: e.opts.SpinReads}
	if r.msgs == nil {
		r.msgs = make([]uffd.Msg, JournalMsgs)
	}
	r.readFn = r.readLocked
	r.pfd = []unix.PollFd{{Fd: int32(e.fd.Fd()), Events: unix.POLLIN}}
	return r
}

func (r *reader) run() error {
	e := r.e
	defer func() {
		if r.locked {
			runtime.UnlockOSThread()
		}
	}()
	for !e.stopping.Load() {
		r.n, r.readErr = 0, nil
		if len(r.in.deferred) > 0 {
			// Faults wait on events: read without parking (the events make the fd readable
			// anyway), then retry them; back off briefly when nothing new came — the flag that
			// makes ioctls fail stays up until the madvise caller runs again, after the read.
			if !r.tryRead() {
				time.Sleep(20 * time.Microsecond)
			}
		} else if err := r.wait(); err != nil {
			return err
		}
		if r.readErr != nil {
			r.dropForks()
			return r.readErr
		}
		r.startForks()
		if err := r.serveBatch(); err != nil {
			return err
		}
		if err := r.in.retryDeferred(); err != nil {
			return err
		}
	}
	return nil
}

// ready reports whether the fd has messages, without reading (and without the lock).
func (r *reader) ready(timeoutMs int) bool {
	n, err := unix.Poll(r.pfd, timeoutMs)
	return err == nil && n > 0
}

// tryRead reads a batch if one is pending; it never blocks.
func (r *reader) tryRead() bool {
	if !r.ready(0) {
		return false
	}
	return r.readLocked(uintptr(r.e.fd.Fd()))
}

// wait returns with a batch read (r.n > 0), or with r.n == 0 when the engine stops.
//
// Before parking it spins: it looks again, up to r.spin times, yielding the P between looks (a
// fault from a thread on another CPU arrives within microseconds), then — while that pays —
// once more after yielding the CPU itself (the faulting thread may be waiting for this CPU). A look reads
// under the exclusive lock only when the lock is free at once; while installers hold it, the
// look is a poll(2), so spinning never holds them up.
func (r *reader) wait() error {
	e := r.e
	// No spinning while a prefetch runs: it wants every CPU, and the faults it leaves are few.
	if e.opts.SpinReads > 0 && e.prefetch.running.Load() == 0 {
		for spin := 0; spin < r.spin; spin++ {
			if e.stopping.Load() {
				return nil
			}
			if r.look() {
				if spin > 0 {
					r.spin = min(r.spin*2, e.opts.SpinReads)
				}
				return nil
			}
			runtime.Gosched()
		}
		if r.spin > 1 {
			r.spin /= 2
		}
		// Yielding the CPU costs a system call and, when the faulting thread runs elsewhere,
		// finds nothing: do it while it pays, and otherwise only every 16th time, to notice when
		// it starts to.
		if r.yieldScore > 0 || r.parks%16 == 0 {
			unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
			if r.look() {
				r.yieldScore = min(r.yieldScore+1, 4)
				return nil
			}
			r.yieldScore = max(r.yieldScore-1, 0)
		}
		r.parks++
	}
	if e.opts.PollThread {
		return r.pollWait()
	}
	if err := e.rc.Read(r.readFn); err != nil {
		if e.stopping.Load() {
			return nil
		}
		return fmt.Errorf("engine: read userfaultfd: %w", err)
	}
	return nil
}

// look reads a batch if one is pending, without blocking and without waiting for the lock.
func (r *reader) look() bool {
	if !r.e.mu.TryLock() {
		return r.tryRead() // installers at work: ask poll(2) first, then wait for the lock
	}
	got, _ := r.readHeld(uintptr(r.e.fd.Fd()))
	return got
}

// pollWait waits for messages in poll(2) on this goroutine's own thread, then reads a batch.
func (r *reader) pollWait() error {
	e := r.e
	if !r.locked {
		runtime.LockOSThread()
		r.locked = true
	}
	for !e.stopping.Load() {
		// A timeout so that Close is noticed; messages wake poll at once.
		n, err := unix.Poll(r.pfd, 50)
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("engine: poll userfaultfd: %w", err)
		}
		if n > 0 && r.readLocked(uintptr(e.fd.Fd())) {
			return nil
		}
	}
	return nil
}

// readLocked reads one batch under the exclusive lock and applies its events before releasing
// it. It returns false when nothing was pending (the netpoller then parks the reader).
func (r *reader) readLocked(fd uintptr) bool {
	for {
		if r.e.stopping.Load() {
			r.n = 0
			return true
		}
		r.e.mu.Lock()
		if got, again := r.readHeld(fd); !again {
			return got
		}
	}
}

// readHeld reads one batch with e.mu held exclusively, applies its events and releases the
// lock. It reports whether it read a batch (or failed: r.readErr), and whether to try again
// (EINTR).
func (r *reader) readHeld(fd uintptr) (got, again bool) {
	e := r.e
	buf := unsafe.Slice(&r.msgs[0][0], len(r.msgs)*uffd.MsgSize)
	if r.journaled > 0 {
		// The last batch was applied and served (faults are copied out of msgs): forget it.
		clear(buf[:r.journaled])
		r.journaled = 0
	}
	n, err := unix.Read(int(fd), buf)
	switch err {
	case nil:
	case unix.EAGAIN:
		e.mu.Unlock()
		return false, false
	case unix.EINTR:
		e.mu.Unlock()
		return false, true
	default:
		e.mu.Unlock()
		r.n, r.readErr = 0, fmt.Errorf("engine: read userfaultfd: %w", err)
		return true, false
	}
	r.n = n / uffd.MsgSize
	if e.journal != nil {
		r.journaled = n
	}
	r.at = time.Now()
	r.readErr = r.applyEvents()
	e.mu.Unlock()
	return true, false
}

// applyEvents applies the batch's non-fault events; the caller holds e.mu exclusively. A FORK
// only snapshots the parent's page state here; the child engine is set up after the lock is
// released (it reads /proc, maps memory and calls OnFork).
func (r *reader) applyEvents() error {
	e := r.e
	for i := 0; i < r.n; i++ {
		m := &r.msgs[i]
		switch m.Event() {
		case uffd.EventPagefault:
		case uffd.EventRemove, uffd.EventUnmap:
			e.applyRemoval(m)
		case uffd.EventRemap:
			rm := m.Remap()
			t := e.tab.Load().moved(rm.From, rm.To, rm.Len)
			e.tab.Store(&t)
		case uffd.EventFork:
			r.forks = append(r.forks, m.ForkFD())
			r.clones = append(r.clones, e.cloneStates())
		default:
			return fmt.Errorf("engine: unexpected message %v", m)
		}
	}
	return nil
}

// handoffBatch is the smallest batch whose faults the reader shares with helpers. Waking a parked
// helper costs about what it saves on a few faults (measured on a 2-vCPU machine with 8 threads
// faulting at random: handing off every batch of 2 or more made it ~8% slower than one worker),
// so helpers are woken only when a batch shows the reader falling behind.
const handoffBatch = 16

// serveBatch resolves the batch's faults. With helpers and a large batch, the first fault is the
// reader's and the rest go to whoever is free — the reader included, once it is done with its own.
func (r *reader) serveBatch() error {
	e := r.e
	first := true
	handed := false
	for i := 0; i < r.n; i++ {
		m := &r.msgs[i]
		if m.Event() != uffd.EventPagefault {
			continue
		}
		f := fault{pf: m.Pagefault(), at: r.at}
		if !first && e.opts.Workers > 1 && r.n >= handoffBatch {
			e.startHelpers()
			select {
			case e.work <- f:
				handed = true
				continue
			default: // all busy: serve it here
			}
		}
		first = false
		if err := r.in.resolve(f); err != nil {
			return err
		}
	}
	for handed {
		select {
		case f := <-e.work:
			if err := r.in.resolve(f); err != nil {
				return err
			}
		default:
			handed = false
		}
	}
	return nil
}

// applyRemoval applies a REMOVE or UNMAP message: its pages read zeros from now on, and an
// UNMAP's are no longer ours.
func (e *Engine) applyRemoval(m *uffd.Msg) {
	rg := m.Range()
	e.remove(rg.Start, rg.End)
	if m.Event() == uffd.EventUnmap {
		t := e.tab.Load().without(rg.Start, rg.End)
		e.tab.Store(&t)
	}
}

// remove marks [start, end) removed: its pages read as zeros from now on.
func (e *Engine) remove(start, end uintptr) {
	t := *e.tab.Load()
	for i := range t {
		s := &t[i]
		lo, hi := max(s.base, start), min(s.end(), end)
		if lo >= hi {
			continue
		}
		ps := s.st.spec.PageSize
		a := s.first + int((lo-s.base)/ps)
		b := s.first + int((hi-s.base+ps-1)/ps)
		s.st.removed.setRange(a, b)
		s.st.installed.clearRange(a, b)
		s.st.stats.pagesRemoved.Add(uint64(b - a))
	}
}
