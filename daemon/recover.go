//go:build linux

package daemon

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/uffd"
)

// How a daemon came to serve a VM it did not see connect (Report.Origin).
const (
	originRecovered = "recovered"  // from the state directory, after its predecessor died
	originTakenOver = "taken over" // handed over by its predecessor (--takeover)
)

// unrecoverable are the uffd features whose events change what a state file describes (the
// address layout, a forked child's own uffd): a VMM with them is not served after a crash.
// Firecracker enables EVENT_REMOVE only.
const unrecoverable = uffd.FeatureEventRemap | uffd.FeatureEventUnmap | uffd.FeatureEventFork

// createState writes the state file of a handshake's engine (Config.StateDir).
func (v *vm) createState(h *firecracker.Handshake, fd *uffd.FD, regions []engine.Region) (*stateFile, error) {
	st, err := procStartTime(v.pid)
	if err != nil {
		return nil, fmt.Errorf("daemon: the VMM's start time: %w", err)
	}
	src := v.d.srcID
	meta := stateMeta{VM: v.id, Handshake: len(v.states), Pid: v.pid, StartTime: st, UID: v.uid,
		UFFD: vmmUffdNumber(v.pid, fd.Fd()), Version: int(h.Version), Source: src}
	if meta.UFFD < 0 {
		v.log.Warn("the VMM holds no copy of its userfaultfd: if this daemon dies, its guest reads zero pages instead of waiting; the VM cannot be recovered")
	}
	for _, r := range regions {
		meta.Regions = append(meta.Regions, stateRegion{Name: r.Name, Base: r.Base, Size: r.Size, PageSize: r.PageSize, Offset: r.Offset})
	}
	sf, err := v.d.state.create(meta, regions)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	v.states = append(v.states, sf)
	v.mu.Unlock()
	return sf, nil
}

// releaseStates unmaps the VM's state files once its engines have stopped, and deletes them
// unless a successor took the VM over.
func (v *vm) releaseStates() {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, sf := range v.states {
		if v.handedOver {
			sf.unmap()
		} else {
			sf.remove()
		}
	}
}

// recoverVMs serves again the VMs of the state directory: left by a daemon that died, or
// (handed != nil) handed over by a live one. Each file is checked before any VM is touched:
// a corrupt file or one of another format version fails the start, and no VM is served from
// state this daemon cannot read.
func (d *Daemon) recoverVMs(handed *handoffSet) error {
	paths, err := d.state.list()
	if err != nil {
		return err
	}
	var files []*stateFile
	for _, p := range paths {
		sf, err := loadState(p)
		if err != nil {
			for _, f := range files {
				f.unmap()
			}
			return err
		}
		files = append(files, sf)
	}
	// A VM still running that was served from other bytes: refuse to start rather than kill
	// it for a daemon started with the wrong snapshot.
	if want := d.srcID; want != "" {
		for _, sf := range files {
			if st, err := procStartTime(sf.meta.Pid); err == nil && st == sf.meta.StartTime && sf.meta.Source != want {
				for _, f := range files {
					f.unmap()
				}
				return fmt.Errorf("daemon: %s: its VM (pid %d) is served from %s, this daemon serves %s: start it with that snapshot (or remove the state directory: its VMs then hang until killed)",
					sf.path, sf.meta.Pid, sf.meta.Source, want)
			}
		}
	}
	groups := map[string][]*stateFile{}
	var order []string
	for _, sf := range files {
		k := sf.meta.key()
		if groups[k] == nil {
			order = append(order, k)
		}
		groups[k] = append(groups[k], sf)
	}
	for _, k := range order {
		d.recoverVM(groups[k], handed)
	}
	return nil
}

// recoverVM serves one VM of the state directory again, or lets it go: its VMM exited (the
// files are removed), or it cannot be served right (the failure policy applies).
func (d *Daemon) recoverVM(files []*stateFile, handed *handoffSet) {
	m := files[0].meta
	log := d.log.With("pid", m.Pid)
	drop := func() {
		for _, sf := range files {
			sf.remove()
		}
	}
	origin := originRecovered
	var pidfd int
	var hv *handedVM
	if handed != nil {
		hv = handed.vms[m.key()]
		if hv != nil && pidfdPid(hv.pidfd) != m.Pid {
			// Not the VMM the files name: pair nothing by mistake; take it from the VMM.
			log.Warn("hand-off: the pidfd received is not the state file's VMM's")
			hv = nil
		}
	}
	if hv != nil {
		origin, pidfd = originTakenOver, hv.pidfd
		hv.used = true
	} else {
		// By pid, then the start time checked again: the pidfd pins one process, and if it
		// started when the VMM did it is the VMM, not a process that got its pid since.
		st, err := procStartTime(m.Pid)
		if err == nil && st == m.StartTime {
			pidfd, err = unix.PidfdOpen(m.Pid, 0)
			if err == nil {
				if st, err2 := procStartTime(m.Pid); err2 != nil || st != m.StartTime {
					unix.Close(pidfd)
					err = unix.ESRCH
				}
			}
		} else if err == nil {
			err = unix.ESRCH
		}
		if err != nil {
			log.Info("VM of the state directory gone: its VMM exited while no daemon served it", "vm_was", m.VM)
			drop()
			return
		}
	}
	d.mu.Lock()
	d.nextID++
	v := newVMFrom(d, d.nextID, m.Pid, m.UID, pidfd, origin)
	if hv != nil && hv.conn != nil {
		v.conn = hv.conn
	}
	v.version = firecracker.Version(m.Version)
	v.states = files
	d.vms[v] = struct{}{}
	d.mu.Unlock()
	v.log.Info("VM "+origin, "vm_was", m.VM, "engines", len(files))
	err := d.resumeEngines(v, files, hv)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err != nil {
			v.fail(err)
		}
		d.runVM(v)
	}()
}

// resumeEngines starts an engine for each state file of v, on the VMM's uffd: handed over, or
// taken from the VMM with pidfd_getfd(2) (root, or CAP_SYS_PTRACE over it).
func (d *Daemon) resumeEngines(v *vm, files []*stateFile, hv *handedVM) error {
	want := d.srcID
	for i, sf := range files {
		m := sf.meta
		if m.Source != want {
			return fmt.Errorf("daemon: the VM was served from %s, this daemon serves %s: not serving it from other bytes", m.Source, want)
		}
		n := -1
		if hv != nil && i < len(hv.uffds) {
			n, hv.uffds[i] = hv.uffds[i], -1
			// The very uffd the VMM holds, or none of it: a number the predecessor reused
			// while it handed over must not serve this VM.
			if m.UFFD >= 0 && !sameFile(m.Pid, n, m.UFFD) {
				v.log.Warn("hand-off: the uffd received is not the VMM's; taking the VMM's own")
				unix.Close(n)
				n = -1
			}
		}
		if n < 0 {
			if m.UFFD < 0 {
				return errors.New("daemon: the VMM holds no copy of its userfaultfd to recover")
			}
			var err error
			if n, err = unix.PidfdGetfd(v.pidfd, m.UFFD, 0); err != nil {
				return fmt.Errorf("daemon: pidfd_getfd of the VMM's uffd %d (needs root or CAP_SYS_PTRACE): %w", m.UFFD, err)
			}
		}
		fd, err := uffd.NewFD(n, false)
		if err != nil {
			unix.Close(n)
			return fmt.Errorf("daemon: fd %d of the VMM: %w", m.UFFD, err)
		}
		if in, err := fd.Info(); err != nil || in.Enabled&unrecoverable != 0 {
			fd.Close()
			if err == nil {
				err = fmt.Errorf("its uffd has %v, whose events a state file does not keep", in.Enabled&unrecoverable)
			}
			return fmt.Errorf("daemon: cannot resume the VM: %w", err)
		}
		opts := v.engineOptions()
		opts.Durable = sf.durable
		e, err := engine.Resume(fd, m.engineRegions(d), opts)
		if err != nil {
			fd.Close()
			return err
		}
		v.addEngine(e, fd, len(m.Regions))
		// A prefetch starts again: the pages the predecessor installed are skipped.
		v.startWorkingSet(e)
		v.runEngine(e)
	}
	return nil
}

// pidfdPid is the pid a pidfd names (its fdinfo's Pid line), or -1.
func pidfdPid(pidfd int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", pidfd))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Pid:"); ok {
			if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
				return n
			}
		}
	}
	return -1
}

// newVMFrom makes a VM this daemon did not see connect.
func newVMFrom(d *Daemon, id int64, pid int, uid uint32, pidfd int, origin string) *vm {
	return &vm{d: d, id: id, pid: pid, uid: uid, pidfd: pidfd, pidfdBy: "pidfd_open (" + origin + ")",
		origin: origin, started: time.Now(), ended: make(chan struct{}), reading: make(chan struct{}), released: make(chan struct{}),
		log: d.log.With("vm", id, "pid", pid)}
}

// adoptHanded serves the connections a predecessor handed over beyond its state files: accepted
// but never served, or of VMs still without a handshake (they have no state file).
func (d *Daemon) adoptHanded(hs *handoffSet) {
	conns := hs.early
	hs.early = nil
	for _, c := range conns {
		d.wg.Add(1)
		d.accepting.Add(1)
		go func() {
			defer d.wg.Done()
			d.handle(c)
		}()
	}
}
