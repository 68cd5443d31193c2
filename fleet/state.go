//go:build linux

package fleet

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/fleet/client"
	"github.com/faultline-go/faultline/internal/atomicfile"
)

// The fleet's files in Config.StateDir.
const (
	stateFile   = "fleet.json"
	lockFile    = "fleet.lock"
	handoffSock = "control-handoff.sock"
	bindingsDir = "bindings"

	stateFormat  = "faultline-fleet"
	stateVersion = 1
)

// savedFile is fleet.json: the bindings, and a SHA-256 of their JSON as written, so that a
// file cut short or edited by hand is told from one the fleet wrote.
type savedFile struct {
	Format   string          `json:"format"`
	Version  int             `json:"version"`
	Bindings json.RawMessage `json:"bindings"`
	Checksum string          `json:"sha256"`
}

// savedBinding is one binding as fleet.json keeps it: what its PUT said, and whether a DELETE
// drains it.
type savedBinding struct {
	ID       string      `json:"id"`
	Spec     client.Spec `json:"spec"`
	Created  time.Time   `json:"created"`
	Draining bool        `json:"draining,omitempty"`
}

// bindingDir is the state directory of binding id's daemon.
func (s *Server) bindingDir(id string) string {
	if s.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(s.cfg.StateDir, bindingsDir, id)
}

// lockState takes the fleet's lock on its state directory: one fleet at a time owns it.
func lockState(dir string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Join(dir, bindingsDir), 0o700); err != nil {
		return nil, fmt.Errorf("fleet: state directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("fleet: state directory lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b, _ := os.ReadFile(f.Name())
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is locked by faultline serve --control pid %s (take its VMs over with --takeover, or stop it)",
				daemon.ErrStateLocked, dir, strings.TrimSpace(string(b)))
		}
		return nil, fmt.Errorf("fleet: lock %s: %w", f.Name(), err)
	}
	stampLock(f)
	return f, nil
}

func stampLock(f *os.File) {
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
}

// loadState reads fleet.json; no file is no bindings.
func loadState(dir string) ([]savedBinding, error) {
	path := filepath.Join(dir, stateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("fleet: %w", err)
	}
	var f savedFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", daemon.ErrStateCorrupt, path, err)
	}
	if f.Format != stateFormat {
		return nil, fmt.Errorf("%w: %s: not a fleet's state (format %q)", daemon.ErrStateCorrupt, path, f.Format)
	}
	if f.Version != stateVersion {
		return nil, fmt.Errorf("%w: %s: version %d, this faultline reads version %d", daemon.ErrStateVersion, path, f.Version, stateVersion)
	}
	if sum := sha256.Sum256(f.Bindings); hex.EncodeToString(sum[:]) != f.Checksum {
		return nil, fmt.Errorf("%w: %s: checksum mismatch", daemon.ErrStateCorrupt, path)
	}
	var out []savedBinding
	if err := json.Unmarshal(f.Bindings, &out); err != nil {
		return nil, fmt.Errorf("%w: %s: bindings: %v", daemon.ErrStateCorrupt, path, err)
	}
	for _, sb := range out {
		if !validID.MatchString(sb.ID) {
			return nil, fmt.Errorf("%w: %s: binding id %q", daemon.ErrStateCorrupt, path, sb.ID)
		}
	}
	return out, nil
}

// save writes fleet.json with every binding made (not those being created), atomically: a
// temporary file, fsync, rename, fsync of the directory. A fleet that handed over writes
// nothing: the file is its successor's.
func (s *Server) save() error {
	if s.cfg.StateDir == "" {
		return nil
	}
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	s.mu.Lock()
	if s.handedOver {
		s.mu.Unlock()
		return nil
	}
	list := []savedBinding{}
	for _, b := range s.vms {
		if b.state != client.StateCreating {
			list = append(list, savedBinding{ID: b.id, Spec: b.spec, Created: b.created, Draining: b.deleted})
		}
	}
	s.mu.Unlock()
	slices.SortFunc(list, func(a, b savedBinding) int { return strings.Compare(a.ID, b.ID) })
	bj, err := json.Marshal(list)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(bj)
	fj, err := json.Marshal(savedFile{Format: stateFormat, Version: stateVersion, Bindings: bj, Checksum: hex.EncodeToString(sum[:])})
	if err != nil {
		return err
	}
	path := filepath.Join(s.cfg.StateDir, stateFile)
	f, err := os.OpenFile(path+".tmp", os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		err = atomicfile.Commit(f, path, append(fj, '\n'), 0o600, true)
	}
	if err != nil {
		return fmt.Errorf("fleet: writing %s: %w", path, err)
	}
	return nil
}

// restore makes again the bindings of fleet.json: each binding's daemon, on its own state
// directory, recovers its VMs (after a crash) or, with takeover, takes them over from the
// predecessor's daemon. A binding that a DELETE was draining drains again after a crash; in a
// takeover the predecessor drains it to its end. A binding that cannot be made is logged and
// dropped (its state directory stays).
func (s *Server) restore(saved []savedBinding, takeover bool) {
	for _, sb := range saved {
		if sb.Draining && takeover {
			continue
		}
		b := &binding{id: sb.ID, spec: sb.Spec, created: sb.Created, state: client.StateCreating}
		s.mu.Lock()
		s.vms[b.id] = b
		s.sockets[b.spec.Socket] = b.id
		s.wg.Add(1)
		s.mu.Unlock()
		if _, err := s.start(b, takeover); err != nil {
			s.mu.Lock()
			delete(s.vms, b.id)
			delete(s.sockets, b.spec.Socket)
			s.mu.Unlock()
			s.wg.Done()
			s.log.Error("VM binding not restored: its VMs are not served", "vm_id", b.id, "err", err, "state_dir", s.bindingDir(b.id))
			continue
		}
		if sb.Draining {
			if _, err := s.Delete(b.id, false); err != nil {
				s.log.Error("VM binding: draining again", "vm_id", b.id, "err", err)
			}
		}
	}
}
