//go:build linux

package uffd_test

import (
	"testing"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// A child touches every page of its registered memory; this process serves the faults by COPY
// from a pattern; the child checks every byte.
func TestCrossProcessServe(t *testing.T) {
	kindsFor(t, memory.Kinds, func(t *testing.T, k memory.Kind) {
		r := newRemote(t, remoteOpts{kind: k, size: 8 << 20, mode: uffd.ModeMissing})
		src := source(t, r.size, 7)
		c := r.start(puppet.Request{Op: "touch", Threads: 2, Verify: "pattern", Seed: 7})
		h := serveTouch(t, r, src, c)
		if got, want := h.missing.Load(), int64(r.size/r.pageSize); got < want {
			t.Fatalf("handler served %d missing faults, want at least %d", got, want)
		}
	})
}
