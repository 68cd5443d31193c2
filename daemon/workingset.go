//go:build linux

package daemon

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/snapshot"
)

// Working sets: a daemon serving a packed snapshot with Record notes, per VM, the order in
// which faults first touch its pages, and stores it in the snapshot when the VM ends; a daemon
// serving it later prefetches those pages into each VM from the moment its handshake arrives
// (Firecracker's snapshot load waits for it, before the vCPUs resume), one sequential read of
// the working set's own extent, while faults are served as they come. A recording daemon does
// not prefetch: pages prefetched never fault, so they would drop out of the recording.

// startWorkingSet starts what the VM's new engine e does with the working set: a recording
// window, or a prefetch (a goroutine of the VM's until it is done).
func (v *vm) startWorkingSet(e *engine.Engine) {
	d := v.d
	switch {
	case d.snap == nil:
	case d.cfg.Record:
		if d.cfg.RecordWindow > 0 {
			t := time.AfterFunc(d.cfg.RecordWindow, e.StopRecording)
			v.wg.Add(1)
			go func() { defer v.wg.Done(); <-e.Done(); t.Stop() }()
		}
	case !d.cfg.NoPrefetch && d.snap.Manifest().WorkingSet != nil:
		v.wg.Add(1)
		go func() {
			defer v.wg.Done()
			v.prefetch(e)
		}()
	}
}

// prefetch streams the snapshot's working set into e.
func (v *vm) prefetch(e *engine.Engine) {
	ws, err := v.d.snap.OpenWorkingSet()
	if err != nil {
		v.log.Warn("working set unreadable: no prefetch (faults are served as usual)", "err", err)
		return
	}
	defer ws.Close()
	ps := v.d.snap.PageSize()
	st, err := e.Prefetch(context.Background(), func() (engine.PageRun, error) {
		r, err := ws.Next()
		if err != nil {
			return engine.PageRun{}, err
		}
		run := engine.PageRun{Off: int64(r.Page) * ps, Len: int64(r.Count) * ps}
		if !r.Zero {
			run.Data = r.Data
		}
		return run, nil
	})
	switch {
	case err == nil:
		v.log.Info("working set prefetched", "pages", st.Pages, "skipped", st.Skipped, "duration", st.Duration.Round(time.Microsecond))
	case errors.Is(err, io.EOF), errors.Is(err, context.Canceled):
	default:
		// The working set's frames are verified before their bytes are used; a bad one ends the
		// prefetch, not the VM, whose faults are served from the (verified) chunks.
		v.log.Warn("prefetch stopped: faults are served as usual", "err", err, "pages", st.Pages)
	}
}

// saveRecording stores what the VM's engines recorded as the snapshot's working set: the pages
// shared with the working set already there, if any (in the new order), else all of them.
func (v *vm) saveRecording() {
	d := v.d
	if d.snap == nil || !d.cfg.Record {
		return
	}
	// The snapshot counts pages of its own size (4 KiB, or 2 MiB for a hugetlb guest packed
	// with --page-size 2M): a touched page of the guest's size is each of those it covers.
	sps := d.snap.PageSize()
	v.mu.Lock()
	var pages []uint64
	for _, e := range v.engines {
		for _, t := range e.Recorded() {
			for p := t.Off / sps; p*sps < t.Off+t.Len; p++ {
				pages = append(pages, uint64(p))
			}
		}
	}
	v.mu.Unlock()
	if len(pages) == 0 {
		return
	}
	d.recMu.Lock()
	defer d.recMu.Unlock()
	dir := d.snap.Dir()
	kept := pages
	if cur, err := snapshot.Open(dir); err == nil {
		if ws, err := cur.OpenWorkingSet(); err == nil {
			kept = snapshot.Intersect(pages, ws.Pages())
			ws.Close()
		}
		cur.Close()
	}
	if err := snapshot.WriteWorkingSet(dir, kept); err != nil {
		v.log.Error("recording the working set failed", "err", err)
		return
	}
	v.log.Info("working set recorded", "pages", len(kept), "touched", len(pages))
}
