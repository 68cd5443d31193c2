//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

const (
	stateNew     int32 = iota
	stateRunning       // Run has started
	stateClosed        // closed before Run: released, Run returns nil
	stateDone          // Run has returned
)

// Engine serves the faults of one userfaultfd. Run it once; Close releases it whether or not it
// ran.
type Engine struct {
	fd     *uffd.FD
	rc     syscall.RawConn
	opts   Options
	log    *slog.Logger
	states []*pageState
	tab    atomic.Pointer[table]

	// mu orders message reads against resolving ioctls: the reader holds it exclusively while
	// it reads a batch and applies the batch's events, and installers hold it shared while they
	// resolve. So a fault read before a REMOVE is either installed before the REMOVE is read
	// (and the madvise then zaps it) or sees the removal — never installed with source data
	// after the zap. While it spins the reader takes it only with TryLock (never waiting for
	// installers); parked in the netpoller it takes it for each read the fd's readiness brings.
	mu sync.RWMutex

	state    atomic.Int32
	stopping atomic.Bool
	ctx      context.Context // ends when the engine stops: cancels source reads and prefetches
	cancel   context.CancelFunc
	errOnce  sync.Once
	err      error
	done     chan struct{}
	zeroBuf  []byte // zeros for COPY where ZEROPAGE cannot be used (hugetlb)

	// Helpers: the Workers-1 installers beside the reader, started on first need.
	work        chan fault
	helpersOnce sync.Once
	helpers     sync.WaitGroup

	// Fetchers: started with the first fault a non-resident source must serve.
	fetchq    chan fetchJob
	fetchOnce sync.Once
	fetchers  sync.WaitGroup

	childMu  sync.Mutex
	children []*Engine
	childWG  sync.WaitGroup

	rec      *recording // nil unless Options.Record
	prefetch prefetchCounters
	journal  []uffd.Msg // the read buffer in durable memory (Options.Durable), or nil
}

// fault is one fault message and when it was read; a retry keeps the time, so its latency is
// measured from the first read.
type fault struct {
	pf      uffd.Pagefault
	at      time.Time
	retried bool // deferred once (EAGAIN) and being retried
}

// New prepares an engine serving regions through fd. Once New succeeds the engine owns fd and
// closes it when Run returns or, for an engine never run, on Close; if New fails, fd stays the
// caller's. Regions must not overlap and must lie within their sources.
func New(fd *uffd.FD, regions []Region, opts Options) (*Engine, error) {
	if err := validate(regions); err != nil {
		return nil, err
	}
	e := newEngine(fd, opts)
	var durable []durableBits
	if opts.Durable != nil {
		var err error
		if e.journal, durable, err = durableLayout(opts.Durable, regions); err != nil {
			return nil, err
		}
	}
	var t table
	for i, r := range regions {
		st := newPageState(r, e.opts.FaultAround)
		if durable != nil {
			// Kept as found: a Resume'd engine's are its predecessor's.
			st.removed, st.installed, st.dirty = durable[i].removed, durable[i].installed, durable[i].dirty
		}
		e.states = append(e.states, st)
		t = append(t, span{base: r.Base, first: 0, n: st.pages, st: st})
	}
	t.sort()
	e.tab.Store(&t)
	if opts.Record {
		total := 0
		for _, st := range e.states {
			st.touched = newBitmap(st.pages)
			total += st.pages
		}
		e.rec = newRecording(total)
		for _, st := range e.states {
			st.rec = e.rec
		}
	}
	if err := e.init(); err != nil {
		return nil, err
	}
	return e, nil
}

func newEngine(fd *uffd.FD, opts Options) *Engine {
	opts.Workers = max(opts.Workers, 1)
	switch {
	case opts.SpinReads == 0:
		opts.SpinReads = 32
	case opts.SpinReads < 0:
		opts.SpinReads = 0
	}
	if opts.Fetchers <= 0 {
		opts.Fetchers = 8
	}
	opts.FaultAround = opts.FaultAround.normalized()
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Engine{fd: fd, opts: opts, log: opts.Logger, done: make(chan struct{}), ctx: ctx, cancel: cancel}
}

func (e *Engine) init() error {
	rc, err := e.fd.SyscallConn()
	if err != nil {
		return err
	}
	e.rc = rc
	maxPage := uintptr(0)
	for _, st := range e.states {
		maxPage = max(maxPage, st.spec.PageSize)
	}
	if maxPage > uintptr(unix.Getpagesize()) {
		e.zeroBuf, err = unix.Mmap(-1, 0, int(maxPage), unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return fmt.Errorf("engine: zero buffer: %w", err)
		}
	}
	return nil
}

// Run serves faults until ctx is done, Close is called, the process is gone, or a fault cannot
// be served. It returns nil on ctx/Close, ErrProcessGone when the process exited, and the error
// otherwise — then the faulting process is stuck on a fault nobody will serve, and the owner
// should kill it. Before returning, Run waits for the engines of forked children (closing them
// unless the parent's process is gone: a child process can outlive its parent) and closes the
// userfaultfd. Run may be called once; a second call returns ErrRunOnce, and a call after Close
// returns nil at once.
func (e *Engine) Run(ctx context.Context) error {
	if !e.state.CompareAndSwap(stateNew, stateRunning) {
		if e.state.Load() == stateClosed {
			return nil
		}
		return ErrRunOnce
	}
	stop := context.AfterFunc(ctx, e.Close)
	defer stop()
	if err := e.newReader().run(); err != nil {
		e.fail(err)
	}
	e.stop()
	if e.work != nil {
		close(e.work) // only the reader sends on it, and it is done
	}
	e.helpers.Wait()
	if e.fetchq != nil {
		close(e.fetchq) // its producers, the reader and the helpers, are done
	}
	e.fetchers.Wait()
	if !errors.Is(e.err, ErrProcessGone) {
		e.closeChildren()
	}
	e.childWG.Wait()
	e.release()
	e.state.Store(stateDone)
	close(e.done)
	return e.err
}

// Close stops the engine and its forked children; Run returns. An engine that never ran is
// released at once. Safe to call more than once and from any goroutine; it does not wait for
// Run (Done does).
func (e *Engine) Close() {
	if e.state.CompareAndSwap(stateNew, stateClosed) {
		e.stopping.Store(true)
		e.cancel()
		e.release()
		close(e.done)
		return
	}
	e.stop()
	e.closeChildren()
}

// stop makes the reader and every installer finish: the reader is woken from the netpoller by a
// past deadline.
func (e *Engine) stop() {
	if !e.stopping.Swap(true) {
		e.cancel()
		e.fd.SetReadDeadline(time.Unix(1, 0))
	}
}

func (e *Engine) closeChildren() {
	e.childMu.Lock()
	cs := append([]*Engine(nil), e.children...)
	e.childMu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

// release frees what the engine holds; it runs once, when no goroutine of the engine is left.
func (e *Engine) release() {
	e.fd.Close()
	// A Prefetch may still be running (its caller's goroutine is not the engine's): once it
	// holds the lock it sees stopping and leaves the zero buffer alone.
	e.mu.Lock()
	if e.zeroBuf != nil {
		unix.Munmap(e.zeroBuf)
		e.zeroBuf = nil
	}
	e.mu.Unlock()
}

// Done is closed when Run has returned (or Close released an engine that never ran).
func (e *Engine) Done() <-chan struct{} { return e.done }

func (e *Engine) fail(err error) {
	e.errOnce.Do(func() { e.err = err })
	e.stop()
}

// startHelpers starts the Workers-1 installers beside the reader, once.
func (e *Engine) startHelpers() {
	e.helpersOnce.Do(func() {
		e.work = make(chan fault, 256)
		for i := 1; i < e.opts.Workers; i++ {
			e.helpers.Add(1)
			go e.helper()
		}
	})
}

// helper resolves faults the reader hands it. It does not read the userfaultfd: a fault that
// must wait on pending events (EAGAIN) is retried here after a pause, while the reader reads
// the events.
func (e *Engine) helper() {
	defer e.helpers.Done()
	in := e.newInstaller()
	for f := range e.work {
		if e.stopping.Load() {
			continue // drain; the engine is going
		}
		if err := in.resolve(f); err != nil {
			e.fail(err)
			continue
		}
		for len(in.deferred) > 0 && !e.stopping.Load() {
			time.Sleep(20 * time.Microsecond)
			if err := in.retryDeferred(); err != nil {
				e.fail(err)
			}
		}
	}
}

// Stats returns a snapshot of every region's counters.
func (e *Engine) Stats() []Stats {
	out := make([]Stats, len(e.states))
	for i, st := range e.states {
		out[i] = st.stats.snapshot(st.spec.Name)
	}
	return out
}

// Dirty reports the pages of the named region seen written (WP faults), as page indexes.
func (e *Engine) Dirty(region string) []int {
	for _, st := range e.states {
		if st.spec.Name == region {
			var out []int
			for i := st.dirty.nextSet(0, st.pages); i < st.pages; i = st.dirty.nextSet(i+1, st.pages) {
				out = append(out, i)
			}
			return out
		}
	}
	return nil
}

// Installed reports how many pages of each region are installed now.
func (e *Engine) Installed() map[string]int {
	m := map[string]int{}
	for _, st := range e.states {
		m[st.spec.Name] = st.installed.count()
	}
	return m
}

// Recorded returns the pages of the source image that faults touched while Options.Record was
// on, in the order of their first touch; nil if the engine does not record.
func (e *Engine) Recorded() []Touch {
	if e.rec == nil {
		return nil
	}
	return e.rec.order()
}

// StopRecording ends the recording (a --record-window elapsed); Recorded keeps what it has.
func (e *Engine) StopRecording() {
	if e.rec != nil {
		e.rec.on.Store(false)
	}
}
