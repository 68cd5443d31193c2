//go:build linux

package puppet

// Commands of the engine event tests (engine/events_test.go, engine/stress_test.go): touching
// with an exact expectation per page, filling the page cache behind a mapping, madvise from a
// thread the test can watch, and the balloon storm.
//
//	eng-touch       touch pages, each expected to hold the pattern or zeros (a bitmap says which)
//	eng-fill-file   fill the page cache of a file-backed area through a temporary shared mapping
//	eng-mm          madvise or munmap a range from a locked thread whose id eng-tid reports meanwhile
//	eng-tid         the thread id an eng-mm published under a key
//	eng-mremap      move the area to a fresh address aligned to its page size
//	eng-balloon     the REMOVE storm: touching threads verify pages while a balloon thread
//	                releases random runs, then a final pass checks every byte

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func init() {
	registerOp("eng-touch", engTouch)
	registerOp("eng-fill-file", engFillFile)
	registerOp("eng-mm", engMM)
	registerOp("eng-tid", engTID)
	registerOp("eng-mremap", engMremap)
	registerOp("eng-balloon", engBalloon)
}

func engFail(format string, a ...any) (Reply, []int) {
	return Reply{Err: fmt.Sprintf(format, a...)}, nil
}

var (
	engImageMu sync.Mutex
	engImages  = map[uint64][]byte{}
)

// engImage returns the pattern of seed for offsets [0, n), computed once per seed and kept in
// the child's own heap (never registered memory).
func engImage(seed uint64, n int) []byte {
	engImageMu.Lock()
	defer engImageMu.Unlock()
	img := engImages[seed]
	if len(img) < n {
		img = make([]byte, n)
		Fill(img, seed, 0)
		engImages[seed] = img
	}
	return img[:n]
}

// quietThread locks the goroutine to its thread and blocks SIGURG there until the returned
// function runs. Go preempts a goroutine that runs for 10 ms with SIGURG; a thread waiting on a
// userfault is interrupted by it and faults again, so the handler sees the fault twice. Tests that
// count faults exactly touch from quiet threads.
func quietThread() func() {
	runtime.LockOSThread()
	var set, old unix.Sigset_t
	set.Val[(unix.SIGURG-1)/64] |= 1 << ((uint(unix.SIGURG) - 1) % 64)
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &set, &old); err != nil {
		runtime.UnlockOSThread()
		return func() {}
	}
	return func() {
		unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil)
		runtime.UnlockOSThread()
	}
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// engTouch touches the pages of [Off, Off+Len) (Len 0: to the end of the area) from Threads
// threads in Order ("seq" or "rand" with Seed), reading — or with Write, writing the first word
// to the complement of its expected value — and checks every byte of each page: zeros where bit
// p of Data (a bitmap over the area's pages) is set, the pattern of Seed otherwise. Ints[0] = 1
// makes the threads quiet (see quietThread): for exact fault counts, and only while a handler
// serves the faults — a quiet thread cannot be preempted while it waits on a fault, so it holds
// up the child's garbage collector, and with it every other command. Reply:
// Pages, Mismatch (pages wrong), FirstBad (area offset of the first wrong byte, -1 if none),
// Sigbus (SIGBUS/SIGSEGV taken); Ints = [pages read as zero, sum of the first words read].
func engTouch(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return engFail("eng-touch: %v", err)
	}
	ps := a.PageSize
	n := r.Len
	if n == 0 {
		n = len(a.Mem) - r.Off
	}
	if r.Off%ps != 0 || n%ps != 0 || r.Off+n > len(a.Mem) {
		return engFail("eng-touch: [%d, %d) not whole pages of the %d-byte area", r.Off, r.Off+n, len(a.Mem))
	}
	img := engImage(r.Seed, len(a.Mem))
	zero := func(p int) bool { return p/8 < len(r.Data) && r.Data[p/8]&(1<<(p%8)) != 0 }
	pages := n / ps
	order := make([]int, pages)
	for i := range order {
		order[i] = r.Off/ps + i
	}
	if r.Order == "rand" {
		rng := rand.New(rand.NewPCG(r.Seed, 7))
		rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	}
	threads := max(r.Threads, 1)
	quiet := len(r.Ints) > 0 && r.Ints[0]&1 != 0
	var mismatch, sigbus, zeros atomic.Int64
	var sum atomic.Uint64
	var firstBad atomic.Int64
	firstBad.Store(-1)
	var wg sync.WaitGroup
	for t := range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if quiet {
				defer quietThread()()
			}
			buf := make([]byte, ps)
			for i := t; i < pages; i += threads {
				p := order[i]
				off := p * ps
				want := img[off : off+ps]
				if zero(p) {
					want = make([]byte, ps) // rare enough not to matter
				}
				var first uint64
				sig := guarded(func() {
					// Fault on a plain load or store here, not inside copy: Go can preempt a
					// goroutine at this instruction (not in the runtime's memmove), so a
					// thread waiting on a fault nobody serves yet does not hold up the
					// child's garbage collector — and with it every other command.
					w := (*uint64)(unsafe.Pointer(&a.Mem[off]))
					if r.Write {
						atomic.StoreUint64(w, ^binary.NativeEndian.Uint64(want))
					} else {
						atomic.LoadUint64(w)
					}
					copy(buf, a.Mem[off:off+ps])
					first = binary.NativeEndian.Uint64(buf)
				})
				if sig != 0 {
					sigbus.Add(1)
					continue
				}
				sum.Add(first)
				if allZero(buf) {
					zeros.Add(1)
				}
				if r.Write {
					binary.NativeEndian.PutUint64(buf, ^first) // compare the rest as read
				}
				if !bytes.Equal(buf, want) {
					mismatch.Add(1)
					for k := range buf {
						if buf[k] != want[k] {
							firstBad.CompareAndSwap(-1, int64(off+k))
							break
						}
					}
				}
			}
		}()
	}
	wg.Wait()
	return Reply{Pages: pages, Mismatch: int(mismatch.Load()), FirstBad: int(firstBad.Load()),
		Sigbus: int(sigbus.Load()), Ints: []int64{zeros.Load(), int64(sum.Load())}}, nil
}

// engFillFile writes the pattern of Seed into [Off, Off+Len) of a file-backed area's page cache
// through a temporary shared mapping of its memfd — never through the area itself, which may be
// registered. Len 0: to the end.
func engFillFile(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return engFail("eng-fill-file: %v", err)
	}
	if a.File == nil {
		return engFail("eng-fill-file: %v memory has no file", a.Kind)
	}
	n := r.Len
	if n == 0 {
		n = len(a.Mem) - r.Off
	}
	flags := unix.MAP_SHARED
	if a.Kind.Huge() {
		flags |= unix.MAP_NORESERVE
	}
	m, err := unix.Mmap(int(a.File.Fd()), int64(r.Off), n, unix.PROT_READ|unix.PROT_WRITE, flags)
	if err != nil {
		return engFail("eng-fill-file: mmap: %v", err)
	}
	defer unix.Munmap(m)
	copy(m, engImage(r.Seed, len(a.Mem))[r.Off:r.Off+n])
	return Reply{}, nil
}

var engTIDs sync.Map // key (Ints[3] of eng-mm) → thread id

// EngMunmap is the "advice" of eng-mm that means munmap.
const EngMunmap = -1

// engMM: Ints = [off, len, advice (or EngMunmap), key]. It publishes the id of the thread that
// makes the call under key (for eng-tid) just before it, so a test can watch that thread block on
// the event the call raises.
func engMM(c *child, r *Request) (Reply, []int) {
	if len(r.Ints) < 4 {
		return engFail("eng-mm: want [off, len, advice, key]")
	}
	a, err := c.area(r.Area)
	if err != nil {
		return engFail("eng-mm: %v", err)
	}
	off, n, adv, key := int(r.Ints[0]), int(r.Ints[1]), int(r.Ints[2]), r.Ints[3]
	if off < 0 || n <= 0 || off+n > len(a.Mem) {
		return engFail("eng-mm: [%d, %d) outside the %d-byte area", off, off+n, len(a.Mem))
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	engTIDs.Store(key, int64(unix.Gettid()))
	if adv == EngMunmap {
		if _, _, errno := unix.Syscall(unix.SYS_MUNMAP, a.Addr()+uintptr(off), uintptr(n), 0); errno != 0 {
			return engFail("eng-mm: munmap: %v", errno)
		}
		return Reply{}, nil
	}
	if err := unix.Madvise(a.Mem[off:off+n], adv); err != nil {
		return engFail("eng-mm: madvise(%d): %v", adv, err)
	}
	return Reply{}, nil
}

// engTID: Ints = [key]; Reply Ints = [thread id], 0 while none is published.
func engTID(_ *child, r *Request) (Reply, []int) {
	if len(r.Ints) < 1 {
		return engFail("eng-tid: want [key]")
	}
	tid, _ := engTIDs.Load(r.Ints[0])
	t, _ := tid.(int64)
	return Reply{Ints: []int64{t}}, nil
}

// engMremap moves the whole area to a fresh address aligned to its page size (hugetlb mremap
// needs huge-page alignment) and updates the area. Reply: Addr, the new address.
func engMremap(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return engFail("eng-mremap: %v", err)
	}
	size, ps := uintptr(len(a.Mem)), uintptr(a.PageSize)
	res, err := unix.MmapPtr(-1, 0, nil, size+ps, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return engFail("eng-mremap: reserve: %v", err)
	}
	head := ((uintptr(res)+ps-1)&^(ps-1) - uintptr(res))
	dst := unsafe.Add(res, head)
	na, err := unix.MremapPtr(unsafe.Pointer(&a.Mem[0]), size, dst, size, unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED)
	if err != nil {
		unix.MunmapPtr(res, size+ps)
		return engFail("eng-mremap: %v", err)
	}
	// Give back the reservation around the moved area.
	if head > 0 {
		unix.MunmapPtr(res, head)
	}
	if tail := ps - head; tail > 0 {
		unix.MunmapPtr(unsafe.Add(dst, size), tail)
	}
	c.setMem(r.Area, unsafe.Slice((*byte)(na), len(a.Mem)))
	return Reply{Addr: uint64(uintptr(na))}, nil
}

// engBalloon is the REMOVE storm. Ints = [touchers, chasers, durationMs, maxRun, chunk]; Seed is
// the pattern's. The area's pages are in chunks of chunk pages; odd chunks are the balloon's.
// For durationMs a balloon thread releases runs of 1..maxRun of its pages (MADV_REMOVE on shared
// memory, MADV_DONTNEED otherwise): fresh runs at a steady pace over the storm, runs already
// released again in between. Meanwhile touchers read random pages of the whole area and chasers
// read the run the balloon is about to release, each checking every byte against what the
// history allows:
//
//   - a page with no release begun before the read ended must hold the pattern;
//   - a page with a release finished before the read began must be all zeros;
//   - otherwise (the read overlapped a release) each byte must be its pattern byte or zero.
//
// After the storm one thread reads the whole area in order: released pages must be all zeros,
// the others the pattern. Reply: Mismatch (violations), Str (the first one described), Ints =
// [reads, reads that overlapped a release, madvise calls, pages released in total (the sum of
// the lengths of all madvise calls), final zero pages, final pattern pages, the longest read
// (ns), reads of 2 µs or more (faults), their 99th percentile (ns, a power of two: an upper
// bound)].
func engBalloon(c *child, r *Request) (Reply, []int) {
	if len(r.Ints) < 5 {
		return engFail("eng-balloon: want [touchers, chasers, durationMs, maxRun, chunk]")
	}
	a, err := c.area(r.Area)
	if err != nil {
		return engFail("eng-balloon: %v", err)
	}
	touchers, chasers := int(r.Ints[0]), int(r.Ints[1])
	duration := time.Duration(r.Ints[2]) * time.Millisecond
	maxRun, chunk := max(int(r.Ints[3]), 1), max(int(r.Ints[4]), 1)
	ps := a.PageSize
	nPages := len(a.Mem) / ps
	img := engImage(r.Seed, len(a.Mem))
	adv := unix.MADV_DONTNEED
	if a.Kind.Shared() {
		adv = unix.MADV_REMOVE
	}

	// The balloon's pages, cut into runs and shuffled: the order in which they are first released.
	type run struct{ p, n int }
	rng := rand.New(rand.NewPCG(r.Seed, 11))
	var fresh []run
	for p := 0; p < nPages; {
		if (p/chunk)%2 == 0 {
			p += chunk
			continue
		}
		end := min((p/chunk+1)*chunk, nPages)
		n := min(1+rng.IntN(maxRun), end-p)
		fresh = append(fresh, run{p, n})
		p += n
	}
	if len(fresh) == 0 {
		return engFail("eng-balloon: %d pages leave no balloon chunk (chunk %d)", nPages, chunk)
	}
	rng.Shuffle(len(fresh), func(i, j int) { fresh[i], fresh[j] = fresh[j], fresh[i] })

	started := make([]atomic.Uint32, nPages)  // releases of the page begun
	finished := make([]atomic.Uint32, nPages) // releases of the page returned
	var (
		stop                 atomic.Bool
		chase                atomic.Int64 // first page of the run about to be released
		reads, racy          atomic.Int64
		violations           atomic.Int64
		badMu                sync.Mutex
		firstBad             string
		madvises, pagesFreed int64
		slowest              atomic.Int64     // the longest read, in ns (a fault's wait as the guest sees it)
		slow                 [32]atomic.Int64 // reads of at least 2 µs (faults), by power of two of their ns
	)
	chase.Store(int64(fresh[0].p))
	report := func(format string, args ...any) {
		violations.Add(1)
		badMu.Lock()
		if firstBad == "" {
			firstBad = fmt.Sprintf(format, args...)
		}
		badMu.Unlock()
	}
	// check reads page p once (into buf) and judges it by the release history around the read.
	check := func(p int, buf []byte) {
		done := finished[p].Load()
		off := p * ps
		t0 := time.Now()
		if guarded(func() {
			atomic.LoadUint64((*uint64)(unsafe.Pointer(&a.Mem[off]))) // see engTouch
			copy(buf, a.Mem[off:off+ps])
		}) != 0 {
			report("page %d: SIGBUS/SIGSEGV on read", p)
			return
		}
		if ns := int64(time.Since(t0)); ns >= 2000 {
			slow[min(bits.Len64(uint64(ns)), len(slow)-1)].Add(1)
			for m := slowest.Load(); ns > m && !slowest.CompareAndSwap(m, ns); m = slowest.Load() {
			}
		}
		begun := started[p].Load()
		reads.Add(1)
		want := img[off : off+ps]
		switch {
		case bytes.Equal(buf, want):
			if done > 0 {
				report("page %d: source data after a release had finished (stale fill)", p)
			}
		case allZero(buf):
			if begun == 0 {
				report("page %d: zeros, but never released", p)
			}
			racy.Add(int64(min(begun-done, 1)))
		default:
			if begun == 0 || done > 0 {
				k := 0
				for buf[k] == want[k] {
					k++
				}
				report("page %d: byte %d is %#x, want %#x (releases begun %d, finished %d before the read)", p, k, buf[k], want[k], begun, done)
				return
			}
			racy.Add(1)
			for k := range buf {
				if buf[k] != want[k] && buf[k] != 0 {
					report("page %d: torn by a release, but byte %d is %#x: neither the pattern's %#x nor zero", p, k, buf[k], want[k])
					return
				}
			}
		}
	}

	// One P per thread, so every thread runs whenever the kernel schedules it, as the pthreads of
	// uffd-stress do: otherwise the balloon, back from madvise, queues behind the touchers for
	// one of GOMAXPROCS Ps and releases almost nothing.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(touchers + chasers + 2))
	var wg sync.WaitGroup
	for t := range touchers + chasers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			buf := make([]byte, ps)
			trng := rand.New(rand.NewPCG(r.Seed, uint64(100+t)))
			for !stop.Load() {
				if t < touchers {
					check(trng.IntN(nPages), buf)
					continue
				}
				p0 := int(chase.Load())
				for p := p0; p < min(p0+maxRun, nPages) && !stop.Load(); p++ {
					check(p, buf)
				}
			}
		}()
	}

	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		brng := rand.New(rand.NewPCG(r.Seed, 13))
		begin := time.Now()
		next := 0
		for {
			el := time.Since(begin)
			if el >= duration {
				break
			}
			var ru run
			due := int(float64(len(fresh))*float64(el)/float64(duration)) + 1
			if next < len(fresh) && next < due {
				// A fresh run: let the chasers at it first, so their faults race the release.
				ru = fresh[next]
				next++
				chase.Store(int64(ru.p))
				for spin := brng.IntN(8); spin > 0; spin-- {
					runtime.Gosched()
				}
			} else {
				ru = fresh[brng.IntN(next)]
			}
			for p := ru.p; p < ru.p+ru.n; p++ {
				started[p].Add(1)
			}
			if err := unix.Madvise(a.Mem[ru.p*ps:(ru.p+ru.n)*ps], adv); err != nil {
				report("madvise(%d) pages [%d, %d): %v", adv, ru.p, ru.p+ru.n, err)
				break
			}
			for p := ru.p; p < ru.p+ru.n; p++ {
				finished[p].Add(1)
			}
			madvises++
			pagesFreed += int64(ru.n)
			if madvises%16 == 0 {
				// Bursts: between them no event is in flight, and faults get through without
				// EAGAIN.
				time.Sleep(time.Duration(brng.IntN(500)) * time.Microsecond)
			}
		}
	}()
	stop.Store(true)
	wg.Wait()

	// The final pass: in order, so fault-around windows run up against every released run.
	var finalZero, finalPattern int64
	func() {
		buf := make([]byte, ps)
		zero := make([]byte, ps)
		for p := range nPages {
			off := p * ps
			if guarded(func() { copy(buf, a.Mem[off:off+ps]) }) != 0 {
				report("final pass: page %d: SIGBUS/SIGSEGV", p)
				continue
			}
			want, what := img[off:off+ps], "the pattern"
			if finished[p].Load() > 0 {
				want, what = zero, "zeros"
				finalZero++
			} else {
				finalPattern++
			}
			if !bytes.Equal(buf, want) {
				k := 0
				for buf[k] == want[k] {
					k++
				}
				report("final pass: page %d (released %d times) should be %s: byte %d is %#x, want %#x", p, finished[p].Load(), what, k, buf[k], want[k])
			}
		}
	}()
	// The 99th percentile of the slow reads, as the upper bound of its power-of-two bucket.
	var nslow, p99 int64
	for i := range slow {
		nslow += slow[i].Load()
	}
	for i, below := 0, int64(0); i < len(slow) && nslow > 0; i++ {
		if below += slow[i].Load(); below*100 >= nslow*99 {
			p99 = 1 << i
			break
		}
	}
	return Reply{Mismatch: int(violations.Load()), Str: firstBad,
		Ints: []int64{reads.Load(), racy.Load(), madvises, pagesFreed, finalZero, finalPattern, slowest.Load(), nslow, p99}}, nil
}
