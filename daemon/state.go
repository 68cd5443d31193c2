//go:build linux

package daemon

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
)

// The state directory (Config.StateDir) holds what a successor daemon needs to serve the VMs of
// this one after it crashed or handed them over: one file per engine (a VM's handshake), and a
// lock. A file is a header, checked on every read (magic, format version, the checksum of its
// metadata), the metadata (JSON: the VMM's pid and start time, the number of its uffd in the
// VMM, the snapshot's identity, the regions), then the engine's durable memory (its removed-page
// bitmaps and read journal, engine.DurableSize), mapped MAP_SHARED: on tmpfs (/run) every store
// to it outlives this process without an fsync. Nothing in the file is written after it was
// created but that memory.

const (
	stateMagic   = "FLTSTATE"
	stateVersion = 1
	stateHdr     = 32 // magic, version, metadata length, metadata CRC, durable offset (u64) and length (u32)
	stateSuffix  = ".state"
	lockName     = "lock"
	handoffName  = "handoff.sock"
)

// stateMeta is the metadata of one engine's state file.
type stateMeta struct {
	Gen       int64         `json:"gen"`       // the daemon that created the file (its start, ns)
	VM        int64         `json:"vm"`        // the VM's id in that daemon
	Handshake int           `json:"handshake"` // which of the VM's handshakes (0 first)
	Pid       int           `json:"pid"`
	StartTime uint64        `json:"start_time"` // of the VMM process (/proc/PID/stat), against pid reuse
	UID       uint32        `json:"uid"`
	UFFD      int           `json:"uffd"` // the uffd's number in the VMM; -1 if it holds none
	Version   int           `json:"fc_version"`
	Source    string        `json:"source"` // the snapshot's identity (sourceIdentity)
	Regions   []stateRegion `json:"regions"`
}

type stateRegion struct {
	Name     string  `json:"name"`
	Base     uintptr `json:"base"`
	Size     uintptr `json:"size"`
	PageSize uintptr `json:"page_size"`
	Offset   int64   `json:"offset"`
}

// stateFile is an open state file: its metadata and its durable memory, mapped.
type stateFile struct {
	path    string
	meta    stateMeta
	map_    []byte // the whole file, mapped shared
	durable []byte // the engine's part of it
}

// key names the VM of the file in this state directory, across daemons: its hand-off key.
func (m *stateMeta) key() string { return fmt.Sprintf("%d-%d", m.Gen, m.VM) }

func (m *stateMeta) engineRegions(d *Daemon) []engine.Region {
	rs := make([]engine.Region, len(m.Regions))
	for i, r := range m.Regions {
		rs[i] = engine.Region{Name: r.Name, Base: r.Base, Size: r.Size, PageSize: r.PageSize, Offset: r.Offset, Source: d.src}
	}
	return rs
}

// stateDir is the daemon's open, locked state directory.
type stateDir struct {
	dir  string
	lock *os.File // flock'd LOCK_EX while this daemon owns the directory
	gen  int64    // distinguishes this daemon's file names from its predecessors'
}

// openStateDir creates dir if need be and locks it. lock, if not nil, is the predecessor's
// locked file handed over: its flock is ours too (one open file description).
func openStateDir(dir string, lock *os.File, gen int64) (*stateDir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("daemon: state directory: %w", err)
	}
	if lock == nil {
		f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("daemon: state directory lock: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			b, _ := os.ReadFile(f.Name())
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("%w: %s is locked by faultline serve pid %s (take its VMs over with --takeover, or stop it)",
					ErrStateLocked, dir, strings.TrimSpace(string(b)))
			}
			return nil, fmt.Errorf("daemon: lock %s: %w", f.Name(), err)
		}
		lock = f
	}
	lock.Truncate(0)
	lock.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	// Leftovers of a create that died half-way: never a complete file, so never a VM's state.
	tmps, _ := filepath.Glob(filepath.Join(dir, ".*"+stateSuffix+".tmp"))
	for _, t := range tmps {
		os.Remove(t)
	}
	return &stateDir{dir: dir, lock: lock, gen: gen}, nil
}

func (s *stateDir) close() {
	if s != nil {
		s.lock.Close()
	}
}

// create writes the state file of one engine, its durable memory zero, and maps it.
func (s *stateDir) create(meta stateMeta, regions []engine.Region) (*stateFile, error) {
	meta.Gen = s.gen
	mj, err := json.Marshal(meta)
	if err != nil {
		return nil, err
	}
	pg := unix.Getpagesize()
	off := (stateHdr + len(mj) + pg - 1) / pg * pg
	dlen := engine.DurableSize(regions)
	hdr := make([]byte, stateHdr)
	copy(hdr, stateMagic)
	binary.LittleEndian.PutUint32(hdr[8:], stateVersion)
	binary.LittleEndian.PutUint32(hdr[12:], uint32(len(mj)))
	binary.LittleEndian.PutUint32(hdr[16:], crc32.Checksum(mj, crcTable))
	binary.LittleEndian.PutUint64(hdr[20:], uint64(off))
	binary.LittleEndian.PutUint32(hdr[28:], uint32(dlen))
	name := fmt.Sprintf("vm-%d-%d-%d%s", meta.Gen, meta.VM, meta.Handshake, stateSuffix)
	path := filepath.Join(s.dir, name)
	tmp := filepath.Join(s.dir, "."+name+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("daemon: state file: %w", err)
	}
	defer f.Close()
	_, err = f.Write(append(hdr, mj...))
	if err == nil {
		err = f.Truncate(int64(off + dlen))
	}
	if err == nil {
		// Complete before it has its name: a file under a .state name is always whole.
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("daemon: state file: %w", err)
	}
	sf, err := mapState(f, path, meta, off, dlen)
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return sf, nil
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func mapState(f *os.File, path string, meta stateMeta, off, dlen int) (*stateFile, error) {
	m, err := unix.Mmap(int(f.Fd()), 0, off+dlen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("daemon: map state file %s: %w", path, err)
	}
	// Resident, and locked where the system lets us: the engine's reader has the kernel write
	// the journal inside read(2), after the messages left the queue, and a page fault there
	// (with a fatal signal pending, say) must not be able to lose them.
	unix.Madvise(m[off:], unix.MADV_POPULATE_WRITE)
	unix.Mlock(m[off:])
	return &stateFile{path: path, meta: meta, map_: m, durable: m[off : off+dlen]}, nil
}

// loadState opens and checks a state file written by a predecessor, and maps it.
func loadState(path string) (*stateFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("daemon: state file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, stateHdr)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return nil, fmt.Errorf("%w: %s: header: %v", ErrStateCorrupt, path, err)
	}
	if string(hdr[:8]) != stateMagic {
		return nil, fmt.Errorf("%w: %s: not a faultline state file (magic %q)", ErrStateCorrupt, path, hdr[:8])
	}
	if v := binary.LittleEndian.Uint32(hdr[8:]); v != stateVersion {
		return nil, fmt.Errorf("%w: %s is of state format %d, this faultline reads %d: serve it with the faultline that wrote it, or remove the directory (its VMs then hang until killed)",
			ErrStateVersion, path, v, stateVersion)
	}
	mlen := int64(binary.LittleEndian.Uint32(hdr[12:]))
	off := int64(binary.LittleEndian.Uint64(hdr[20:]))
	dlen := int64(binary.LittleEndian.Uint32(hdr[28:]))
	if mlen > off-stateHdr || off%int64(unix.Getpagesize()) != 0 || off+dlen != fi.Size() {
		return nil, fmt.Errorf("%w: %s: sizes do not add up (metadata %d, durable %d at %d, file %d)", ErrStateCorrupt, path, mlen, dlen, off, fi.Size())
	}
	mj := make([]byte, mlen)
	if _, err := f.ReadAt(mj, stateHdr); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrStateCorrupt, path, err)
	}
	if crc32.Checksum(mj, crcTable) != binary.LittleEndian.Uint32(hdr[16:]) {
		return nil, fmt.Errorf("%w: %s: metadata checksum mismatch", ErrStateCorrupt, path)
	}
	var meta stateMeta
	if err := json.Unmarshal(mj, &meta); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrStateCorrupt, path, err)
	}
	rs := make([]engine.Region, len(meta.Regions))
	for i, r := range meta.Regions {
		rs[i] = engine.Region{Size: r.Size, PageSize: r.PageSize}
	}
	if int64(engine.DurableSize(rs)) != dlen {
		return nil, fmt.Errorf("%w: %s: %d bytes of durable state for its regions, want %d", ErrStateCorrupt, path, dlen, engine.DurableSize(rs))
	}
	return mapState(f, path, meta, int(off), int(dlen))
}

// unmap releases the mapping; the file stays (a successor's).
func (sf *stateFile) unmap() {
	if sf.map_ != nil {
		unix.Munmap(sf.map_)
		sf.map_, sf.durable = nil, nil
	}
}

// remove deletes the file: its VM is gone. Call it once its engine has stopped.
func (sf *stateFile) remove() {
	sf.unmap()
	os.Remove(sf.path)
}

// listStates returns the state files of dir.
func (s *stateDir) list() ([]string, error) {
	return filepath.Glob(filepath.Join(s.dir, "vm-*"+stateSuffix))
}

// sourceIdentity names the snapshot served: a successor serves a VM only from the same bytes.
func (d *Daemon) sourceIdentity() (string, error) {
	if d.snap != nil {
		m := d.snap.Manifest()
		h := sha256.New()
		fmt.Fprintf(h, "%d %d %d\n", m.Size, m.PageSize, m.ChunkSize)
		for _, c := range m.Chunks {
			fmt.Fprintln(h, c.Hash)
		}
		h.Write(m.ZeroMap)
		return "packed:" + hex.EncodeToString(h.Sum(nil)), nil
	}
	if d.cfg.MemFile == "" {
		return "", errors.New("daemon: a state directory needs a source it can name (a memory file or a packed snapshot), not only an opened Source")
	}
	abs, err := filepath.Abs(d.cfg.MemFile)
	if err != nil {
		return "", err
	}
	var st unix.Stat_t
	if err := unix.Stat(abs, &st); err != nil {
		return "", fmt.Errorf("daemon: memory file: %w", err)
	}
	return fmt.Sprintf("file:%s size=%d dev=%d ino=%d mtime=%d.%09d", abs, st.Size, st.Dev, st.Ino, st.Mtim.Sec, st.Mtim.Nsec), nil
}

// procStartTime is field 22 of /proc/PID/stat: when the process started, in clock ticks since
// boot. With the pid it names one process across pid reuse.
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	return strconv.ParseUint(f[19], 10, 64) // field 22; f[0] is field 3
}

// vmmUffdNumber finds the number under which the VMM pid holds the uffd we hold as fd: a
// userfaultfd in /proc/PID/fd that kcmp(2) says is the same open file. -1 if it holds none.
func vmmUffdNumber(pid, fd int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, n)); err != nil || l != "anon_inode:[userfaultfd]" {
			continue
		}
		if sameFile(pid, fd, n) {
			return n
		}
	}
	return -1
}

// sameFile reports whether our fd and the VMM pid's fd n are one open file (kcmp(2)).
func sameFile(pid, fd, n int) bool {
	const kcmpFile = 0
	r, _, errno := unix.Syscall6(unix.SYS_KCMP, uintptr(os.Getpid()), uintptr(pid), kcmpFile, uintptr(fd), uintptr(n), 0)
	return errno == 0 && r == 0
}
