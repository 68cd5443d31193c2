//go:build linux

package uffd_test

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// moveResult is the reply of the puppet's wpmove-move command.
type moveResult struct {
	faults, verified, srcZero, srcHuge, dstHuge, eexist int
}

func runMove(t *testing.T, pages int, how string) moveResult {
	t.Helper()
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	c, err := p.Go(puppet.Request{Op: "wpmove-move", Seed: 3, Str: how, Ints: []int64{int64(pages)}})
	if err != nil {
		t.Fatal(err)
	}
	rep, _, err := c.Wait(60 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Ints) != 6 {
		t.Fatalf("reply %+v", rep)
	}
	v := rep.Ints
	return moveResult{int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5])}
}

// The selftest move (uffd-unit-tests): MOVE must be issued by the process that
// owns the memory, so the whole scenario runs in the child — src filled with a pattern
// (MADV_NOHUGEPAGE, MADV_DONTFORK), dst registered MISSING, a handler goroutine moving one page
// per fault from src, faults raised inside MADV_POPULATE_READ. Every page must arrive intact, in
// exactly one fault, and leave src reading zero.
func TestMove(t *testing.T) {
	const pages = 2048
	res := runMove(t, pages, "")
	if res.faults != pages || res.verified != pages || res.srcZero != pages {
		t.Fatalf("%d missing faults, %d pages equal to the pattern, %d src pages zero; want %d of each (%+v)",
			res.faults, res.verified, res.srcZero, pages, res)
	}
	if res.srcHuge != 0 || res.eexist != 0 {
		t.Fatalf("src had %d huge pages under MADV_NOHUGEPAGE, %d EEXIST answers; want 0, 0", res.srcHuge, res.eexist)
	}
}

// The selftest move-pmd (uffd-unit-tests): 2 MiB-aligned transparent huge pages (MADV_HUGEPAGE on
// src and dst; THP is "madvise" here), moved a whole PMD per fault.
func TestMovePMD(t *testing.T) {
	const chunks = 8
	const pages = chunks * 512
	res := runMove(t, pages, "pmd")
	if res.srcHuge != pages {
		t.Fatalf("only %d of %d src pages were transparent huge pages: THP could not be allocated "+
			"(/sys/kernel/mm/transparent_hugepage/enabled must allow madvise; memory fragmented?)", res.srcHuge, pages)
	}
	if res.faults != chunks || res.verified != pages || res.srcZero != pages {
		t.Fatalf("%d missing faults, %d pages equal to the pattern, %d src pages zero; want %d faults, %d pages (%+v)",
			res.faults, res.verified, res.srcZero, chunks, pages, res)
	}
	if res.dstHuge != pages {
		t.Fatalf("%d of %d dst pages huge after the moves: the THPs were split instead of moved whole", res.dstHuge, pages)
	}
}

// MOVE's errors, from inside the owner: EEXIST onto a mapped dst page,
// ENOENT from a src hole (and success with MoveAllowSrcHoles, leaving dst empty), EBUSY for a src
// page shared with a fork child. And from any other process — this one — EINVAL.
func TestMoveErrors(t *testing.T) {
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	rep, _, err := p.Do(puppet.Request{Op: "wpmove-move-errors", Seed: 5})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Ints) != 8 {
		t.Fatalf("reply %+v", rep)
	}
	t.Logf("child's errors: %s", rep.Str)
	v := rep.Ints
	ps := int64(os.Getpagesize())
	if unix.Errno(v[0]) != unix.EEXIST {
		t.Errorf("MOVE onto a mapped dst page: errno %v, want EEXIST", unix.Errno(v[0]))
	}
	if unix.Errno(v[1]) != unix.ENOENT {
		t.Errorf("MOVE from a src hole: errno %v, want ENOENT", unix.Errno(v[1]))
	}
	if v[2] != ps || v[5] != 0 {
		t.Errorf("MOVE from a src hole with ALLOW_SRC_HOLES: %d bytes, dst present %d; want %d bytes, dst still empty", v[2], v[5], ps)
	}
	if v[3] != ps || v[6] != 1 || v[7] != 0 {
		t.Errorf("plain MOVE: %d bytes, dst equal to the pattern %d, src present %d; want %d, 1, 0", v[3], v[6], v[7], ps)
	}
	if unix.Errno(v[4]) != unix.EBUSY {
		t.Errorf("MOVE of a page shared with a fork child: errno %v, want EBUSY", unix.Errno(v[4]))
	}

	// From another process the kernel refuses MOVE outright.
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: 4 * int(ps), mode: uffd.ModeMissing})
	src := source(t, int(ps), 1)
	n, err := r.fd.Move(r.addr, addrOf(src), uintptr(ps), 0)
	if !errors.Is(err, uffd.ErrInvalid) || !errors.Is(err, unix.EINVAL) || n != 0 {
		t.Fatalf("MOVE from a process that does not own the memory: %d, %v; want EINVAL", n, err)
	}
}
