//go:build linux

package puppet

// Child side of the uffd-stress port (uffd/stress_test.go; the kernel selftest is
// tools/testing/selftests/mm/uffd-stress.c). The child owns
// two areas of one memory kind, src and dst, and the count_verify array; it registers dst, runs
// the locking threads that fault on dst, and checks the counters. The parent serves the faults.
//
// Page layout (our own, in the spirit of the selftest's mutex + counter):
//
//	[0, 8)          lock word: 0 free, 1 held (taken with a CAS, like a spin mutex)
//	[8, 16)         counter
//	[16, 24)        tag of the page number (never changes; catches a page copied to the wrong place)
//	[size-8, size)  the same tag (catches a page copied only in part)
//
// Commands (Ints are the arguments, see each function):
//
//	stress-init     set up a session over two mapped areas; sends the mailbox memfd
//	stress-prepare  snapshot src into the mailbox, register dst (Mode), empty dst
//	stress-lock     start the locking threads of one bounce
//	stress-finish   release src, stop and join the locking threads
//	stress-end      unregister dst, verify it (optionally), swap src and dst
//	stress-ring     fault once on each page of a doorbell area (wakes blocking readers)

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// Bounce mode bits, as uffd-stress derives them from the number of bounces left.
const (
	StressRandom  = 1 // lockers pick pages at random
	StressRacing  = 2 // all lockers start at the same page
	StressVerify  = 4 // check every counter after the bounce
	StressPoll    = 8 // the handler polls a non-blocking uffd (else blocking read)
	stressTagBase = 0x5354524553530000
)

// StressTag is the tag stored twice in page nr of a stress area.
func StressTag(nr int) uint64 { return stressTagBase ^ uint64(nr)*0x9E3779B97F4A7C15 }

type stressSession struct {
	// mu serialises the commands on a session. The parent sends them one after another, but
	// the child runs each in a goroutine of its own, and an ordering that goes through another
	// process is invisible to the race detector.
	mu sync.Mutex

	src, dst *memory.Area // swapped after every bounce
	nrPages  int
	pageSize int
	// verify is count_verify: the value every page's counter must hold. It lives in the child's
	// own heap, never in registered memory; lockers update verify[p] only while holding page p's
	// lock.
	verify   []uint64
	mailbox  []byte   // MAP_SHARED mapping of mailboxF, which the parent maps and COPYs from
	mailboxF *os.File // kept open: its fd is what stress-init sends

	finished atomic.Bool
	lockers  sync.WaitGroup
	incs     atomic.Int64
	bad      atomic.Int64
	badMu    sync.Mutex
	firstBad string
}

var (
	stressMu       sync.Mutex
	stressSessions = map[int64]*stressSession{}
	stressNextID   int64
)

func init() {
	registerOp("stress-init", stressInit)
	registerOp("stress-prepare", stressPrepare)
	registerOp("stress-lock", stressLock)
	registerOp("stress-finish", stressFinish)
	registerOp("stress-end", stressEnd)
	registerOp("stress-ring", stressRing)
}

func stressFail(format string, a ...any) (Reply, []int) {
	return Reply{Err: fmt.Sprintf(format, a...)}, nil
}

func stressGet(r *Request, nargs int) (*stressSession, error) {
	if len(r.Ints) < nargs {
		return nil, fmt.Errorf("%s: want %d int arguments, got %d", r.Op, nargs, len(r.Ints))
	}
	stressMu.Lock()
	defer stressMu.Unlock()
	s := stressSessions[r.Ints[0]]
	if s == nil {
		return nil, fmt.Errorf("%s: no stress session %d", r.Op, r.Ints[0])
	}
	return s, nil
}

func (s *stressSession) word(a *memory.Area, nr, off int) *uint64 {
	return (*uint64)(unsafe.Pointer(&a.Mem[nr*s.pageSize+off]))
}

// stressInit: Ints = [areaA, areaB]; A becomes src (initialised: counters 1, locks free, tags),
// B becomes dst (emptied). Reply Ints = [session, nrPages, pageSize]; fds = [mailbox memfd].
func stressInit(c *child, r *Request) (Reply, []int) {
	if len(r.Ints) < 2 {
		return stressFail("stress-init: want [areaA, areaB]")
	}
	a, err := c.area(int(r.Ints[0]))
	if err != nil {
		return stressFail("stress-init: %v", err)
	}
	b, err := c.area(int(r.Ints[1]))
	if err != nil {
		return stressFail("stress-init: %v", err)
	}
	if a.Kind != b.Kind || len(a.Mem) != len(b.Mem) {
		return stressFail("stress-init: areas differ (%v %d, %v %d)", a.Kind, len(a.Mem), b.Kind, len(b.Mem))
	}
	s := &stressSession{src: a, dst: b, pageSize: a.PageSize, nrPages: len(a.Mem) / a.PageSize}
	s.verify = make([]uint64, s.nrPages)
	for nr := range s.nrPages {
		*s.word(a, nr, 0) = 0
		*s.word(a, nr, 8) = 1
		*s.word(a, nr, 16) = StressTag(nr)
		*s.word(a, nr, s.pageSize-8) = StressTag(nr)
		s.verify[nr] = 1
	}
	if err := b.Release(0, len(b.Mem)); err != nil {
		return stressFail("stress-init: release dst: %v", err)
	}
	// The mailbox: COPY reads its source from the caller's address space, and the caller is the
	// parent. Private memory (anon, shmem-private, hugetlb-private) cannot be mapped there, so the
	// child snapshots src into this shared memfd before every bounce and the parent COPYs from
	// its own mapping of it. src does not change during a bounce (lockers write dst only).
	fd, err := unix.MemfdCreate("faultline-stress-mailbox", unix.MFD_CLOEXEC)
	if err != nil {
		return stressFail("stress-init: memfd_create: %v", err)
	}
	s.mailboxF = os.NewFile(uintptr(fd), "mailbox")
	if err := unix.Ftruncate(fd, int64(len(a.Mem))); err != nil {
		s.mailboxF.Close()
		return stressFail("stress-init: ftruncate mailbox: %v", err)
	}
	s.mailbox, err = unix.Mmap(fd, 0, len(a.Mem), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		s.mailboxF.Close()
		return stressFail("stress-init: mmap mailbox: %v", err)
	}
	stressMu.Lock()
	stressNextID++
	id := stressNextID
	stressSessions[id] = s
	stressMu.Unlock()
	return Reply{Ints: []int64{id, int64(s.nrPages), int64(s.pageSize)}}, []int{fd}
}

// stressPrepare: Ints = [session]; Mode = registration mode. Snapshots src into the mailbox,
// registers dst on the child's uffd and empties it. The order (register, then release) is the
// selftest's: anything mapped into dst before the registration is dropped again.
func stressPrepare(c *child, r *Request) (Reply, []int) {
	s, err := stressGet(r, 1)
	if err != nil {
		return stressFail("%v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f := c.currentUffd()
	if f == nil {
		return stressFail("stress-prepare: no uffd")
	}
	copy(s.mailbox, s.src.Mem)
	io, err := f.Register(s.dst.Addr(), uintptr(len(s.dst.Mem)), uffd.RegisterMode(r.Mode))
	if err != nil {
		return stressFail("stress-prepare: %v", err)
	}
	if err := s.dst.Release(0, len(s.dst.Mem)); err != nil {
		return stressFail("stress-prepare: release dst: %v", err)
	}
	return Reply{Ioctls: uint64(io), Ints: []int64{int64(s.src.Addr()), int64(s.dst.Addr())}}, nil
}

// stressLock: Ints = [session, mode, nrParallel]. Starts nrParallel locking threads on dst and
// returns once all of them run. Each does at least one locked increment before it looks at the
// finished flag, so every bounce faults.
func stressLock(c *child, r *Request) (Reply, []int) {
	s, err := stressGet(r, 3)
	if err != nil {
		return stressFail("%v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	mode, nrPar := int(r.Ints[1]), int(r.Ints[2])
	if nrPar < 1 || s.nrPages%nrPar != 0 {
		return stressFail("stress-lock: %d pages do not split over %d threads", s.nrPages, nrPar)
	}
	s.finished.Store(false)
	s.incs.Store(0)
	s.bad.Store(0)
	s.badMu.Lock()
	s.firstBad = ""
	s.badMu.Unlock()
	var started sync.WaitGroup
	for cpu := range nrPar {
		s.lockers.Add(1)
		started.Add(1)
		go func() {
			defer s.lockers.Done()
			s.locker(cpu, mode, nrPar, &started)
		}()
	}
	started.Wait()
	return Reply{}, nil
}

func (s *stressSession) report(format string, a ...any) {
	if s.bad.Add(1) == 1 {
		s.badMu.Lock()
		s.firstBad = fmt.Sprintf(format, a...)
		s.badMu.Unlock()
	}
}

// locker is the selftest's locking thread: pick a page (sequentially from an offset that moves
// with the bounce number, from its own slice unless racing; or at random), take the page's lock
// (its first access is a read, so the MISSING fault is a read fault), check the counter against
// count_verify, increment both, unlock.
func (s *stressSession) locker(cpu, mode, nrPar int, started *sync.WaitGroup) {
	nrPages := uint64(s.nrPages)
	perCPU := nrPages / uint64(nrPar)
	var pageNr uint64
	if mode&StressRandom == 0 {
		pageNr = -uint64(mode) // the selftest starts at -bounces, unsigned
		if mode&StressRacing == 0 {
			pageNr += uint64(cpu) * perCPU
		}
	}
	rng := rand.New(rand.NewPCG(uint64(mode)<<8|uint64(cpu), uint64(os.Getpid())))
	mem := s.dst.Mem
	ps := uint64(s.pageSize)
	started.Done()
	for {
		if mode&StressRandom != 0 {
			pageNr = rng.Uint64()
		} else {
			pageNr++
		}
		pageNr %= nrPages
		base := unsafe.Pointer(&mem[pageNr*ps])
		lock := (*uint64)(base)
		counter := (*uint64)(unsafe.Add(base, 8))
		// First touch: a plain read of the lock word (pthread_mutex_lock reads the mutex type
		// first), then take it.
		_ = atomic.LoadUint64(lock)
		for spins := 0; !atomic.CompareAndSwapUint64(lock, 0, 1); spins++ {
			if spins&15 == 15 {
				runtime.Gosched()
			}
		}
		// verify[p] is guarded by page p's lock; it is accessed atomically only because the race
		// detector does not see the lock (it lives outside the Go heap).
		count := atomic.LoadUint64(counter)
		if want := atomic.LoadUint64(&s.verify[pageNr]); count != want {
			s.report("page %d: counter %d, count_verify %d", pageNr, count, want)
		}
		if tag := *(*uint64)(unsafe.Add(base, 16)); tag != StressTag(int(pageNr)) {
			s.report("page %d: tag %#x, want %#x (page copied to the wrong place?)", pageNr, tag, StressTag(int(pageNr)))
		}
		count++
		atomic.StoreUint64(counter, count)
		atomic.StoreUint64(&s.verify[pageNr], count)
		atomic.StoreUint64(lock, 0)
		s.incs.Add(1)
		if s.finished.Load() {
			return
		}
	}
}

// stressFinish: Ints = [session]. Releases src (the whole area has been transferred by the
// parent's background copies), sets finished and joins the lockers. Reply Ints =
// [increments, mismatches]; Str = first mismatch.
func stressFinish(c *child, r *Request) (Reply, []int) {
	s, err := stressGet(r, 1)
	if err != nil {
		return stressFail("%v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.src.Release(0, len(s.src.Mem)); err != nil {
		s.finished.Store(true)
		s.lockers.Wait()
		return stressFail("stress-finish: release src: %v", err)
	}
	s.finished.Store(true)
	s.lockers.Wait()
	s.badMu.Lock()
	first := s.firstBad
	s.badMu.Unlock()
	return Reply{Ints: []int64{s.incs.Load(), s.bad.Load()}, Str: first}, nil
}

// stressEnd: Ints = [session, verify]. Unregisters dst, checks every page of it if verify != 0
// (counter == count_verify, lock free, both tags), then swaps src and dst. Reply Ints =
// [pages checked, mismatches]; Str = first mismatch.
func stressEnd(c *child, r *Request) (Reply, []int) {
	s, err := stressGet(r, 2)
	if err != nil {
		return stressFail("%v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f := c.currentUffd()
	if f == nil {
		return stressFail("stress-end: no uffd")
	}
	if err := f.Unregister(s.dst.Addr(), uintptr(len(s.dst.Mem))); err != nil {
		return stressFail("stress-end: %v", err)
	}
	var checked, bad int64
	var first string
	if r.Ints[1] != 0 {
		for nr := range s.nrPages {
			checked++
			page := s.dst.Mem[nr*s.pageSize : (nr+1)*s.pageSize]
			lock := binary.NativeEndian.Uint64(page[0:])
			count := binary.NativeEndian.Uint64(page[8:])
			tag1 := binary.NativeEndian.Uint64(page[16:])
			tag2 := binary.NativeEndian.Uint64(page[s.pageSize-8:])
			if count != s.verify[nr] || lock != 0 || tag1 != StressTag(nr) || tag2 != StressTag(nr) {
				bad++
				if first == "" {
					first = fmt.Sprintf("page %d: counter %d (count_verify %d), lock %d, tags %#x %#x (want %#x)",
						nr, count, s.verify[nr], lock, tag1, tag2, StressTag(nr))
				}
			}
		}
	}
	s.src, s.dst = s.dst, s.src
	return Reply{Ints: []int64{checked, bad}, Str: first}, nil
}

// stressRing: Ints = [area, n]. Empties the first n pages of the area (a doorbell registered
// MISSING by the parent), then reads each from its own thread, so n MISSING faults arrive
// together; returns once all were served. Blocking readers of the uffd wake up on them.
func stressRing(c *child, r *Request) (Reply, []int) {
	if len(r.Ints) < 2 {
		return stressFail("stress-ring: want [area, n]")
	}
	a, err := c.area(int(r.Ints[0]))
	if err != nil {
		return stressFail("stress-ring: %v", err)
	}
	n := int(r.Ints[1])
	if n < 1 || n*a.PageSize > len(a.Mem) {
		return stressFail("stress-ring: %d pages do not fit the area", n)
	}
	if err := a.Release(0, n*a.PageSize); err != nil {
		return stressFail("stress-ring: %v", err)
	}
	var wg sync.WaitGroup
	var sum atomic.Uint64
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sum.Add(atomic.LoadUint64((*uint64)(unsafe.Pointer(&a.Mem[i*a.PageSize]))))
		}()
	}
	wg.Wait()
	if sum.Load() != 0 {
		return stressFail("stress-ring: doorbell pages not zero")
	}
	return Reply{}, nil
}
