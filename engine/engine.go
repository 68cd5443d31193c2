//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// Options tune an Engine. The zero value serves one page per fault with one worker.
type Options struct {
	// Workers is the number of goroutines reading and resolving faults (default 1). Each reads
	// its own batches; more than the number of CPUs rarely helps.
	Workers int
	// FaultAround sets how many pages a fault installs (default 1, fixed).
	FaultAround FaultAround
	// Fetchers is the number of goroutines reading sources that are not resident (default 8).
	Fetchers int
	// SpinReads is how many times at most a worker that finds no message yields and reads again
	// before parking in the netpoller (default 32; negative: never). Faults that arrive back to
	// back — a thread resumed by one install faults on the next page microseconds later — are
	// then read without a netpoller round trip. The budget adapts: it doubles when a spin finds
	// a message and halves when it does not, so an idle engine stops spending CPU on it.
	SpinReads int
	// PollThread makes each worker keep an OS thread blocked in poll(2) on the fd instead of
	// parking in the netpoller: the lowest wake-up latency (the C handler's path), at the cost
	// of one thread per worker.
	PollThread bool
	// Logger receives events worth an operator's attention (default: slog.Default()).
	Logger *slog.Logger
	// OnFork is called with the engine that serves a forked child's userfaultfd (FORK event),
	// after it started. The child engine runs until its fd's process is gone or the parent stops.
	OnFork func(child *Engine)
}

// ErrProcessGone is returned by Run when the process owning the memory exited while faults
// were being served.
var ErrProcessGone = uffd.ErrProcessGone

// Engine serves the faults of one userfaultfd.
type Engine struct {
	fd     *uffd.FD
	rc     syscall.RawConn
	opts   Options
	log    *slog.Logger
	states []*pageState
	tab    atomic.Pointer[table]

	// mu orders message reads against resolving ioctls: a worker holds it exclusively while it
	// reads a batch and applies the batch's events, and shared while it installs pages. So a
	// fault read before a REMOVE is either installed before the REMOVE is read (and the madvise
	// then zaps it) or sees the removal — never installed with source data after the zap.
	mu sync.RWMutex

	stopping atomic.Bool
	errOnce  sync.Once
	err      error
	done     chan struct{}
	fetchq   chan fetchJob
	zeroBuf  []byte // zeros for COPY where ZEROPAGE cannot be used (hugetlb)

	childMu  sync.Mutex
	children []*Engine
	wg       sync.WaitGroup
}

// New prepares an engine serving regions through fd. Once New succeeds the engine owns fd and
// closes it when Run returns; if New fails, fd stays the caller's. Regions must not overlap and
// must lie within their sources.
func New(fd *uffd.FD, regions []Region, opts Options) (*Engine, error) {
	if err := validate(regions); err != nil {
		return nil, err
	}
	e := newEngine(fd, opts)
	var t table
	for _, r := range regions {
		st := newPageState(r, e.opts.FaultAround)
		e.states = append(e.states, st)
		t = append(t, span{base: r.Base, first: 0, n: st.pages, st: st})
	}
	t = t.moved(0, 0, 0) // sorts
	e.tab.Store(&t)
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
	return &Engine{fd: fd, opts: opts, log: opts.Logger, done: make(chan struct{})}
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
	e.fetchq = make(chan fetchJob, 1024)
	return nil
}

// Run serves faults until ctx is done, Close is called, the process is gone, or a fault cannot
// be served. It returns nil on ctx/Close, ErrProcessGone when the process exited, and the error
// otherwise — then the faulting process is stuck on a fault nobody will serve, and the owner
// should kill it. Run closes the userfaultfd before returning.
func (e *Engine) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { e.Close() })
	defer stop()
	for i := 0; i < e.opts.Fetchers; i++ {
		e.wg.Add(1)
		go e.fetcher()
	}
	var workers sync.WaitGroup
	for i := 0; i < e.opts.Workers; i++ {
		workers.Add(1)
		go func() {
			defer workers.Done()
			if err := e.newWorker().run(); err != nil {
				e.fail(err)
			}
		}()
	}
	workers.Wait()
	e.stopping.Store(true)
	close(e.fetchq)
	e.wg.Wait()
	e.childMu.Lock()
	for _, c := range e.children {
		c.Close()
	}
	e.childMu.Unlock()
	e.fd.Close()
	if e.zeroBuf != nil {
		unix.Munmap(e.zeroBuf)
	}
	close(e.done)
	return e.err
}

// Close stops the engine; Run returns. Safe to call more than once and from any goroutine.
func (e *Engine) Close() {
	if !e.stopping.Swap(true) {
		// Wake parked workers: a past deadline makes their read return.
		e.fd.SetReadDeadline(time.Unix(1, 0))
	}
}

// Done is closed when Run has returned.
func (e *Engine) Done() <-chan struct{} { return e.done }

func (e *Engine) fail(err error) {
	e.errOnce.Do(func() { e.err = err })
	e.Close()
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

// worker reads batches and resolves faults. Its buffers are allocated once.
type worker struct {
	e        *Engine
	msgs     []uffd.Msg
	n        int
	readErr  error
	readFn   func(fd uintptr) bool
	deferred []uffd.Pagefault
	retry    []uffd.Pagefault
	batchAt  time.Time
	dupAddr  uintptr
	dupRun   int
	job      fetchJob // a fetch to queue once the lock is released
	hasJob   bool
	spin     int  // current spin budget, adapted between 1 and Options.SpinReads
	locked   bool // PollThread: this goroutine holds its OS thread
	pfd      []unix.PollFd
}

func (e *Engine) newWorker() *worker {
	w := &worker{e: e, msgs: make([]uffd.Msg, 64), deferred: make([]uffd.Pagefault, 0, 64), retry: make([]uffd.Pagefault, 0, 64)}
	w.readFn = w.readOnce
	w.spin = e.opts.SpinReads
	return w
}

func (w *worker) run() error {
	e := w.e
	for !e.stopping.Load() {
		if len(w.deferred) > 0 {
			// Faults wait on events: read without parking (the events make the fd readable
			// anyway), then retry them; back off briefly when nothing new came.
			if !w.readOnce(uintptr(e.fd.Fd())) {
				time.Sleep(20 * time.Microsecond)
			} else if w.readErr != nil {
				return w.readErr
			}
		} else if e.opts.PollThread {
			if err := w.pollRead(); err != nil {
				return err
			}
		} else {
			w.n, w.readErr = 0, nil
			if err := e.rc.Read(w.readFn); err != nil {
				if e.stopping.Load() {
					return nil
				}
				return fmt.Errorf("engine: read userfaultfd: %w", err)
			}
			if w.readErr != nil {
				return w.readErr
			}
		}
		if err := w.serveBatch(); err != nil {
			return err
		}
		if len(w.deferred) > 0 {
			w.retry, w.deferred = w.deferred, w.retry[:0]
			for _, pf := range w.retry {
				if err := w.resolve(pf); err != nil {
					return err
				}
			}
			w.retry = w.retry[:0]
		}
	}
	return nil
}

// pollRead waits for messages in poll(2) on this goroutine's own thread, then reads a batch.
func (w *worker) pollRead() error {
	e := w.e
	if !w.locked {
		runtime.LockOSThread()
		w.locked = true
		w.pfd = []unix.PollFd{{Fd: int32(e.fd.Fd()), Events: unix.POLLIN}}
	}
	for !e.stopping.Load() {
		w.n, w.readErr = 0, nil
		if w.readOnce(uintptr(e.fd.Fd())) {
			return w.readErr
		}
		// A timeout so Close is noticed; messages wake poll at once.
		if _, err := unix.Poll(w.pfd, 50); err != nil && err != unix.EINTR {
			return fmt.Errorf("engine: poll userfaultfd: %w", err)
		}
	}
	w.n = 0
	return nil
}

// readOnce reads one batch under the exclusive lock and applies its events before releasing it.
// It returns false (lock released) when nothing is pending.
func (w *worker) readOnce(fd uintptr) bool {
	e := w.e
	buf := unsafe.Slice(&w.msgs[0][0], len(w.msgs)*uffd.MsgSize)
	for spin := 0; ; spin++ {
		if e.stopping.Load() {
			w.n = 0
			return true
		}
		e.mu.Lock()
		n, err := unix.Read(int(fd), buf)
		if err == unix.EAGAIN {
			e.mu.Unlock()
			if spin < w.spin {
				runtime.Gosched()
				continue
			}
			if spin > 0 {
				w.spin = max(w.spin/2, 1)
			}
			w.n = 0
			return false
		}
		if err == unix.EINTR {
			e.mu.Unlock()
			continue
		}
		if err != nil {
			e.mu.Unlock()
			w.n, w.readErr = 0, fmt.Errorf("engine: read userfaultfd: %w", err)
			return true
		}
		if spin > 0 {
			w.spin = min(w.spin*2, e.opts.SpinReads)
		}
		w.n = n / uffd.MsgSize
		w.batchAt = time.Now()
		err = w.applyEvents()
		e.mu.Unlock()
		if err != nil {
			w.readErr = err
		}
		return true
	}
}

// applyEvents applies the batch's non-fault events; the caller holds e.mu exclusively.
func (w *worker) applyEvents() error {
	e := w.e
	for i := 0; i < w.n; i++ {
		m := &w.msgs[i]
		switch m.Event() {
		case uffd.EventPagefault:
		case uffd.EventRemove:
			r := m.Range()
			e.remove(r.Start, r.End)
		case uffd.EventUnmap:
			r := m.Range()
			e.remove(r.Start, r.End)
			t := e.tab.Load().without(r.Start, r.End)
			e.tab.Store(&t)
		case uffd.EventRemap:
			r := m.Remap()
			t := e.tab.Load().moved(r.From, r.To, r.Len)
			e.tab.Store(&t)
		case uffd.EventFork:
			if err := e.fork(m.ForkFD()); err != nil {
				return err
			}
		default:
			return fmt.Errorf("engine: unexpected message %v", m)
		}
	}
	return nil
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

func (e *Engine) fork(fd int) error {
	cfd, err := uffd.NewFD(fd, false)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("engine: fork event: %w", err)
	}
	c := newEngine(cfd, e.opts)
	clones := map[*pageState]*pageState{}
	var t table
	for _, s := range *e.tab.Load() {
		cs := clones[s.st]
		if cs == nil {
			cs = s.st.clone(e.opts.FaultAround)
			clones[s.st] = cs
			c.states = append(c.states, cs)
		}
		t = append(t, span{base: s.base, first: s.first, n: s.n, st: cs})
	}
	c.tab.Store(&t)
	if err := c.init(); err != nil {
		cfd.Close()
		return err
	}
	e.childMu.Lock()
	e.children = append(e.children, c)
	e.childMu.Unlock()
	go func() {
		if err := c.Run(context.Background()); err != nil && !errors.Is(err, ErrProcessGone) {
			e.log.Error("engine: serving forked child failed", "err", err)
		}
	}()
	if e.opts.OnFork != nil {
		e.opts.OnFork(c)
	}
	return nil
}

func (w *worker) serveBatch() error {
	for i := 0; i < w.n; i++ {
		m := &w.msgs[i]
		if m.Event() != uffd.EventPagefault {
			continue
		}
		if err := w.resolve(m.Pagefault()); err != nil {
			return err
		}
	}
	return nil
}

var errStop = errors.New("engine: stop")

// resolve serves one fault message.
func (w *worker) resolve(pf uffd.Pagefault) error {
	e := w.e
	e.mu.RLock()
	err := w.resolveLocked(pf)
	e.mu.RUnlock()
	if w.hasJob {
		// Queued outside the lock: a full queue must not block a fetcher that needs it.
		w.hasJob = false
		e.fetchq <- w.job
	}
	if err == errStop {
		e.fail(ErrProcessGone)
		return nil
	}
	return err
}

func (w *worker) resolveLocked(pf uffd.Pagefault) error {
	e := w.e
	sp := e.tab.Load().lookup(pf.Address)
	if sp == nil {
		// Not ours (any more): unmapped, or moved by a REMAP read after this fault. Waking lets
		// the thread retry; if the page is registered elsewhere its fault comes back with the
		// new address.
		return w.unknown(pf.Address)
	}
	st := sp.st
	ps := st.spec.PageSize
	page := pf.Address &^ (ps - 1)
	idx := sp.first + int((page-sp.base)/ps)
	st.stats.faults.Add(1)
	switch {
	case pf.Flags&uffd.FaultWP != 0:
		st.stats.wp.Add(1)
		st.dirty.setRange(idx, idx+1)
		err := e.fd.Writeprotect(page, ps, 0)
		return w.check(err, st, pf, page, ps, idx)
	case pf.Flags&uffd.FaultMinor != 0:
		st.stats.minor.Add(1)
		_, err := e.fd.Continue(page, ps, 0)
		if errors.Is(err, uffd.ErrExist) {
			err = e.fd.Wake(page, ps)
		}
		return w.check(err, st, pf, page, ps, idx)
	}
	st.stats.missing.Add(1)
	if st.installed.get(idx) {
		return w.duplicate(st, pf, page, ps, idx)
	}
	if page != w.dupAddr {
		// A fault on another page ends a run of duplicates. Not one on the same page: after
		// duplicate forgets the page, the run must go on counting until the page really is
		// installed, or an empty hugetlb pool (COPY says EEXIST forever) loops forever.
		w.dupRun = 0
	}
	if st.fetching.get(idx) {
		return nil // the fetch in flight installs and wakes it
	}
	if st.removed.get(idx) {
		return w.zeroFill(st, pf, page, ps, idx)
	}
	// The window: fault-around pages after the faulting one, stopping before any page that is
	// installed, removed or being fetched, and at the end of the span.
	limit := min(idx+st.fa.pages(idx), sp.first+sp.n)
	limit = st.installed.nextSet(idx+1, limit)
	limit = st.removed.nextSet(idx+1, limit)
	limit = st.fetching.nextSet(idx+1, limit)
	srcOff := st.spec.Offset + int64(idx)*int64(ps)
	length := uintptr(limit-idx) * ps
	if st.zeros != nil {
		if z := uintptr(st.zeros.ZeroRun(srcOff, int64(length))) / ps * ps; z > 0 {
			return w.zeroRun(st, pf, page, z, ps, idx)
		}
	}
	if st.resident == nil {
		st.fetching.setRange(idx, limit)
		w.job, w.hasJob = fetchJob{st: st, addr: page, idx: idx, pages: limit - idx, at: w.batchAt}, true
		return nil
	}
	src := st.resident.Bytes(srcOff, int64(length))
	n, err := e.fd.Copy(page, uintptr(unsafe.Pointer(&src[0])), length, 0)
	runtime.KeepAlive(src)
	if done := int(n / ps); done > 0 {
		w.dupRun = 0
		st.recordInstall(idx, done, uint64(n), w.batchAt)
		if err != nil && errors.Is(err, uffd.ErrPartial) {
			return nil // the faulting page is in; the rest stopped at a mapped page
		}
	}
	return w.check(err, st, pf, page, ps, idx)
}

// check handles the errors of a resolving ioctl for the faulting page.
func (w *worker) check(err error, st *pageState, pf uffd.Pagefault, page, ps uintptr, idx int) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, uffd.ErrExist):
		// Mapped already (another thread, an earlier fault-around): done, wake the waiters.
		st.installed.setRange(idx, idx+1)
		return w.e.fd.Wake(page, ps)
	case errors.Is(err, uffd.ErrEventsPending):
		st.stats.retries.Add(1)
		w.deferred = append(w.deferred, pf)
		return nil
	case errors.Is(err, uffd.ErrNotRegistered):
		// Unregistered or unmapped under us; a thread may sleep on it (pitfall 1): wake.
		return w.e.fd.Wake(page, ps)
	case errors.Is(err, uffd.ErrProcessGone):
		return errStop
	}
	st.stats.errors.Add(1)
	return fmt.Errorf("engine: region %q: fault at %#x: %w", st.spec.Name, pf.Address, err)
}

func (w *worker) unknown(addr uintptr) error {
	e := w.e
	ps := uintptr(unix.Getpagesize())
	if addr == w.dupAddr {
		w.dupRun++
		if w.dupRun > 1000 {
			return fmt.Errorf("engine: faults at %#x keep coming and it is in no region", addr)
		}
	} else {
		w.dupAddr, w.dupRun = addr, 1
	}
	err := e.fd.Wake(addr&^(ps-1), ps)
	if errors.Is(err, uffd.ErrProcessGone) {
		return errStop
	}
	return err
}

// duplicate handles a fault on a page already installed: every faulting thread reports its own
// fault, and signals make threads fault again. Wake and move on — unless the same page keeps
// coming back, which is the empty-hugetlb-pool livelock (COPY says EEXIST, nothing is mapped).
func (w *worker) duplicate(st *pageState, pf uffd.Pagefault, page, ps uintptr, idx int) error {
	st.stats.duplicates.Add(1)
	if page == w.dupAddr {
		w.dupRun++
	} else {
		w.dupAddr, w.dupRun = page, 1
	}
	switch {
	case w.dupRun == 64:
		// Maybe we were wrong that it is installed: forget and install it again.
		st.installed.clearRange(idx, idx+1)
	case w.dupRun > 256:
		if ps > uintptr(unix.Getpagesize()) {
			if h, err := memory.ReadHugePages(); err == nil && h.Free == 0 {
				return fmt.Errorf("engine: region %q: hugetlb pool exhausted (0 free of %d): page %#x cannot be installed; reserve more in /proc/sys/vm/nr_hugepages", st.spec.Name, h.Total, page)
			}
		}
		return fmt.Errorf("engine: region %q: page %#x keeps faulting after it was installed", st.spec.Name, page)
	}
	if st.removed.get(idx) {
		// A released page can be gone although we installed it: the kernel zaps the range only
		// after we read its REMOVE, so zeros installed in between (for a fault queued meanwhile)
		// are zapped too and the bit lies. Waking would send the thread straight back, over and
		// over; install zeros again instead (EEXIST: it is there, wake). The bit is cleared so
		// that an EAGAIN retry comes back as a fresh fault, not as another duplicate.
		st.installed.clearRange(idx, idx+1)
		return w.zeroFill(st, pf, page, ps, idx)
	}
	err := w.e.fd.Wake(page, ps)
	if errors.Is(err, uffd.ErrProcessGone) {
		return errStop
	}
	return err
}

// zeroFill installs a zero page at a removed page.
func (w *worker) zeroFill(st *pageState, pf uffd.Pagefault, page, ps uintptr, idx int) error {
	return w.zeroRun(st, pf, page, ps, ps, idx)
}

// zeroRun installs length bytes of zeros from page: ZEROPAGE where the memory supports it, a COPY
// of zeros on hugetlb.
func (w *worker) zeroRun(st *pageState, pf uffd.Pagefault, page, length, ps uintptr, idx int) error {
	e := w.e
	var n uintptr
	var err error
	if ps > uintptr(unix.Getpagesize()) {
		length = ps // one huge page at a time from the zero buffer
		n, err = e.fd.Copy(page, uintptr(unsafe.Pointer(&e.zeroBuf[0])), ps, 0)
	} else {
		n, err = e.fd.Zeropage(page, length, 0)
	}
	if done := int(n / ps); done > 0 {
		w.dupRun = 0
		st.stats.pagesZero.Add(uint64(done))
		st.recordInstall(idx, done, 0, w.batchAt)
		if err != nil && errors.Is(err, uffd.ErrPartial) {
			return nil
		}
	}
	return w.check(err, st, pf, page, ps, idx)
}
