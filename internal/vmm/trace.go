//go:build linux

package vmm

import (
	"fmt"
	"time"

	"github.com/faultline-go/faultline/internal/puppet"
)

// StartFile starts a VMM restoring as Firecracker's File memory backend does: size bytes of the
// raw memory file mapped MAP_PRIVATE, paged in by the kernel on each fault, no userfaultfd and no
// handshake. o.Socket, o.Regions, o.Huge and o.Version are unused.
func StartFile(path string, size int, o Options) (*VMM, error) {
	v, err := startProcess(o)
	if err != nil {
		return nil, err
	}
	p := v.p
	v.Started = time.Now()
	rep, _, err := p.Do(puppet.Request{Op: "trace-map-file", Str: path, Size: size})
	if err != nil {
		p.Kill()
		return nil, fmt.Errorf("vmm: map %s: %w", path, err)
	}
	v.Regions = []Mapped{{Region: Region{Size: size}, Area: rep.Area, Addr: uintptr(rep.Addr), PageSize: rep.PageSize}}
	return v, nil
}

// startProcess starts the VMM's process and hands it o.Trace, if any.
func startProcess(o Options) (*VMM, error) {
	p, err := puppet.Start()
	if err != nil {
		return nil, err
	}
	if len(o.Trace) > 0 {
		if _, _, err := p.Do(puppet.Request{Op: "trace-set", Ints: puppet.EncodeTrace(o.Trace)}); err != nil {
			p.Kill()
			return nil, fmt.Errorf("vmm: trace: %w", err)
		}
	}
	return &VMM{p: p, opts: o}, nil
}

// Traced is the outcome of RunTrace.
type Traced struct {
	Pages, Sigbus int
	// Touch is the vCPUs' time over the touches; Restore is from Started to the last touch
	// (seen when the VMM's answer arrives).
	Touch, Restore time.Duration
	// Over the touches, of the VMM process: page faults (getrusage), CPU time (user + system),
	// and bytes it made the kernel read from storage (/proc/PID/io read_bytes).
	MinFaults, MajFaults int64
	CPU                  time.Duration
	ReadBytes            int64
}

// RunTrace makes threads vCPU threads touch Options.Trace in the first region (region pages),
// run i on thread i % threads; write runs store into their pages (puppet.TraceWord).
func (v *VMM) RunTrace(threads int) (Traced, error) {
	rep, _, err := v.p.Do(puppet.Request{Op: "trace-run", Area: v.Regions[0].Area, Threads: threads})
	end := time.Now()
	if err != nil {
		return Traced{}, err
	}
	if len(rep.Ints) != 4 {
		return Traced{}, fmt.Errorf("vmm: trace-run answered %v", rep.Ints)
	}
	return Traced{Pages: rep.Pages, Sigbus: rep.Sigbus, Touch: time.Duration(rep.Ns), Restore: end.Sub(v.Started),
		MinFaults: rep.Ints[0], MajFaults: rep.Ints[1], CPU: time.Duration(rep.Ints[2]), ReadBytes: rep.Ints[3]}, nil
}

// VerifyTrace compares every page of the trace in the first region with the raw image file ref
// (at the region's file offset): it returns the pages compared and how many differ.
func (v *VMM) VerifyTrace(ref string) (pages, wrong int, err error) {
	m := v.Regions[0]
	rep, _, err := v.p.Do(puppet.Request{Op: "trace-verify", Area: m.Area, Str: ref, PatternBase: int(m.FileOffset)})
	if err != nil {
		return 0, 0, err
	}
	if rep.Mismatch > 0 {
		err = fmt.Errorf("vmm: %d of %d pages wrong, the first bad byte at offset %d", rep.Mismatch, rep.Pages, rep.FirstBad)
	}
	return rep.Pages, rep.Mismatch, err
}
