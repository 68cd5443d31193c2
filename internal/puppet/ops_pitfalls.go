//go:build linux

package puppet

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Commands of the engine's pitfall tests (engine/pitfalls_test.go).

func init() {
	registerOp("pit-remove-storm", pitRemoveStorm)
	registerOp("pit-syscall-write", pitSyscallWrite)
}

// pitSyscallWrite writes Data at Off of the area from inside the kernel: it puts Data in a pipe
// and read(2)s it into the area, so a fault on the page is a kernel-mode fault taken in a
// system call. A goroutine in a system call gets no preemption signals from the Go runtime, so
// the faulting thread sleeps until the userfaultfd wakes it — a user-mode load in this Go
// process would be interrupted every 10 ms or so and retry the fault by itself.
// Reply.Ints = [bytes written].
func pitSyscallWrite(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	if r.Off < 0 || len(r.Data) == 0 || r.Off+len(r.Data) > len(a.Mem) {
		return Reply{Err: "pit-syscall-write: range outside the area"}, nil
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return Reply{Err: fmt.Sprintf("pipe: %v", err)}, nil
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := unix.Write(p[1], r.Data); err != nil {
		return Reply{Err: fmt.Sprintf("write pipe: %v", err)}, nil
	}
	n, err := unix.Read(p[0], a.Mem[r.Off:r.Off+len(r.Data)])
	if err != nil {
		return Reply{Err: fmt.Sprintf("read pipe into the area: %v", err)}, nil
	}
	return Reply{Ints: []int64{int64(n)}}, nil
}

// pitRemoveStorm reads [Off, Off+Len) of the area (Len 0: to its end) over and over, word by
// word from one thread, while Ints[1] other threads (default 1) each MADV_DONTNEED Ints[2]
// (default 1000) random runs of 1 to 8 pages of it. The reading goes on for at least Ints[0]
// rounds (default 1) and until the removers are done, plus one round after. The area is served
// from the pattern of Seed with REMOVE events: every word must read as its pattern word or as
// zero, and once a page has read zero (it was removed and refilled) it must never show source
// data again.
//
// Reply.Ints = [garbage words, stale words (pattern after zero), madvise calls, pages seen
// zero, rounds]; Reply.Str describes the first bad word.
func pitRemoveStorm(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	n := r.Len
	if n == 0 {
		n = len(a.Mem) - r.Off
	}
	ps := a.PageSize
	pages := n / ps
	if r.Off < 0 || r.Off%ps != 0 || pages == 0 || r.Off+pages*ps > len(a.Mem) {
		return Reply{Err: "pit-remove-storm: range outside the area or not page-aligned"}, nil
	}
	rounds, removers, budget := 1, 1, 1000
	if len(r.Ints) > 0 {
		rounds = int(r.Ints[0])
	}
	if len(r.Ints) > 1 {
		removers = int(r.Ints[1])
	}
	if len(r.Ints) > 2 {
		budget = int(r.Ints[2])
	}

	var stop atomic.Bool
	var active atomic.Int64
	active.Store(int64(removers))
	var removes atomic.Int64
	var madvErr atomic.Pointer[error]
	var wg sync.WaitGroup
	for k := 0; k < removers; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer active.Add(-1)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			rng := rand.New(rand.NewPCG(r.Seed, uint64(k)+1))
			for i := 0; i < budget && !stop.Load(); i++ {
				p := rng.IntN(pages)
				run := 1 + rng.IntN(min(8, pages-p))
				off := r.Off + p*ps
				if err := unix.Madvise(a.Mem[off:off+run*ps], unix.MADV_DONTNEED); err != nil {
					err = fmt.Errorf("madvise: %w", err)
					madvErr.Store(&err)
					return
				}
				removes.Add(1)
			}
		}()
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	zero := make([]bool, pages) // page p has read zero: it was removed
	var garbage, stale, zeroPages int64
	first := ""
	var want [8]byte
	round, last := 0, false
	for ; round < rounds || !last; round++ {
		// The round after the removers finished is the last.
		last = round >= rounds-1 && active.Load() == 0
		for p := 0; p < pages; p++ {
			base := r.Off + p*ps
			for w := 0; w < ps; w += 8 {
				got := atomic.LoadUint64((*uint64)(unsafe.Pointer(&a.Mem[base+w])))
				Fill(want[:], r.Seed, base+w)
				pat := *(*uint64)(unsafe.Pointer(&want[0]))
				switch {
				case pat == 0:
					// Cannot tell source data from zeros here.
				case got == pat:
					if zero[p] {
						stale++
						if first == "" {
							first = fmt.Sprintf("round %d: source data at offset %d after the page read zero", round, base+w)
						}
					}
				case got == 0:
					if !zero[p] {
						zero[p] = true
						zeroPages++
					}
				default:
					garbage++
					if first == "" {
						first = fmt.Sprintf("round %d: offset %d holds %#x, want %#x or 0", round, base+w, got, pat)
					}
				}
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	if e := madvErr.Load(); e != nil {
		return Reply{Err: (*e).Error()}, nil
	}
	return Reply{Ints: []int64{garbage, stale, removes.Load(), zeroPages, int64(round)}, Str: first}, nil
}
