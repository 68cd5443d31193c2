//go:build linux

// Package vmm is the Firecracker side of a UFFD restore, for tests and the demo: a child process
// that maps guest memory as Firecracker does (private anonymous, or 2 MiB hugetlb with
// MAP_NORESERVE), creates a userfaultfd with EVENT_REMOVE, registers every region in MISSING mode
// and sends the handshake of a chosen Firecracker version. Its vCPU-like threads then touch
// guest memory and check every page against the snapshot's pattern; Balloon inflates a balloon
// with MADV_DONTNEED, as Firecracker's balloon device does.
package vmm

import (
	"fmt"
	"time"

	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// Region is a guest memory region: Size bytes served from FileOffset of the memory file.
type Region struct {
	Size       int
	FileOffset int64
}

// Options describe the VM.
type Options struct {
	Socket  string
	Regions []Region
	Huge    bool // 2 MiB hugetlb guest memory ("huge_pages": "2M")
	Version firecracker.Version
	// Trace, if set, is the working set RunTrace touches, handed to the VMM before the
	// handshake so that sending it is not part of the restore.
	Trace []puppet.TraceRun
}

// VMM is a running fake VMM process.
type VMM struct {
	p       *puppet.Puppet
	Regions []Mapped
	opts    Options
	// Started is when the restore began, by this process's clock: just before the handshake
	// was sent, or before a File-backend VMM mapped its memory file.
	Started time.Time
}

// Mapped is a region as mapped in the VMM.
type Mapped struct {
	Region
	Area     int
	Addr     uintptr
	PageSize int
}

// Start starts the VMM process, maps and registers its memory, and performs the handshake.
// Faults may start as soon as it returns.
func Start(o Options) (*VMM, error) {
	if o.Version == 0 {
		o.Version = firecracker.V1_12
	}
	if len(o.Regions) == 0 {
		return nil, fmt.Errorf("vmm: no regions")
	}
	v, err := startProcess(o)
	if err != nil {
		return nil, err
	}
	p := v.p
	kind := "anon"
	if o.Huge {
		kind = "hugetlb-private"
	}
	for _, r := range o.Regions {
		rep, fds, err := p.Do(puppet.Request{Op: "map", Kind: kind, Size: r.Size})
		for _, fd := range fds {
			closeFD(fd)
		}
		if err != nil {
			p.Kill()
			return nil, fmt.Errorf("vmm: map guest memory: %w", err)
		}
		v.Regions = append(v.Regions, Mapped{Region: r, Area: rep.Area, Addr: uintptr(rep.Addr), PageSize: rep.PageSize})
	}
	_, fds, err := p.Do(puppet.Request{Op: "uffd", Features: uint64(uffd.FeatureEventRemove)})
	for _, fd := range fds {
		closeFD(fd) // the VMM keeps its uffd; this process has no use for a copy
	}
	if err != nil {
		p.Kill()
		return nil, fmt.Errorf("vmm: userfaultfd: %w", err)
	}
	ints := []int64{int64(o.Version)}
	for _, m := range v.Regions {
		if _, _, err := p.Do(puppet.Request{Op: "register", Area: m.Area, Mode: uint64(uffd.ModeMissing)}); err != nil {
			p.Kill()
			return nil, fmt.Errorf("vmm: register: %w", err)
		}
		ints = append(ints, int64(m.Area), m.FileOffset)
	}
	v.Started = time.Now()
	if _, _, err := p.Do(puppet.Request{Op: "fc-handshake", Str: o.Socket, Ints: ints}); err != nil {
		p.Kill()
		return nil, fmt.Errorf("vmm: handshake: %w", err)
	}
	// Firecracker's VMM thread faults guest memory itself within PUT /snapshot/load, a few ms
	// after the handshake and before the load returns (v1.14.2: a write fault): the handler must
	// serve at once. A read of the first page here plays it without changing the pattern.
	c, err := p.Go(puppet.Request{Op: "touch", Area: v.Regions[0].Area, Len: v.Regions[0].PageSize, Threads: 1})
	if err == nil {
		_, _, err = c.Wait(loadFaultTimeout)
	}
	if err != nil {
		p.Kill()
		return nil, fmt.Errorf("vmm: the load's fault was not served: %w", err)
	}
	return v, nil
}

// loadFaultTimeout bounds the wait for the load's own fault to be served.
const loadFaultTimeout = time.Minute

// Pid is the VMM's process id.
func (v *VMM) Pid() int { return v.p.Pid() }

// Touched is the outcome of a pass over guest memory.
type Touched struct {
	Pages, Wrong, Sigbus int
	Elapsed              time.Duration
}

// Touch reads every page of every region with threads threads in order ("seq", "rand" or "parts") and
// checks it: against the snapshot pattern of seed, or zero where zero is true.
func (v *VMM) Touch(threads int, order string, seed uint64, zero bool) (Touched, error) {
	var t Touched
	calls := make([]*puppet.Call, len(v.Regions))
	for i, m := range v.Regions {
		req := puppet.Request{Op: "touch", Area: m.Area, Threads: threads, Order: order, Seed: seed,
			Verify: "pattern", PatternBase: int(m.FileOffset)}
		if zero {
			req.Verify = "zero"
		}
		c, err := v.p.Go(req)
		if err != nil {
			return t, err
		}
		calls[i] = c
	}
	for _, c := range calls {
		rep, _, err := c.Wait(5 * time.Minute)
		if err != nil {
			return t, err
		}
		t.Pages += rep.Pages
		t.Wrong += rep.Mismatch
		t.Sigbus += rep.Sigbus
		t.Elapsed = max(t.Elapsed, time.Duration(rep.Ns))
	}
	return t, nil
}

// TouchRange checks [off, off+n) of region i (against the pattern, or zero).
func (v *VMM) TouchRange(i, off, n, threads int, seed uint64, zero bool) (Touched, error) {
	m := v.Regions[i]
	req := puppet.Request{Op: "touch", Area: m.Area, Off: off, Len: n, Threads: threads, Seed: seed,
		Verify: "pattern", PatternBase: int(m.FileOffset)}
	if zero {
		req.Verify = "zero"
	}
	rep, _, err := v.p.Do(req)
	return Touched{Pages: rep.Pages, Wrong: rep.Mismatch, Sigbus: rep.Sigbus, Elapsed: time.Duration(rep.Ns)}, err
}

// Balloon gives [off, off+n) of region i back to the host with MADV_DONTNEED, as a balloon
// inflation does; the daemon gets a REMOVE event and the range must read zeros afterwards.
func (v *VMM) Balloon(i, off, n int) error {
	_, _, err := v.p.Do(puppet.Request{Op: "madvise", Area: v.Regions[i].Area, Off: off, Len: n, Advice: madvDontneed})
	return err
}

// Go starts a command without waiting (for tests that need a touch in flight).
func (v *VMM) Go(req puppet.Request) (*puppet.Call, error) { return v.p.Go(req) }

// Exit makes the VMM exit normally (closing its socket), and reaps it.
func (v *VMM) Exit() error { return v.p.Exit(0) }

// Kill kills the VMM with SIGKILL and reaps it.
func (v *VMM) Kill() { v.p.Kill() }

// Wait reaps the VMM after it was killed by someone else; it returns its exit error.
func (v *VMM) Wait() error { return v.p.Wait() }
