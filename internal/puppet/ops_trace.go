//go:build linux

package puppet

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/internal/memory"
)

// Commands of the restore benchmark (internal/bench, restore.go): a VMM's vCPUs touching an
// explicit working set, as a recorded trace, over memory served by a uffd handler or mapped
// from the raw memory file the way Firecracker's File backend does.
//
//	trace-set       store the trace to run: Ints = [page, count, write (0/1)] per run
//	trace-map-file  map Size bytes of the file Str MAP_PRIVATE, read-write, no userfaultfd
//	                (Firecracker's File backend); the reply is a new area
//	trace-run       touch the stored trace in area Area with Threads threads, run i on thread
//	                i % Threads, each page a load of its first word, or a store of
//	                TraceWord(offset) into it for a write run (as touch does); the reply has Ns and, over the
//	                touches, Ints = [minor faults, major faults, CPU ns, bytes read from disk]
//	                of this process
//	trace-verify    compare every page of the stored trace in area Area with the file Str
//	                (the raw image) at PatternBase + offset, its first word TraceWord(offset)
//	                where the run wrote: Pages, Mismatch, FirstBad (-1 if none)

// TraceRun is Count pages from Page of a trace; Write runs store into their pages.
type TraceRun struct {
	Page, Count int
	Write       bool
}

// EncodeTrace is the Ints of a trace-set request.
func EncodeTrace(runs []TraceRun) []int64 {
	out := make([]int64, 0, 3*len(runs))
	for _, r := range runs {
		w := int64(0)
		if r.Write {
			w = 1
		}
		out = append(out, int64(r.Page), int64(r.Count), w)
	}
	return out
}

// TraceWord is what a write run stores in the first word of the page at offset off of its area
// (what a "touch" with Write stores).
func TraceWord(off int) uint64 { return uint64(off) }

// trace is the stored trace; a puppet runs one VMM, so one trace per process.
var trace struct {
	mu   sync.Mutex
	runs []TraceRun
}

func init() {
	registerOp("trace-set", traceSet)
	registerOp("trace-map-file", traceMapFile)
	registerOp("trace-run", traceRun)
	registerOp("trace-verify", traceVerify)
}

func traceFail(format string, args ...any) (Reply, []int) {
	return Reply{Err: fmt.Sprintf(format, args...)}, nil
}

func traceSet(_ *child, r *Request) (Reply, []int) {
	if len(r.Ints)%3 != 0 {
		return traceFail("trace-set: want Ints = [page, count, write] per run")
	}
	runs := make([]TraceRun, 0, len(r.Ints)/3)
	for i := 0; i < len(r.Ints); i += 3 {
		if r.Ints[i] < 0 || r.Ints[i+1] <= 0 {
			return traceFail("trace-set: run %d: page %d, count %d", i/3, r.Ints[i], r.Ints[i+1])
		}
		runs = append(runs, TraceRun{Page: int(r.Ints[i]), Count: int(r.Ints[i+1]), Write: r.Ints[i+2] != 0})
	}
	trace.mu.Lock()
	trace.runs = runs
	trace.mu.Unlock()
	return Reply{Pages: len(runs)}, nil
}

func storedTrace(a *memory.Area) ([]TraceRun, error) {
	trace.mu.Lock()
	runs := trace.runs
	trace.mu.Unlock()
	if len(runs) == 0 {
		return nil, fmt.Errorf("no trace set")
	}
	for _, t := range runs {
		if (t.Page+t.Count)*a.PageSize > len(a.Mem) {
			return nil, fmt.Errorf("run of %d pages at page %d outside the %d-byte area", t.Count, t.Page, len(a.Mem))
		}
	}
	return runs, nil
}

func traceMapFile(c *child, r *Request) (Reply, []int) {
	f, err := os.Open(r.Str)
	if err != nil {
		return traceFail("trace-map-file: %v", err)
	}
	defer f.Close() // the mapping keeps the file
	mem, err := unix.Mmap(int(f.Fd()), 0, r.Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		return traceFail("trace-map-file: mmap: %v", err)
	}
	a := &memory.Area{Kind: memory.Anon, Mem: mem, PageSize: os.Getpagesize()}
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	c.areas[id] = a
	c.mu.Unlock()
	return Reply{Area: id, Addr: uint64(a.Addr()), Size: len(mem), PageSize: a.PageSize, Pid: os.Getpid()}, nil
}

// usage is what trace-run reports of this process: faults, CPU time, bytes read from storage.
type usage struct{ minflt, majflt, cpu, read int64 }

func selfUsage() usage {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return usage{minflt: int64(ru.Minflt), majflt: int64(ru.Majflt), cpu: ru.Utime.Nano() + ru.Stime.Nano(), read: readBytes()}
}

// readBytes is read_bytes of /proc/self/io: what this process made the kernel fetch from
// storage, page faults on file mappings included (-1 if unreadable).
func readBytes() int64 {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return -1
	}
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		if v, ok := bytes.CutPrefix(s.Bytes(), []byte("read_bytes: ")); ok {
			n, err := strconv.ParseInt(string(v), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	return -1
}

func traceRun(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return traceFail("trace-run: %v", err)
	}
	runs, err := storedTrace(a)
	if err != nil {
		return traceFail("trace-run: %v", err)
	}
	threads := max(r.Threads, 1)
	load, store := &Request{}, &Request{Write: true}
	var sigbus atomic.Int64
	u0 := selfUsage()
	start := time.Now()
	onTouchingThreads(threads, func(t int) {
		for i := t; i < len(runs); i += threads {
			run, how := runs[i], load
			if run.Write {
				how = store
			}
			for p := run.Page; p < run.Page+run.Count; p++ {
				if c.touchPage(a, p*a.PageSize, a.PageSize, how) {
					sigbus.Add(1)
				}
			}
		}
	})
	ns := time.Since(start).Nanoseconds()
	u1 := selfUsage()
	pages := 0
	for _, run := range runs {
		pages += run.Count
	}
	return Reply{Ns: ns, Pages: pages, Sigbus: int(sigbus.Load()),
		Ints: []int64{u1.minflt - u0.minflt, u1.majflt - u0.majflt, u1.cpu - u0.cpu, u1.read - u0.read}}, nil
}

func traceVerify(c *child, r *Request) (Reply, []int) {
	a, err := c.area(r.Area)
	if err != nil {
		return traceFail("trace-verify: %v", err)
	}
	runs, err := storedTrace(a)
	if err != nil {
		return traceFail("trace-verify: %v", err)
	}
	f, err := os.Open(r.Str)
	if err != nil {
		return traceFail("trace-verify: %v", err)
	}
	defer f.Close()
	want := make([]byte, a.PageSize)
	pages, mismatch, firstBad := 0, 0, -1
	for _, run := range runs {
		for p := run.Page; p < run.Page+run.Count; p++ {
			off := p * a.PageSize
			if _, err := f.ReadAt(want, int64(r.PatternBase+off)); err != nil {
				return traceFail("trace-verify: reference at %d: %v", r.PatternBase+off, err)
			}
			if run.Write {
				binary.NativeEndian.PutUint64(want, TraceWord(off))
			}
			i := -1
			if guarded(func() { i = firstDiff(a.Mem[off:off+a.PageSize], want) }) != 0 {
				return traceFail("trace-verify: page at %d faulted", off)
			}
			pages++
			if i >= 0 {
				mismatch++
				if firstBad < 0 {
					firstBad = off + i
				}
			}
		}
	}
	return Reply{Pages: pages, Mismatch: mismatch, FirstBad: firstBad}, nil
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
