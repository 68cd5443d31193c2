package engine

import (
	"errors"
	"log/slog"
	"time"

	"github.com/faultline-go/faultline/uffd"
)

// Options tune an Engine. The zero value serves one page per fault from one goroutine.
type Options struct {
	// Workers is the number of goroutines resolving faults (default 1). One of them, Run's own,
	// is the only reader of the userfaultfd; the others start when a batch first brings many
	// faults at once (16), and take faults from the reader. More than the number of CPUs rarely
	// helps.
	Workers int
	// FaultAround sets how many pages a fault installs (default 1, fixed).
	FaultAround FaultAround
	// Fetchers is the number of goroutines reading sources that are not resident (default 8).
	// They start with the first fault such a source has to serve.
	Fetchers int
	// SpinReads is how many times at most the reader, finding no message, yields its CPU and
	// looks again before parking in the netpoller (default 32; negative: never). Faults that
	// arrive back to back — a thread resumed by one install faults on the next page
	// microseconds later — are then read without a netpoller round trip. A look is a read under
	// the engine's lock when TryLock gets it at once, a poll(2) when installers hold it; the
	// reader yields the P between looks, and the CPU (sched_yield) while that pays. The budget
	// adapts: it doubles when a spin finds a message and halves when it does not, so an idle
	// engine stops spinning.
	SpinReads int
	// PollThread makes the reader keep an OS thread blocked in poll(2) on the fd instead of
	// parking in the netpoller: the lowest wake-up latency (the C handler's path), at the cost
	// of one thread.
	PollThread bool
	// Logger receives events worth an operator's attention (default: slog.Default()).
	Logger *slog.Logger
	// Record makes the engine record the order in which faults first touch the pages of its
	// source image, for a working set to prefetch next time (see Recorded). A forked child's
	// engine does not record.
	Record bool
	// OnFork is called with the engine that serves a forked child's userfaultfd (FORK event),
	// after it started, from the reader's goroutine (no lock held). The child engine runs until
	// its process is gone or the parent is closed; the parent's Run waits for it.
	OnFork func(child *Engine)
	// Durable, if set, is memory of DurableSize(regions) bytes that outlives this process (a
	// MAP_SHARED mapping of a file on tmpfs, resident), 8-byte aligned and zero for a new
	// userfaultfd: the engine keeps its page bitmaps (removed, installed, dirty) and its read
	// buffer there, so that a successor can Resume serving the same userfaultfd without a wrong
	// byte (see Resume). A forked child's engine keeps nothing durable.
	Durable []byte
}

// ErrProcessGone is returned by Run when the process owning the memory exited while faults
// were being served.
var ErrProcessGone = uffd.ErrProcessGone

// ErrRunOnce is returned by Run when the engine runs or ran already: an engine serves one
// userfaultfd once.
var ErrRunOnce = errors.New("engine: Run called twice")

// PageRun is a run of contiguous pages of the source image, for Prefetch: Data holds their
// bytes, or is nil when they are all zero.
type PageRun struct {
	Off  int64  // offset in the source image, page-aligned
	Len  int64  // bytes, a multiple of the page size
	Data []byte // Len bytes, or nil for zero pages
}

// PrefetchStats says what a Prefetch did.
type PrefetchStats struct {
	Pages    uint64        // pages installed by the prefetch
	Skipped  uint64        // pages already installed, removed or being fetched: left alone
	Duration time.Duration // from the start of Prefetch until it returned
}
