//go:build linux

package engine_test

import (
	"context"
	"encoding/binary"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// Tests of durable memory and Resume: a second engine takes over the userfaultfd the first
// served, as a daemon does after a crash or a hand-off. The VMM (the puppet) keeps its own uffd,
// as Firecracker does, so each engine gets its own copy (a dup) of the test's.

// durableMem is zeroed, 8-byte aligned memory of the size the regions need.
func durableMem(regions []engine.Region) []byte {
	words := make([]uint64, (engine.DurableSize(regions)+7)/8)
	return unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
}

// dupFD returns a second userfaultfd handle on v's uffd.
func dupFD(t *testing.T, v *vm) *uffd.FD {
	t.Helper()
	n, err := unix.FcntlInt(uintptr(v.fd.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := uffd.NewFD(n, false)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// resumeRun runs e until the test ends, or until the returned stop is called.
func resumeRun(t *testing.T, e *engine.Engine) (stop func() error) {
	errc := runEngine(context.Background(), e)
	t.Cleanup(func() { stopEngine(t, e) })
	return func() error { e.Close(); return waitRun(t, errc) }
}

// A successor resumed from the durable memory serves pages removed under its predecessor as
// zeros — installed ones and ones never installed — and the rest from the source.
func TestResumeKeepsRemovedPages(t *testing.T) {
	const seed = 31
	v := newVM(t, memory.Anon, 2<<20, uffd.FeatureEventRemove, uffd.ModeMissing)
	n := v.size / v.pageSize
	regions := []engine.Region{v.region(patternSource(t, v.size, seed))}
	mem := durableMem(regions)
	opts := engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 16, Adaptive: true}, Durable: mem}
	e1, err := engine.New(dupFD(t, v), regions, opts)
	if err != nil {
		t.Fatal(err)
	}
	stop1 := resumeRun(t, e1)
	v.touch(0, n/2, seed, nil, 0)
	var zero pageSet
	for _, r := range [][2]int{{n / 8, n / 4}, {5 * n / 8, 3 * n / 4}} { // installed, never installed
		v.do(puppet.Request{Op: "release", Off: r[0] * v.pageSize, Len: (r[1] - r[0]) * v.pageSize})
		zero.add(r[0], r[1])
	}
	if err := stop1(); err != nil {
		t.Fatalf("first engine: %v", err)
	}
	installed := e1.Installed()["mem"]
	e2, err := engine.Resume(dupFD(t, v), regions, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := e2.Installed()["mem"]; got != installed || got == 0 {
		t.Errorf("the successor knows %d pages installed, its predecessor %d", got, installed)
	}
	resumeRun(t, e2)
	rep := v.touch(0, n, seed, zero, 0)
	if got := int(rep.Ints[0]); got != zero.count() {
		t.Errorf("%d pages read zero, want %d", got, zero.count())
	}
	// Both released ranges are absent now, so each of their pages is one zero page of e2's.
	if got := e2.Stats()[0].PagesZero; got != uint64(zero.count()) {
		t.Errorf("successor installed %d zero pages, want %d", got, zero.count())
	}
}

// A REMOVE the predecessor read but never applied (it died right after read(2)) is in the
// journal; Resume applies it, so its pages read zeros, never source data.
func TestResumeAppliesJournal(t *testing.T) {
	const seed = 32
	v := newVM(t, memory.Anon, 1<<20, uffd.FeatureEventRemove, uffd.ModeMissing)
	n := v.size / v.pageSize
	regions := []engine.Region{v.region(patternSource(t, v.size, seed))}
	mem := durableMem(regions)
	// The message as the kernel writes it: event REMOVE, then start and end.
	lo, hi := n/4, n/2
	msg := mem[3*uffd.MsgSize : 4*uffd.MsgSize] // any slot of the batch
	msg[0] = byte(uffd.EventRemove)
	binary.NativeEndian.PutUint64(msg[8:], uint64(v.addr)+uint64(lo*v.pageSize))
	binary.NativeEndian.PutUint64(msg[16:], uint64(v.addr)+uint64(hi*v.pageSize))
	e, err := engine.Resume(dupFD(t, v), regions, engine.Options{Durable: mem})
	if err != nil {
		t.Fatal(err)
	}
	// Looked at before Run: from then on the reader writes the journal.
	for i, b := range msg {
		if b != 0 {
			t.Fatalf("journal byte %d = %#x after Resume: the applied batch must be cleared", i, b)
		}
	}
	resumeRun(t, e)
	var zero pageSet
	zero.add(lo, hi)
	v.touch(0, n, seed, zero, 0)
}

// A fault the predecessor read and never served leaves its thread asleep; Resume wakes it and
// the thread's fault comes again, to the successor.
func TestResumeWakesFaultsReadBefore(t *testing.T) {
	const seed = 33
	v := newVM(t, memory.Anon, 1<<20, uffd.FeatureEventRemove, uffd.ModeMissing)
	regions := []engine.Region{v.region(patternSource(t, v.size, seed))}
	call := v.start(puppet.Request{Op: "eng-touch", Off: 0, Len: v.pageSize, Seed: seed, Ints: []int64{1}})
	waitPending(t, v.fd, 1)
	// The dead daemon's read: the message is gone from the queue, the thread still sleeps.
	var msgs [4]uffd.Msg
	nr, err := unix.Read(v.fd.Fd(), unsafe.Slice(&msgs[0][0], len(msgs)*uffd.MsgSize))
	if err != nil || nr < uffd.MsgSize || msgs[0].Event() != uffd.EventPagefault {
		t.Fatalf("read the fault: n=%d err=%v", nr, err)
	}
	if in, err := v.fd.Info(); err != nil || in.Pending != 0 {
		t.Fatalf("fdinfo after the read: %+v %v", in, err)
	}
	e, err := engine.Resume(dupFD(t, v), regions, engine.Options{Durable: durableMem(regions)})
	if err != nil {
		t.Fatal(err)
	}
	resumeRun(t, e)
	rep, _, err := call.Wait(10 * time.Second)
	if err != nil {
		t.Fatalf("the thread whose fault was read before the resume: %v", err)
	}
	if rep.Mismatch != 0 {
		t.Fatalf("%d wrong pages", rep.Mismatch)
	}
	if st := e.Stats()[0]; st.Faults == 0 {
		t.Fatalf("the successor saw no fault: the thread was not woken to fault again")
	}
}

// A successor that does not know which pages are in (its predecessor died between installing
// them and marking them, or kept no durable memory): its fault-around windows run into mapped
// pages and its copies onto them answer EEXIST or stop part-way — all counted as served, every
// byte right.
func TestResumeUnknownInstalledPages(t *testing.T) {
	const seed = 34
	v := newVM(t, memory.Anon, 2<<20, uffd.FeatureEventRemove, uffd.ModeMissing)
	n := v.size / v.pageSize
	regions := []engine.Region{v.region(patternSource(t, v.size, seed))}
	e1, err := engine.New(dupFD(t, v), regions, engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	stop1 := resumeRun(t, e1)
	for p := 0; p < n; p += 3 {
		v.touch(p, p+1, seed, nil, 0) // one page in three, one page per fault
	}
	if err := stop1(); err != nil {
		t.Fatal(err)
	}
	e2, err := engine.Resume(dupFD(t, v), regions, engine.Options{Durable: durableMem(regions),
		FaultAround: engine.FaultAround{Min: 16, Max: 16}})
	if err != nil {
		t.Fatal(err)
	}
	stop2 := resumeRun(t, e2)
	v.touch(0, n, seed, nil, 0)
	if err := stop2(); err != nil {
		t.Fatalf("successor: %v", err)
	}
	if st := e2.Stats()[0]; st.Errors != 0 || st.Faults == 0 {
		t.Fatalf("successor: %s", statsLine(st))
	}
}
