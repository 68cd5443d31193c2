//go:build linux

package bench

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// pinSelf pins every thread of this process to one CPU (CPU 0 if it may run there, else the
// lowest it may) and returns a function that gives the threads their previous mask back.
// Processes started meanwhile — the puppet child, the C handler — inherit the mask of the
// thread that forks them, so the handler and the faulting process share the one CPU: a fault
// then costs what the two processes spend on it, without the host's cost of waking an idle vCPU.
func pinSelf() (unpin func() error, cpu int, err error) {
	var orig unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return nil, 0, fmt.Errorf("bench: sched_getaffinity: %w", err)
	}
	cpu = -1
	for i := 0; i < 1024; i++ {
		if orig.IsSet(i) {
			cpu = i
			break
		}
	}
	if cpu < 0 {
		return nil, 0, errors.New("bench: no CPU in this process's affinity mask")
	}
	var one unix.CPUSet
	one.Set(cpu)
	if err := setAll(os.Getpid(), &one); err != nil {
		setAll(os.Getpid(), &orig)
		return nil, 0, err
	}
	return func() error { return setAll(os.Getpid(), &orig) }, cpu, nil
}

// setAll sets the affinity of every thread of process pid to set. A thread created meanwhile by
// a thread not yet set would escape one pass, so it passes again until every thread it lists
// already has the mask; threads created after that inherit it from their creator.
func setAll(pid int, set *unix.CPUSet) error {
	for pass := 0; pass < 100; pass++ {
		tids, err := threads(pid)
		if err != nil {
			return err
		}
		done := true
		for _, tid := range tids {
			var cur unix.CPUSet
			if err := unix.SchedGetaffinity(tid, &cur); err != nil {
				if errors.Is(err, unix.ESRCH) {
					continue // the thread exited
				}
				return fmt.Errorf("bench: sched_getaffinity(%d): %w", tid, err)
			}
			if cur == *set {
				continue
			}
			done = false
			if err := unix.SchedSetaffinity(tid, set); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("bench: sched_setaffinity(%d): %w", tid, err)
			}
		}
		if done {
			return nil
		}
	}
	return fmt.Errorf("bench: threads of %d keep appearing with another CPU mask", pid)
}

// checkPinned reports an error unless every thread of process pid may run on cpu only.
func checkPinned(pid, cpu int) error {
	tids, err := threads(pid)
	if err != nil {
		return err
	}
	var want unix.CPUSet
	want.Set(cpu)
	for _, tid := range tids {
		var cur unix.CPUSet
		if err := unix.SchedGetaffinity(tid, &cur); err != nil {
			if errors.Is(err, unix.ESRCH) {
				continue
			}
			return err
		}
		if cur != want {
			return fmt.Errorf("bench: thread %d of %d may run on %d CPUs, not only on CPU %d", tid, pid, cur.Count(), cpu)
		}
	}
	return nil
}

// threads lists the thread ids of process pid.
func threads(pid int) ([]int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return nil, err
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}
