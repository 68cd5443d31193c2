//go:build linux

package puppet

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// Commands of the write-protect, MINOR and MOVE tests (uffd/wp_test.go, minor_test.go,
// move_test.go).
func init() {
	registerOp("wpmove-alias-fill", opAliasFill)
	registerOp("wpmove-verify", opVerifyXor)
	registerOp("wpmove-move", opMove)
	registerOp("wpmove-move-errors", opMoveErrors)
}

// opAliasFill writes the pattern of Seed into [Off, Off+Len) of the area's alias (Len 0: to
// the end): the page cache fills up while the registered mapping stays untouched. Hugetlb areas
// are MAP_NORESERVE, so a fill races with every other user of the hugepage pool (tests of other
// packages run at the same time): a SIGBUS from an empty pool is retried for a while. Reply:
// Pages, and Ints[0] the number of retries.
func opAliasFill(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	if a.Alias == nil {
		return Reply{Err: "area has no alias"}, nil
	}
	n := r.Len
	if n == 0 {
		n = len(a.Alias) - r.Off
	}
	deadline := time.Now().Add(20 * time.Second)
	retries := int64(0)
	for guarded(func() { Fill(a.Alias[r.Off:r.Off+n], r.Seed, r.Off) }) != 0 {
		if time.Now().After(deadline) {
			return Reply{Err: fmt.Sprintf("SIGBUS filling the alias %d times: hugepage pool empty", retries+1)}, nil
		}
		retries++
		time.Sleep(20 * time.Millisecond)
	}
	return Reply{Pages: n / a.PageSize, Ints: []int64{retries}}, nil
}

// opVerifyXor reads every byte of [Off, Off+Len) of the registered mapping, page by page on one
// locked thread, and compares it with the pattern of Seed xor Ints[0]. The first load of each
// page is what faults. Reply: Pages, Mismatch (pages with a wrong byte), FirstBad, Sigbus.
func opVerifyXor(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return Reply{Err: err.Error()}, nil
	}
	var x byte
	if len(r.Ints) > 0 {
		x = byte(r.Ints[0])
	}
	n := r.Len
	if n == 0 {
		n = len(a.Mem) - r.Off
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	rep := Reply{FirstBad: -1}
	for off := r.Off; off < r.Off+n; off += a.PageSize {
		page := a.Mem[off : off+a.PageSize]
		bad := -1
		if sig := guarded(func() {
			for i, b := range page {
				if b != Byte(r.Seed, off+i)^x {
					bad = off + i
					return
				}
			}
		}); sig != 0 {
			rep.Sigbus++
			continue
		}
		rep.Pages++
		if bad >= 0 {
			rep.Mismatch++
			if rep.FirstBad < 0 {
				rep.FirstBad = bad
			}
		}
	}
	return rep, nil
}

// mapAligned maps size bytes of private anonymous memory at an align-aligned address. Unmap it
// with unmapAligned (unix.Munmap only knows mappings made by unix.Mmap).
func mapAligned(size, align int) ([]byte, error) {
	raw, err := unix.MmapPtr(-1, 0, nil, uintptr(size+align), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	base := uintptr(raw)
	skip := (base+uintptr(align)-1)&^uintptr(align-1) - base
	if skip > 0 {
		if err := unix.MunmapPtr(raw, skip); err != nil {
			return nil, err
		}
	}
	if tail := uintptr(align) - skip; tail > 0 {
		if err := unix.MunmapPtr(unsafe.Add(raw, skip+uintptr(size)), tail); err != nil {
			return nil, err
		}
	}
	return unsafe.Slice((*byte)(unsafe.Add(raw, skip)), size), nil
}

func unmapAligned(b []byte) { unix.MunmapPtr(unsafe.Pointer(&b[0]), uintptr(len(b))) }

// countHuge counts the base pages of b that PAGEMAP_SCAN reports huge (THP).
func countHuge(pm *uffd.Pagemap, b []byte) (int, error) {
	start := uintptr(unsafe.Pointer(&b[0]))
	end := start + uintptr(len(b))
	var regs [64]uffd.PageRegion
	pages := 0
	for start < end {
		n, next, err := pm.Scan(regs[:], uffd.ScanRequest{Start: start, End: end, Mask: uffd.PageHuge, Return: uffd.PageHuge})
		if err != nil {
			return 0, err
		}
		for _, rg := range regs[:n] {
			pages += int(rg.Len()) / os.Getpagesize()
		}
		start = next
	}
	return pages, nil
}

// opMove is the kernel selftests' move and move-pmd scenario, run where it must run: MOVE only
// works from inside the process that owns the memory. The child makes a userfaultfd of its own,
// a pattern-filled src (Seed; MADV_NOHUGEPAGE, or MADV_HUGEPAGE with Str "pmd"; MADV_DONTFORK) and
// a dst of the same size registered MISSING, and serves dst's faults on a locked goroutine by
// moving the page (a 2 MiB chunk with "pmd") from src with MoveAllowSrcHoles, EEXIST meaning
// wake. The faults are raised inside a system call — MADV_POPULATE_READ of each dst page or
// chunk — so no goroutine of this process ever blocks in a user-mode fault on its own memory.
// After each, the chunk is compared with the pattern and src must read zero there.
//
// Ints[0] is the number of base pages (a multiple of 512 with "pmd"). Reply Ints: missing faults
// seen, pages verified equal to the pattern, src pages reading zero, src pages huge before the
// moves, dst pages huge after, EEXIST answers.
func opMove(c *child, r *Request) (Reply, []int) {
	fail := func(format string, args ...any) (Reply, []int) {
		return Reply{Err: fmt.Sprintf(format, args...)}, nil
	}
	if len(r.Ints) < 1 || r.Ints[0] <= 0 {
		return fail("wpmove-move: Ints[0] = pages")
	}
	ps := os.Getpagesize()
	pages := int(r.Ints[0])
	size := pages * ps
	chunk, advice := ps, unix.MADV_NOHUGEPAGE
	const pmdSize = 2 << 20
	if r.Str == "pmd" {
		chunk, advice = pmdSize, unix.MADV_HUGEPAGE
		if size%pmdSize != 0 {
			return fail("wpmove-move pmd: %d pages is not a whole number of 2 MiB chunks", pages)
		}
	}

	f, src, dst, release, err := moveSetup(size, pmdSize)
	if err != nil {
		return fail("%v", err)
	}
	defer release()
	if err := unix.Madvise(src, advice); err != nil {
		return fail("madvise src: %v", err)
	}
	Fill(src, r.Seed, 0)
	if err := unix.Madvise(src, unix.MADV_DONTFORK); err != nil {
		return fail("madvise src DONTFORK: %v", err)
	}
	if err := unix.Madvise(dst, advice); err != nil {
		return fail("madvise dst: %v", err)
	}
	srcBase, dstBase := uintptr(unsafe.Pointer(&src[0])), uintptr(unsafe.Pointer(&dst[0]))
	if _, err := f.Register(dstBase, uintptr(size), uffd.ModeMissing); err != nil {
		return fail("register dst: %v", err)
	}
	pm, err := uffd.OpenPagemap(0)
	if err != nil {
		return fail("%v", err)
	}
	defer pm.Close()
	srcHuge, err := countHuge(pm, src)
	if err != nil {
		return fail("scan src: %v", err)
	}

	rd, err := f.NewReader()
	if err != nil {
		return fail("reader: %v", err)
	}
	var faults, eexist atomic.Int64
	var handlerErr error
	var errOnce sync.Once
	setErr := func(err error) { errOnce.Do(func() { handlerErr = err }) }
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		msgs := make([]uffd.Msg, 16)
		for {
			n, err := rd.Read(msgs)
			if err != nil {
				if !errors.Is(err, uffd.ErrClosed) {
					setErr(fmt.Errorf("read: %w", err))
				}
				return
			}
			for i := range msgs[:n] {
				m := &msgs[i]
				if m.Event() != uffd.EventPagefault {
					setErr(fmt.Errorf("unexpected %v", m))
					continue
				}
				pf := m.Pagefault()
				if pf.Flags&(uffd.FaultWP|uffd.FaultMinor) != 0 {
					setErr(fmt.Errorf("unexpected fault %v", m))
				}
				faults.Add(1)
				at := pf.Address &^ uintptr(chunk-1)
				_, err := f.Move(at, srcBase+(at-dstBase), uintptr(chunk), uffd.MoveAllowSrcHoles)
				switch {
				case err == nil:
				case errors.Is(err, uffd.ErrExist):
					eexist.Add(1)
					err = f.Wake(at, uintptr(chunk))
				}
				if err != nil {
					// Let the faulting system call finish (with a zero page) rather than
					// hang; the verification then fails and the error is reported.
					setErr(err)
					f.Unregister(dstBase, uintptr(size))
					f.Wake(dstBase, uintptr(size))
				}
			}
		}
	}()

	verified, srcZero := 0, 0
	for off := 0; off < size; off += chunk {
		// The fault happens in the kernel, inside madvise: this goroutine is in a system call
		// and holds no P while the handler moves the page.
		if err := unix.Madvise(dst[off:off+ps], unix.MADV_POPULATE_READ); err != nil {
			f.Close()
			<-done
			return fail("MADV_POPULATE_READ dst+%#x: %v (handler: %v)", off, err, handlerErr)
		}
		for p := off; p < off+chunk; p += ps {
			ok := true
			for i, b := range dst[p : p+ps] {
				if b != Byte(r.Seed, p+i) {
					ok = false
					break
				}
			}
			if ok {
				verified++
			}
			zero := true
			for _, b := range src[p : p+ps] {
				if b != 0 {
					zero = false
					break
				}
			}
			if zero {
				srcZero++
			}
		}
	}
	dstHuge, err := countHuge(pm, dst)
	if err != nil {
		return fail("scan dst: %v", err)
	}
	f.Close()
	<-done
	rep := Reply{Ints: []int64{faults.Load(), int64(verified), int64(srcZero), int64(srcHuge), int64(dstHuge), eexist.Load()}}
	if handlerErr != nil {
		rep.Err = "handler: " + handlerErr.Error()
	}
	return rep, nil
}

// opMoveErrors provokes MOVE's errors from inside the owning process, on four pages of src and
// dst (dst registered MISSING; no fault is ever raised):
//
//	page 0: dst populated before registering        → MOVE: EEXIST
//	page 1: src a hole                               → MOVE: ENOENT; with MoveAllowSrcHoles: done, dst stays empty
//	page 2: plain                                    → MOVE: done, dst has the data, src empty
//	page 3: src shared with a forked child (alive)   → MOVE: EBUSY
//
// Reply Ints: errno of page 0, of page 1, bytes moved with holes allowed, bytes moved on page 2,
// errno of page 3; then flags (1 = yes): dst page 1 present after the hole move, dst page 2
// equal to the pattern, src page 2 present after the move. Str describes the errors.
func opMoveErrors(c *child, r *Request) (Reply, []int) {
	fail := func(format string, args ...any) (Reply, []int) {
		return Reply{Err: fmt.Sprintf(format, args...)}, nil
	}
	ps := os.Getpagesize()
	size := 4 * ps
	f, src, dst, release, err := moveSetup(size, ps)
	if err != nil {
		return fail("%v", err)
	}
	defer release()
	unix.Madvise(src, unix.MADV_NOHUGEPAGE)
	unix.Madvise(dst, unix.MADV_NOHUGEPAGE)
	Fill(src, r.Seed, 0)
	dst[0] = 1 // page 0 populated
	if err := unix.Madvise(src[ps:2*ps], unix.MADV_DONTNEED); err != nil {
		return fail("madvise: %v", err)
	}
	sb, db := uintptr(unsafe.Pointer(&src[0])), uintptr(unsafe.Pointer(&dst[0]))
	if _, err := f.Register(db, uintptr(size), uffd.ModeMissing); err != nil {
		return fail("register: %v", err)
	}
	pm, err := uffd.OpenPagemap(0)
	if err != nil {
		return fail("%v", err)
	}
	defer pm.Close()
	present := func(addr uintptr) int64 {
		if e, err := pm.Entry(addr); err == nil && e.Present() {
			return 1
		}
		return 0
	}
	errnoOf := func(err error) int64 {
		var e *uffd.OpError
		if errors.As(err, &e) {
			return int64(e.Errno)
		}
		return 0
	}
	pg := uintptr(ps)
	var desc []string
	note := func(what string, err error) {
		if err != nil {
			desc = append(desc, what+": "+err.Error())
		}
	}

	_, err0 := f.Move(db, sb, pg, 0)
	note("page 0", err0)
	_, err1 := f.Move(db+pg, sb+pg, pg, 0)
	note("page 1", err1)
	holes, err := f.Move(db+pg, sb+pg, pg, uffd.MoveAllowSrcHoles)
	note("page 1 holes allowed", err)
	dst1Present := present(db + pg)
	moved, err := f.Move(db+2*pg, sb+2*pg, pg, 0)
	note("page 2", err)
	same := int64(1)
	for i, b := range dst[2*ps : 3*ps] {
		if b != Byte(r.Seed, 2*ps+i) {
			same = 0
			break
		}
	}
	src2Present := present(sb + 2*pg)

	err3, err := moveWhileForked(f, db+3*pg, sb+3*pg, pg)
	if err != nil {
		return fail("fork: %v", err)
	}
	note("page 3", err3)
	return Reply{
		Ints: []int64{errnoOf(err0), errnoOf(err1), int64(holes), int64(moved), errnoOf(err3), dst1Present, same, src2Present},
		Str:  fmt.Sprint(desc),
	}, nil
}

// moveWhileForked forks a child that shares the page at src and waits on a pipe, issues the
// MOVE while the child is alive, then releases and reaps the child.
func moveWhileForked(f *uffd.FD, dst, src, n uintptr) (moveErr, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	var b [1]byte
	args := blockedArgs{fd: uintptr(p[0]), buf: unsafe.Pointer(&b[0])}
	runtime.LockOSThread()
	pid, errno := rawFork()
	if pid == 0 {
		blockedChild(&args) // never returns
	}
	runtime.UnlockOSThread()
	runtime.KeepAlive(&b)
	if errno != 0 {
		return nil, errno
	}
	_, moveErr = f.Move(dst, src, n, 0)
	unix.Write(p[1], []byte{1})
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(int(pid), &ws, 0, nil)
		if err != unix.EINTR {
			break
		}
	}
	return moveErr, nil
}

type blockedArgs struct {
	fd  uintptr
	buf unsafe.Pointer
}

// blockedChild runs in the forked child: it waits for one byte on the pipe and exits. Raw
// system calls only, no Go runtime.
//
//go:nosplit
func blockedChild(a *blockedArgs) {
	syscall.RawSyscall(unix.SYS_READ, a.fd, uintptr(a.buf), 1)
	for {
		syscall.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
	}
}

// moveSetup makes what the MOVE commands share: a userfaultfd of this process with FeatureMove,
// and src and dst areas of size bytes aligned to align. done releases all three.
func moveSetup(size, align int) (f *uffd.FD, src, dst []byte, done func(), err error) {
	if f, err = uffd.Open(uffd.Options{}); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("open: %w", err)
	}
	if _, err = f.API(uffd.FeatureMove); err != nil {
		f.Close()
		return nil, nil, nil, nil, fmt.Errorf("API(MOVE): %w", err)
	}
	if src, err = mapAligned(size, align); err != nil {
		f.Close()
		return nil, nil, nil, nil, fmt.Errorf("map src: %w", err)
	}
	if dst, err = mapAligned(size, align); err != nil {
		unmapAligned(src)
		f.Close()
		return nil, nil, nil, nil, fmt.Errorf("map dst: %w", err)
	}
	return f, src, dst, func() { unmapAligned(dst); unmapAligned(src); f.Close() }, nil
}
