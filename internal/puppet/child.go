//go:build linux

package puppet

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/uffd"
)

// EnvVar marks a process started as a puppet; its value is the number of the control socket.
const EnvVar = "FAULTLINE_PUPPET_FD"

// Main runs the command loop and exits if this process was started as a puppet; otherwise it
// returns at once. Call it first thing in main and in TestMain.
func Main() {
	v := os.Getenv(EnvVar)
	if v == "" {
		return
	}
	var fd int
	if _, err := fmt.Sscan(v, &fd); err != nil {
		fmt.Fprintln(os.Stderr, "puppet: bad", EnvVar, v)
		os.Exit(2)
	}
	c := &child{sock: fd, areas: map[int]*memory.Area{}}
	os.Exit(c.loop())
}

type child struct {
	sock   int
	sendMu sync.Mutex
	mu     sync.Mutex
	areas  map[int]*memory.Area
	nextID int
	uffd   *uffd.FD
}

func (c *child) loop() int {
	buf := make([]byte, 1<<20)
	var wg sync.WaitGroup
	for {
		n, _, _, _, err := unix.Recvmsg(c.sock, buf, nil, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			wg.Wait()
			return 0 // parent gone or closed: exit quietly
		}
		var req Request
		if err := json.Unmarshal(buf[:n], &req); err != nil {
			c.send(Reply{Err: "bad request: " + err.Error()}, nil)
			continue
		}
		if req.Op == "exit" {
			c.send(Reply{ID: req.ID}, nil)
			return req.Expect
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep, fds := c.do(&req)
			rep.ID = req.ID
			c.send(rep, fds)
		}()
	}
}

func (c *child) send(r Reply, fds []int) {
	b, _ := json.Marshal(r)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	for {
		err := unix.Sendmsg(c.sock, b, oob, nil, 0)
		if err != unix.EINTR {
			return
		}
	}
}

// extraOps are commands defined in other files of this package (one file per group of tests),
// registered from init functions with registerOp.
var extraOps = map[string]func(c *child, r *Request) (Reply, []int){}

func registerOp(name string, fn func(c *child, r *Request) (Reply, []int)) {
	if extraOps[name] != nil {
		panic("puppet: op registered twice: " + name)
	}
	extraOps[name] = fn
}

// currentUffd is the userfaultfd the child made last, or nil.
func (c *child) currentUffd() *uffd.FD {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.uffd
}

// area returns a copy of area id, taken under c.mu: commands run concurrently (a touch blocked
// on a fault while another command moves the area), and an mremap replaces the stored mapping
// with setMem, so no command reads a field that another may be writing. A command sees the area
// as it was when it began, as a VMM thread that loaded the address before the move would.
func (c *child) area(id int) (*memory.Area, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.areas[id]
	if a == nil {
		return nil, fmt.Errorf("no area %d", id)
	}
	cp := *a
	return &cp, nil
}

// setMem records that area id now lives at mem (after an mremap).
func (c *child) setMem(id int, mem []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.areas[id].Mem = mem
}

func (c *child) do(r *Request) (rep Reply, fds []int) {
	fail := func(err error) (Reply, []int) { return Reply{Err: err.Error()}, nil }
	switch r.Op {
	case "map":
		k, err := memory.ParseKind(r.Kind)
		if err != nil {
			return fail(err)
		}
		a, err := memory.Map(k, r.Size, r.Alias)
		if err != nil {
			return fail(err)
		}
		c.mu.Lock()
		c.nextID++
		id := c.nextID
		c.areas[id] = a
		c.mu.Unlock()
		rep = Reply{Area: id, Addr: uint64(a.Addr()), AliasAddr: uint64(a.AliasAddr()), Size: len(a.Mem), PageSize: a.PageSize, Pid: os.Getpid()}
		if a.File != nil {
			fds = []int{int(a.File.Fd())}
		}
		return rep, fds
	case "uffd":
		f, err := uffd.Open(uffd.Options{UserModeOnly: r.UserModeOnly, Blocking: r.Blocking})
		if err != nil {
			return fail(err)
		}
		if _, err := f.API(uffd.Feature(r.Features)); err != nil {
			f.Close()
			return fail(err)
		}
		c.mu.Lock()
		old := c.uffd
		c.uffd = f
		c.mu.Unlock()
		if old != nil {
			old.Close()
		}
		return Reply{Pid: os.Getpid()}, []int{f.Fd()}
	case "close-uffd":
		c.mu.Lock()
		f := c.uffd
		c.uffd = nil
		c.mu.Unlock()
		if f != nil {
			f.Close()
		}
		return Reply{}, nil
	case "register", "unregister":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		start, n := a.Addr()+uintptr(r.Off), uintptr(r.Len)
		if n == 0 {
			n = uintptr(len(a.Mem) - r.Off)
		}
		c.mu.Lock()
		f := c.uffd
		c.mu.Unlock()
		if f == nil {
			return fail(errors.New("no uffd"))
		}
		if r.Op == "unregister" {
			if err := f.Unregister(start, n); err != nil {
				return fail(err)
			}
			return Reply{}, nil
		}
		io, err := f.Register(start, n, uffd.RegisterMode(r.Mode))
		if err != nil {
			return fail(err)
		}
		return Reply{Ioctls: uint64(io)}, nil
	case "touch":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		return c.touch(a, r), nil
	case "read":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		out := make([]byte, r.Len)
		sig := guarded(func() { copy(out, a.Mem[r.Off:r.Off+r.Len]) })
		return Reply{Data: out, Sigbus: sig}, nil
	case "write":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		sig := guarded(func() { copy(a.Mem[r.Off:], r.Data) })
		return Reply{Sigbus: sig}, nil
	case "madvise":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		if err := unix.Madvise(a.Mem[r.Off:r.Off+r.Len], r.Advice); err != nil {
			return fail(fmt.Errorf("madvise(%d): %w", r.Advice, err))
		}
		return Reply{}, nil
	case "release":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		n := r.Len
		if n == 0 {
			n = len(a.Mem) - r.Off
		}
		if err := a.Release(r.Off, n); err != nil {
			return fail(err)
		}
		return Reply{}, nil
	case "mremap":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		return c.mremap(r.Area, a)
	case "munmap":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		_, _, errno := unix.Syscall(unix.SYS_MUNMAP, a.Addr()+uintptr(r.Off), uintptr(r.Len), 0)
		if errno != 0 {
			return fail(fmt.Errorf("munmap: %w", errno))
		}
		return Reply{}, nil
	case "pagemap":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		pm, err := pagemap(a.Addr()+uintptr(r.Off), r.Len/os.Getpagesize())
		if err != nil {
			return fail(err)
		}
		return Reply{Pagemap: pm}, nil
	case "fork":
		a, err := c.area(r.Area)
		if err != nil {
			return fail(err)
		}
		return c.fork(a, r)
	case "fds":
		ents, _ := os.ReadDir("/proc/self/fd")
		return Reply{NumFDs: len(ents)}, nil
	case "sleep":
		time.Sleep(time.Duration(r.Len) * time.Millisecond)
		return Reply{}, nil
	}
	if op := extraOps[r.Op]; op != nil {
		return op(c, r)
	}
	return fail(fmt.Errorf("unknown op %q", r.Op))
}

// guarded runs fn with faults turned into panics, and reports how many SIGBUS/SIGSEGV it took
// (0 or 1): poisoned pages and SIGBUS-mode registrations raise them.
func guarded(fn func()) (faults int) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(interface{ Addr() uintptr }); ok {
				faults = 1
				return
			}
			panic(r)
		}
	}()
	fn()
	return 0
}

func (c *child) touch(a *memory.Area, r *Request) Reply {
	stride := r.Stride
	if stride == 0 {
		stride = a.PageSize
	}
	n := r.Len
	if n == 0 {
		n = len(a.Mem) - r.Off
	}
	pages := n / stride
	threads := max(r.Threads, 1)
	order := make([]int, pages)
	for i := range order {
		order[i] = i
	}
	if r.Order == "rand" {
		rng := rand.New(rand.NewPCG(r.Seed, 1))
		rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	}
	var sigbus, mismatch atomic.Int64
	firstBad := atomic.Int64{}
	firstBad.Store(-1)
	start := time.Now()
	onTouchingThreads(threads, func(t int) {
		// Threads take interleaved pages of the order, so with "seq" each sees a sequential
		// stream and together they cover the area; with "parts" each walks its own
		// contiguous part in order, as vCPUs running their own work do.
		first, end, step := t, pages, threads
		if r.Order == "parts" {
			first, end, step = t*pages/threads, (t+1)*pages/threads, 1
		}
		for i := first; i < end; i += step {
			off := r.Off + order[i]*stride
			if c.touchPage(a, off, stride, r) {
				sigbus.Add(1)
				continue
			}
			if bad := check(a.Mem[off:off+stride], off+r.PatternBase, r); bad >= 0 {
				mismatch.Add(1)
				firstBad.CompareAndSwap(-1, int64(bad))
			}
		}
	})
	return Reply{Ns: time.Since(start).Nanoseconds(), Pages: pages, Sigbus: int(sigbus.Load()),
		Mismatch: int(mismatch.Load()), FirstBad: int(firstBad.Load())}
}

// onTouchingThreads runs fn(0..n-1) on n locked OS threads at once, each turning a fault on
// unmapped memory into a panic touchPage recovers, and waits for them.
func onTouchingThreads(n int, fn func(t int)) {
	var wg sync.WaitGroup
	for t := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			old := debug.SetPanicOnFault(true)
			defer debug.SetPanicOnFault(old)
			fn(t)
		}()
	}
	wg.Wait()
}

// touchPage reads (or writes) the first word of the page; it reports a fault turned panic.
func (c *child) touchPage(a *memory.Area, off, stride int, r *Request) (faulted bool) {
	defer func() {
		if p := recover(); p != nil {
			if _, ok := p.(interface{ Addr() uintptr }); !ok {
				panic(p)
			}
			faulted = true
		}
	}()
	p := (*uint64)(unsafe.Pointer(&a.Mem[off]))
	if r.Write {
		if r.Verify == "counter" {
			*p++
		} else {
			*p = uint64(off)
		}
	} else {
		sink.Add(atomic.LoadUint64(p))
	}
	return false
}

var sink atomic.Uint64

// check verifies a touched page against r.Verify; it returns the offset of the first wrong byte
// or -1.
func check(page []byte, off int, r *Request) int {
	switch r.Verify {
	case "pattern":
		for i, b := range page {
			if b != Byte(r.Seed, off+i) {
				return off + i
			}
		}
	case "pattern-sample":
		for _, i := range []int{8, 9, len(page) / 2, len(page) - 1} {
			if page[i] != Byte(r.Seed, off+i) {
				return off + i
			}
		}
	case "zero":
		for i, b := range page {
			if b != 0 {
				return off + i
			}
		}
	case "counter":
		// The first word was just incremented from the expected value r.Expect.
		if v := binary.NativeEndian.Uint64(page); v != uint64(r.Expect)+1 {
			return off
		}
	}
	return -1
}

func (c *child) mremap(id int, a *memory.Area) (Reply, []int) {
	// Reserve a fresh place of the same size and move the area there, so it always moves.
	dst, err := unix.MmapPtr(-1, 0, nil, uintptr(len(a.Mem)), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return Reply{Err: fmt.Sprintf("mmap reserve: %v", err)}, nil
	}
	na, err := unix.MremapPtr(unsafe.Pointer(&a.Mem[0]), uintptr(len(a.Mem)), dst, uintptr(len(a.Mem)), unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED)
	if err != nil {
		return Reply{Err: fmt.Sprintf("mremap: %v", err)}, nil
	}
	c.setMem(id, unsafe.Slice((*byte)(na), len(a.Mem)))
	return Reply{Addr: uint64(uintptr(na))}, nil
}

// pagemap reads /proc/self/pagemap entries for n pages from addr.
func pagemap(addr uintptr, n int) ([]uint64, error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, 8*n)
	if _, err := f.ReadAt(b, int64(addr/uintptr(os.Getpagesize()))*8); err != nil {
		return nil, err
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = binary.NativeEndian.Uint64(b[8*i:])
	}
	return out, nil
}
