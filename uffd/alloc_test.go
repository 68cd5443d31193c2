//go:build linux

package uffd_test

import (
	"bytes"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/uffd"
)

// The hot path of a fault server — read a batch of messages, copy pages in, wake — allocates
// nothing.
func TestAllocsReader(t *testing.T) {
	faultyChild(t)
	const threads = 4
	r := newRemote(t, remoteOpts{kind: memory.Anon, size: threads * os.Getpagesize(), mode: uffd.ModeMissing})
	src := source(t, r.size, 21)
	// Each child thread blocks on a page of its own. WAKE without resolving lets them fault
	// again, so every run finds new messages to read.
	c := r.start(puppet.Request{Op: "touch", Threads: threads, Verify: "pattern", Seed: 21})
	waitPending(t, r.fd, threads)
	rd, err := r.fd.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]uffd.Msg, 64)
	size := uintptr(r.size)
	var read, batches int
	var readErr error
	allocs := testing.AllocsPerRun(50, func() {
		n, err := rd.Read(msgs)
		if err != nil {
			readErr = err
			return
		}
		read += n
		if n > 1 {
			batches++
		}
		if err := r.fd.Wake(r.addr, size); err != nil {
			readErr = err
		}
	})
	if readErr != nil {
		t.Fatal(readErr)
	}
	if allocs != 0 {
		t.Errorf("Reader.Read + FD.Wake: %v allocations per run, want 0", allocs)
	}
	if read < 51 {
		t.Fatalf("read %d messages in 51 runs", read)
	}
	t.Logf("Read: %d messages in 51 runs, %d runs with a batch", read, batches)

	read = 0
	var empty int
	allocs = testing.AllocsPerRun(50, func() {
		for spin := 0; spin < 1e6; spin++ {
			n, err := rd.TryRead(msgs)
			if err != nil {
				readErr = err
				return
			}
			if n > 0 {
				read += n
				break
			}
			empty++
			runtime.Gosched()
		}
		if err := r.fd.Wake(r.addr, size); err != nil {
			readErr = err
		}
	})
	if readErr != nil {
		t.Fatal(readErr)
	}
	if allocs != 0 {
		t.Errorf("Reader.TryRead + FD.Wake: %v allocations per run, want 0", allocs)
	}
	if read < 51 {
		t.Fatalf("TryRead found %d messages in 51 runs", read)
	}
	t.Logf("TryRead: %d messages in 51 runs, %d empty tries", read, empty)

	// Now serve for real.
	serveTouch(t, r, src, c)
}

// TryRead of a blocking fd takes another path (preadv2 with RWF_NOWAIT); it allocates nothing
// either.
func TestAllocsTryReadBlocking(t *testing.T) {
	f, err := uffd.Open(uffd.Options{Blocking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.API(0); err != nil {
		t.Fatal(err)
	}
	rd, err := f.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]uffd.Msg, 8)
	var n int
	var readErr error
	allocs := testing.AllocsPerRun(100, func() { n, readErr = rd.TryRead(msgs) })
	if n != 0 || readErr != nil {
		t.Fatalf("TryRead of an idle blocking fd: %d, %v", n, readErr)
	}
	if allocs != 0 {
		t.Errorf("TryRead of a blocking fd: %v allocations per run, want 0", allocs)
	}
}

// localArea is anonymous memory of this process registered MISSING with a fresh uffd. The
// test never touches a page of it that an ioctl did not install first.
type localArea struct {
	fd   *uffd.FD
	mem  []byte
	base uintptr
	ps   uintptr
}

func newLocalArea(tb testing.TB, pages int) *localArea {
	tb.Helper()
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	if _, err := f.API(0); err != nil {
		tb.Fatal(err)
	}
	ps := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, pages*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { unix.Munmap(mem) })
	a := &localArea{fd: f, mem: mem, base: addrOf(mem), ps: uintptr(ps)}
	if _, err := f.Register(a.base, uintptr(len(mem)), uffd.ModeMissing); err != nil {
		tb.Fatal(err)
	}
	return a
}

func TestAllocsCopyWake(t *testing.T) {
	const runs = 100
	a := newLocalArea(t, runs+1)
	src := source(t, len(a.mem), 33)
	next := uintptr(0)
	var opErr error
	allocs := testing.AllocsPerRun(runs, func() {
		off := next * a.ps
		next++
		n, err := a.fd.Copy(a.base+off, addrOf(src)+off, a.ps, uffd.CopyDontWake)
		if err != nil || n != a.ps {
			opErr = err
			return
		}
		if err := a.fd.Wake(a.base+off, a.ps); err != nil {
			opErr = err
		}
	})
	if opErr != nil {
		t.Fatal(opErr)
	}
	if allocs != 0 {
		t.Errorf("FD.Copy + FD.Wake: %v allocations per run, want 0", allocs)
	}
	if next != runs+1 {
		t.Fatalf("%d runs", next)
	}
	// Every page was installed by COPY, so it may be read now.
	if !bytes.Equal(a.mem, src) {
		t.Fatal("pages installed by COPY differ from the source")
	}
}

// BenchmarkCopy measures UFFDIO_COPY in this process (no fault involved): each iteration fills
// the missing pages, and MADV_DONTNEED makes them missing again (counted in the time).
func BenchmarkCopy(b *testing.B) {
	for _, pages := range []int{1, 64} {
		b.Run("pages="+itoa(pages), func(b *testing.B) {
			a := newLocalArea(b, pages)
			src := source(b, len(a.mem), 1)
			length := uintptr(len(a.mem))
			b.ReportAllocs()
			b.SetBytes(int64(length))
			for b.Loop() {
				if n, err := a.fd.Copy(a.base, addrOf(src), length, 0); err != nil || n != length {
					b.Fatalf("COPY: %d, %v", n, err)
				}
				if err := unix.Madvise(a.mem, unix.MADV_DONTNEED); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
