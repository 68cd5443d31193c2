//go:build linux

package uffd_test

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// An ioctl racing with Close must never reach the file that gets the fd number next. One
// goroutine issues UFFDIO_WAKE in a loop; another closes the FD and at once creates an eventfd,
// which takes the freed number. Both are pinned to one CPU, so the closer runs only while the
// waker is preempted, at whatever instruction it was: whenever that is between the waker's "not
// closed" check and its system call, the ioctl reaches the eventfd (ENOTTY) unless the FD holds
// the number until the call is done. Every ioctl after Close must fail with ErrClosed.
func TestCloseRacingIoctls(t *testing.T) {
	var cpus unix.CPUSet
	if err := unix.SchedGetaffinity(0, &cpus); err != nil {
		t.Fatal(err)
	}
	cpu := 0
	for !cpus.IsSet(cpu) {
		cpu++
	}
	pin := func() error {
		runtime.LockOSThread() // never unlocked: the thread ends with its goroutine, pinning and all
		var one unix.CPUSet
		one.Set(cpu)
		return unix.SchedSetaffinity(0, &one)
	}
	ps := uintptr(os.Getpagesize())
	mem, err := unix.Mmap(-1, 0, int(ps), unix.PROT_READ, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	base := addrOf(mem) // WAKE needs no registration, only a valid range

	const rounds = 300
	var recycled, stray, unclear int
	for range rounds {
		// Not through /dev/userfaultfd: its fd, closed after use, would leave a lower free number.
		f, err := uffd.Open(uffd.Options{NoDevice: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.API(0); err != nil {
			t.Fatal(err)
		}
		num := f.Fd()
		var wakes atomic.Int64
		var wakeErr error
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			if wakeErr = pin(); wakeErr != nil {
				return
			}
			for {
				err := f.Wake(base, ps)
				wakes.Add(1)
				if err != nil {
					wakeErr = err
					return
				}
			}
		}()
		ev := -1
		var closeErr error
		go func() {
			defer wg.Done()
			if closeErr = pin(); closeErr != nil {
				return
			}
			for wakes.Load() == 0 { // the waker has run, so it is preempted now that we run
			}
			if closeErr = f.Close(); closeErr != nil {
				return
			}
			ev, closeErr = unix.Eventfd(0, unix.EFD_CLOEXEC)
		}()
		wg.Wait()
		if closeErr != nil {
			t.Fatal(closeErr)
		}
		if ev == num {
			recycled++
		}
		switch {
		case errors.Is(wakeErr, unix.ENOTTY):
			stray++ // the eventfd answered
		case !errors.Is(wakeErr, uffd.ErrClosed):
			unclear++
			t.Logf("Wake after Close: %v, want ErrClosed", wakeErr)
		}
		unix.Close(ev)
	}
	if stray != 0 {
		t.Errorf("%d of %d rounds: a Wake issued after Close reached the eventfd that took the fd number", stray, rounds)
	}
	if unclear != 0 {
		t.Errorf("%d of %d rounds: a Wake after Close failed with something other than ErrClosed", unclear, rounds)
	}
	if recycled < rounds/2 {
		t.Errorf("the eventfd took the closed number in only %d of %d rounds: the test did not test", recycled, rounds)
	}
}
