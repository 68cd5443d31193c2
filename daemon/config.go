package daemon

import (
	"log/slog"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/source"
)

// Policy says what to do with a VM the daemon cannot serve.
type Policy string

const (
	// Kill sends SIGKILL to the VMM (through its pidfd): the guest dies instead of hanging.
	Kill Policy = "kill"
	// LogOnly logs the failure and leaves the VMM as it is (its faulting vCPUs stay blocked).
	LogOnly Policy = "log"
)

// Config configures a Daemon.
type Config struct {
	Socket string // path of the Unix socket to listen on
	// MemFile is a raw memory snapshot file every VM is served from; Snapshot a packed snapshot
	// directory (package snapshot) instead. Exactly one is set.
	MemFile  string
	Snapshot string
	// Source, instead of MemFile or Snapshot, is a source opened by the caller (package fleet
	// shares one among the daemons of its VMs). The daemon does not close it: its owner does,
	// after Serve returned. A *snapshot.Snapshot is served as a packed snapshot (working set).
	// With Source, MemFile may name the memory file it was opened from (it is not opened
	// again): a StateDir needs to know which bytes its VMs were served.
	Source source.Source
	// CacheSize bounds the decompressed frames of a packed snapshot kept in memory (default
	// snapshot.DefaultCacheSize).
	CacheSize int64
	// Record records the working set of the VMs served (the order in which their faults first
	// touch pages) into the packed snapshot when each VM ends, or when RecordWindow elapses after
	// its handshake (0: until it ends). Where the snapshot has a working set already, the pages
	// both recordings share are kept, in the new recording's order. While recording, faults are
	// served one page at a time (no fault-around: a page installed ahead of its touch never
	// faults, so it would be missing from the working set) and nothing is prefetched.
	Record       bool
	RecordWindow time.Duration
	// NoPrefetch turns off prefetching a packed snapshot's working set into each VM restored.
	NoPrefetch bool
	// SocketGroup, when > 0, makes the socket 0660 and owned by this group; else it is 0600.
	SocketGroup int
	// AllowUIDs, when not empty, admits only VMMs running as these uids (SO_PEERCRED).
	AllowUIDs []uint32
	// OnFailure is what happens to a VM that cannot be served (default Kill).
	OnFailure Policy
	// Engine tunes the engine of every uffd.
	Engine engine.Options
	// MaxRegions bounds the regions of one handshake (default 4096); HandshakeTimeout bounds
	// the arrival of a started handshake (default 5 s).
	MaxRegions       int
	HandshakeTimeout time.Duration
	// MaxHandshakes bounds the handshakes one connection may send, each of which starts an
	// engine (default 8). Firecracker sends one; the headroom is for a VMM that hands over
	// memory added later on the same stream. A handshake beyond it is refused with the
	// failure policy.
	MaxHandshakes int
	// Logger receives the daemon's log and, with the VM's "vm" and "pid" attributes, its
	// engines' (default slog.Default(); Engine.Logger, if set, is used for the engines instead).
	Logger *slog.Logger
	// OnVMEnd, if set, is called with each VM's final report.
	OnVMEnd func(Report)
	// StateDir, if set, is a directory (best on tmpfs, such as /run/faultline) where the daemon
	// keeps, per VM, what a successor needs to serve it: a daemon started on the same StateDir
	// after this one died (kill -9, a crash) serves again every VM whose VMM still runs, and one
	// started with Takeover takes every VM over from a live predecessor. One daemon at a time
	// owns the directory (a lock). Without it, the VMs of a daemon that dies hang until killed.
	StateDir string
	// Takeover makes New take the listening socket and every live VM over from the daemon that
	// owns StateDir, which then exits (a live upgrade), instead of listening itself.
	Takeover bool
}

// Report is what the daemon logs when a VM goes.
type Report struct {
	VM       int64
	Pid      int
	Version  string
	Regions  int
	Cause    string
	Failure  string // why it could not be served, if so
	Duration time.Duration

	Faults, Pages, ZeroPages, Bytes, Retries, Errors uint64
	// Prefetched is the pages the working-set prefetch installed before any fault asked for
	// them: each one a page the recording saw fault, so a fault avoided if this VM touches it
	// too. PrefetchTime is from the handshake to the end of the prefetch.
	Prefetched   uint64
	PrefetchTime time.Duration
	// FirstFault is from the connection to the first page installed (0 if none).
	FirstFault time.Duration
	// P50 and P99 are estimates: interpolated within the power-of-two buckets of the latency
	// histogram (engine.Histogram.Quantile).
	P50, P99 time.Duration
	// Origin is how this daemon came to serve the VM: "" when it connected to it, "recovered"
	// from the state directory after the previous daemon died, or "taken over" from the
	// previous daemon in a live hand-off. A VM this daemon handed over ends with Cause
	// CauseHandedOver; its successor reports the rest of its life.
	Origin string
}

// CauseHandedOver is the end cause of a VM handed over to a successor daemon (Config.Takeover).
const CauseHandedOver = "handed over to the next daemon"

// Summary is the daemon's running totals over every VM served since start.
type Summary struct {
	Live, VMs                                int
	Faults, Pages, ZeroPages, Removed, Bytes uint64
	Prefetched                               uint64        // pages the working-set prefetch installed
	P50, P99                                 time.Duration // estimates, as in Report
}
