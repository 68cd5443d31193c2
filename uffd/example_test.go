//go:build linux

package uffd_test

import (
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

func ExampleFeature_String() {
	fmt.Println(uffd.FeatureEventRemove | uffd.FeatureThreadID)
	fmt.Println(uffd.Feature(0))
	// A bit newer than this package is kept and printed in hex.
	fmt.Println(uffd.FeatureMove | 1<<17)
	// Output:
	// EVENT_REMOVE|THREAD_ID
	// 0
	// MOVE|0x20000
}

func ExampleFeatureByName() {
	f, ok := uffd.FeatureByName("UFFD_FEATURE_WP_ASYNC")
	fmt.Println(f, ok, f == uffd.FeatureWPAsync)
	f, ok = uffd.FeatureByName("thread_id")
	fmt.Println(f, ok)
	_, ok = uffd.FeatureByName("WRITE_BIT") // the 2015 RFC's name for bit 0: gone
	fmt.Println(ok)
	// Output:
	// WP_ASYNC true true
	// THREAD_ID true
	// false
}

func ExampleIoctls_String() {
	// What UFFDIO_REGISTER answers for anonymous memory in MISSING mode on Linux 6.18.
	ioctls := uffd.Ioctls(0x13c)
	fmt.Println(ioctls)
	fmt.Println(ioctls.Has(uffd.IoctlCopy|uffd.IoctlZeropage), ioctls.Has(uffd.IoctlWriteprotect))
	// Output:
	// WAKE|COPY|ZEROPAGE|MOVE|POISON
	// true false
}

func ExampleSupportedFeatures() {
	sup, err := uffd.SupportedFeatures()
	if err != nil {
		log.Fatal(err)
	}
	// Ask only for what the kernel has; capability bits need not be requested.
	want := (uffd.FeatureEventRemove | uffd.FeatureEventUnmap | uffd.FeatureThreadID) & sup
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if _, err := f.API(want); err != nil {
		log.Fatal(err)
	}
	fmt.Println("supported:", sup)
	fmt.Println("shmem MISSING:", sup.Has(uffd.FeatureMissingShmem))
}

// exampleServe resolves the faults on [base, base+size): with the page at the same offset of
// src, or with a zero page where MADV_DONTNEED or MADV_REMOVE dropped the contents (an
// EventRemove). The loop of a minimal fault server.
func exampleServe(f *uffd.FD, base, size uintptr, src []byte, pageSize uintptr) error {
	r, err := f.NewReader()
	if err != nil {
		return err
	}
	msgs := make([]uffd.Msg, 64)
	removed := make([]bool, size/pageSize) // pages whose contents were dropped: they read as zeros
	// Faults the kernel refused while an event was in flight (ErrEventsPending): retried after
	// the next read, which returns the events that held them back.
	var deferred, retry []uintptr
	for {
		var n int
		if len(deferred) == 0 {
			n, err = r.Read(msgs) // waits for a message
		} else {
			n, err = r.TryRead(msgs) // must not wait: the deferred threads sleep until served
		}
		if errors.Is(err, uffd.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		retry, deferred = deferred, retry[:0]
		for i := range msgs[:n] {
			m := &msgs[i]
			switch m.Event() {
			case uffd.EventPagefault:
				addr := m.Pagefault().Address &^ (pageSize - 1)
				if addr < base || addr >= base+size {
					return fmt.Errorf("fault outside the area: %v", m)
				}
				retry = append(retry, addr)
			case uffd.EventRemove:
				rg := m.Range()
				for a := max(rg.Start, base); a < min(rg.End, base+size); a += pageSize {
					removed[(a-base)/pageSize] = true
				}
			default:
				log.Printf("unexpected %v", m)
			}
		}
		for _, addr := range retry {
			later, err := exampleInstall(f, addr, src[addr-base:], removed[(addr-base)/pageSize], pageSize)
			if err != nil {
				return err
			}
			if later {
				deferred = append(deferred, addr)
			}
		}
		if n == 0 && len(deferred) > 0 {
			// The events are read, but the kernel lifts its block only when the thread that
			// raised them runs again: let it, then read and retry.
			runtime.Gosched()
		}
	}
}

// exampleInstall installs the page at dst, a copy of src or a zero page, and makes sure the
// threads waiting on it are woken. later reports that an event is in flight (ErrEventsPending):
// the caller must read it before trying again, or the kernel keeps refusing.
func exampleInstall(f *uffd.FD, dst uintptr, src []byte, zero bool, pageSize uintptr) (later bool, err error) {
	if zero {
		_, err = f.Zeropage(dst, pageSize, 0)
	} else {
		_, err = f.Copy(dst, uintptr(unsafe.Pointer(&src[0])), pageSize, 0)
	}
	switch {
	case err == nil:
		return false, nil // installed and woken (one page: never partial)
	case errors.Is(err, uffd.ErrEventsPending):
		return true, nil
	case errors.Is(err, uffd.ErrExist):
		// Another thread's fault on the same page got there first: already resolved.
		return false, f.Wake(dst, pageSize)
	case errors.Is(err, uffd.ErrNotRegistered):
		// Unregistered or unmapped meanwhile: wake anyone still sleeping there.
		return false, f.Wake(dst, pageSize)
	}
	return false, err
}

// A fault server for memory mapped by this process; the faulting side must be other threads
// that never run Go code while blocked (in practice, another process: see NewFD).
func ExampleFD_Copy() {
	pageSize := uintptr(os.Getpagesize())
	size := 16 * pageSize
	mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		log.Fatal(err)
	}
	src := make([]byte, size) // the pages' contents, from a snapshot file for example

	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if _, err := f.API(uffd.FeatureEventRemove); err != nil {
		log.Fatal(err)
	}
	base := uintptr(unsafe.Pointer(&mem[0]))
	ioctls, err := f.Register(base, size, uffd.ModeMissing)
	if err != nil {
		log.Fatal(err)
	}
	if !ioctls.Has(uffd.IoctlCopy) {
		log.Fatalf("no UFFDIO_COPY on this range: %v", ioctls)
	}
	// Pages may also be pushed before anyone asks: COPY into a missing page needs no fault. (No
	// event can be in flight yet: nothing else uses the memory.)
	if _, err := f.Copy(base, uintptr(unsafe.Pointer(&src[0])), pageSize, 0); err != nil {
		log.Fatal(err)
	}
	go func() {
		if err := exampleServe(f, base, size, src, pageSize); err != nil {
			log.Fatal(err)
		}
	}()
}

func ExampleReader() {
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if _, err := f.API(uffd.FeatureThreadID); err != nil {
		log.Fatal(err)
	}
	r, err := f.NewReader()
	if err != nil {
		log.Fatal(err)
	}
	// One buffer, reused: a read(2) returns every message pending, up to 64.
	msgs := make([]uffd.Msg, 64)
	for {
		n, err := r.Read(msgs) // parks in the netpoller; f.Close from elsewhere ends it
		if errors.Is(err, uffd.ErrClosed) {
			return
		}
		if err != nil {
			log.Fatal(err)
		}
		for i := range msgs[:n] {
			m := &msgs[i]
			if err := m.Check(); err != nil {
				log.Printf("skipping %v: %v", m, err)
				continue
			}
			switch m.Event() {
			case uffd.EventPagefault:
				pf := m.Pagefault()
				fmt.Printf("thread %d faulted at %#x (%v)\n", pf.TID, pf.Address, pf.Flags)
			case uffd.EventRemove, uffd.EventUnmap:
				rg := m.Range()
				fmt.Printf("%v of [%#x, %#x)\n", m.Event(), rg.Start, rg.End)
			case uffd.EventRemap:
				rm := m.Remap()
				fmt.Printf("moved %#x bytes from %#x to %#x\n", rm.Len, rm.From, rm.To)
			case uffd.EventFork:
				// The child's userfaultfd, already installed in this process: adopt it and
				// serve the child's faults with it, in a goroutine of its own.
				child, err := uffd.NewFD(m.ForkFD(), false)
				if err != nil {
					log.Fatal(err)
				}
				go func() {
					defer child.Close()
					// ... child.NewReader(), and a loop like this one.
				}()
			}
		}
	}
}

// A page-fault handler receiving the userfaultfd of a VMM (Firecracker sends it with SCM_RIGHTS
// on a Unix socket, next to a JSON description of the guest memory regions).
func ExampleNewFD() {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: "/run/uffd.sock", Net: "unix"})
	if err != nil {
		log.Fatal(err)
	}
	conn, err := l.AcceptUnix()
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 64<<10) // the regions, as JSON
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		log.Fatal(err)
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(cmsgs) != 1 {
		log.Fatalf("no userfaultfd received: %v", err)
	}
	fds, err := unix.ParseUnixRights(&cmsgs[0])
	if err != nil || len(fds) != 1 {
		log.Fatalf("no userfaultfd received: %v", err)
	}
	// The VMM did the handshake and the registration; NewFD checks the fd really is a
	// userfaultfd and makes it non-blocking for the netpoller.
	f, err := uffd.NewFD(fds[0], false)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	in, err := f.Info()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("regions %s; features %v; %d faults pending\n", buf[:n], in.Enabled, in.Pending)
}
