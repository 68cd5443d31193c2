//go:build linux

package uffd_test

import (
	"os"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// The fault server of ExampleFD_Copy does what its comments say, for a faulting child: pages
// come from the source, pages whose contents MADV_DONTNEED dropped (an EventRemove) come back as
// zero pages, and a fault read in one batch with an event in flight (whose COPY the kernel
// refuses until the event's thread has run again) is served.
func TestExampleServe(t *testing.T) {
	const seed = 23
	ps := os.Getpagesize()
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 8 * ps, mode: uffd.ModeMissing, features: uffd.FeatureEventRemove})
	src := source(t, r.size, seed)

	// Before the server runs: a REMOVE of the upper half in flight (madvise blocks until it is
	// read), then a fault in the lower half, read in the same batch; the kernel refuses its
	// COPY until the madvise has finished.
	release := r.start(puppet.Request{Op: "release", Off: 4 * ps, Len: 4 * ps})
	evWaitFor(t, "the releasing thread to block on its event", 10*time.Second, func() bool { return evTaskInState(r.pid, "D") })
	touch := r.start(puppet.Request{Op: "touch", Off: 0, Len: 4 * ps, Verify: "pattern", Seed: seed})
	evWaitFor(t, "the fault to be pending", 10*time.Second, func() bool {
		in, err := r.fd.Info()
		return err == nil && in.Pending >= 1
	})
	done := make(chan error, 1)
	go func() { done <- exampleServe(r.fd, r.addr, uintptr(r.size), src, uintptr(ps)) }()

	if _, _, err := release.Wait(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	check := func(what string, c *puppet.Call) {
		t.Helper()
		rep, _, err := c.Wait(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if rep.Mismatch != 0 || rep.Sigbus != 0 {
			t.Fatalf("%s: %d wrong pages, %d SIGBUS", what, rep.Mismatch, rep.Sigbus)
		}
	}
	check("lower half from the source", touch)
	check("removed upper half as zeros", r.start(puppet.Request{Op: "touch", Off: 4 * ps, Len: 4 * ps, Verify: "zero"}))
	// Dropping pages the server filled from the source: they too come back as zeros.
	r.do(puppet.Request{Op: "release", Off: 0, Len: 2 * ps})
	check("released pages as zeros", r.start(puppet.Request{Op: "touch", Off: 0, Len: 2 * ps, Verify: "zero"}))
	check("the rest still from the source", r.start(puppet.Request{Op: "touch", Off: 2 * ps, Len: 2 * ps, Verify: "pattern", Seed: seed}))

	r.fd.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exampleServe: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("exampleServe still running 10s after Close")
	}
}
