//go:build linux

package engine

import (
	"testing"
	"time"

	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// A fault whose install meets pending events (EAGAIN) is deferred with the time it was read, so
// its latency, observed when the retry installs it, counts the wait. Before, the retry took the
// time of whatever batch was read last.
func TestDeferredFaultKeepsReadTime(t *testing.T) {
	e := newEngine(nil, Options{})
	in := e.newInstaller()
	st := newPageState(Region{Name: "r", Size: 4096, PageSize: 4096, Source: source.NewMemory(make([]byte, 4096))}, e.opts.FaultAround)
	at := time.Now().Add(-time.Hour)
	f := fault{pf: uffd.Pagefault{Address: 0x1000}, at: at}
	if err := in.check(uffd.ErrEventsPending, st, f, 0x1000, 4096, 0); err != nil {
		t.Fatalf("check(ErrEventsPending) = %v, want nil (deferred)", err)
	}
	if len(in.deferred) != 1 || !in.deferred[0].at.Equal(at) || in.deferred[0].pf.Address != 0x1000 {
		t.Fatalf("deferred = %+v, want the fault with its read time %v", in.deferred, at)
	}
	// Recorded once installed: the hour shows in the latency.
	st.recordInstall(0, 1, 4096, false, in.deferred[0].at)
	if s := st.stats.snapshot("r"); s.Retries != 1 || s.Latency.Sum < time.Hour {
		t.Fatalf("retries %d, latency sum %v; want 1 and at least an hour", s.Retries, s.Latency.Sum)
	}
}
