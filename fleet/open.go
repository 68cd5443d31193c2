//go:build linux

package fleet

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/faultline-go/faultline/fleet/client"
	"github.com/faultline-go/faultline/snapshot"
	"github.com/faultline-go/faultline/source"
)

// An Opener opens the snapshot a reference names (a URL of its scheme, such as
// s3://BUCKET/PREFIX), with cacheSize as the initial bound of the memory it may cache. If the
// source it returns has a SetCacheSize(int64) method, the source gets a share of
// Config.CacheSize and is resized with the others; otherwise it is not counted against it.
// A returned error wrapping snapshot.ErrTransient or source.ErrTransient is answered 503, any
// other 400.
type Opener func(ref string, cacheSize int64) (source.Source, error)

// cacheSizer is a source whose memory cache the server resizes (snapshot.Snapshot).
type cacheSizer interface{ SetCacheSize(int64) }

// The kinds of snapshot reference.
const (
	kindSnapshot = "snapshot"
	kindMemFile  = "mem_file"
)

// shared is a snapshot open once for every binding naming the same reference.
type shared struct {
	key, ref, kind string
	refs           int           // bindings holding it (those waiting for the open included)
	ready          chan struct{} // closed when the open ended; then src or err is set
	src            source.Source
	err            error
	sizer          cacheSizer // src, if its cache is resized within Config.CacheSize
	counted        bool       // it counts in Server.sized
}

// OpenLocal opens a local snapshot reference: a packed snapshot directory, with a frame cache of
// cacheSize bytes, or a raw memory file (a regular file) mapped read-only.
func OpenLocal(path string, cacheSize int64) (source.Source, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.IsDir() {
		return snapshot.OpenWith(path, snapshot.Options{CacheSize: cacheSize})
	}
	return source.OpenFile(path)
}

// scheme returns the scheme of a URL reference ("" for a path).
func scheme(ref string) string {
	if i := strings.Index(ref, "://"); i > 0 && !strings.ContainsRune(ref[:i], '/') {
		return ref[:i]
	}
	return ""
}

// reference checks a spec's snapshot reference and returns its kind, its key (the same for
// every spelling of one local path) and the opener for it.
func (s *Server) reference(spec client.Spec) (kind, key string, open Opener, err error) {
	ref := spec.Snapshot
	kind = kindSnapshot
	if spec.MemFile != "" {
		ref, kind = spec.MemFile, kindMemFile
	}
	if (spec.Snapshot == "") == (spec.MemFile == "") {
		return "", "", nil, badRequest("exactly one of \"snapshot\" and \"mem_file\" is required")
	}
	if sch := scheme(ref); sch != "" {
		if kind == kindMemFile {
			return "", "", nil, badRequest("mem_file %q: a local path is required", ref)
		}
		if open = s.cfg.Openers[sch]; open == nil {
			return "", "", nil, badRequest("snapshot %q: this daemon has no opener for %s:// references", ref, sch)
		}
		return kind, kind + ":" + ref, open, nil
	}
	if !filepath.IsAbs(ref) {
		return "", "", nil, badRequest("%s %q: an absolute path is required", kind, ref)
	}
	return kind, kind + ":" + filepath.Clean(ref), OpenLocal, nil
}

// acquire returns the shared snapshot of spec, opening it if no binding has it open: one open
// per reference, however many bindings ask at once.
func (s *Server) acquire(spec client.Spec) (*shared, error) {
	kind, key, open, err := s.reference(spec)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if sh := s.snaps[key]; sh != nil {
		sh.refs++
		s.mu.Unlock()
		<-sh.ready
		if sh.err != nil {
			return nil, sh.err // the opener removed it from the map; refs no longer matter
		}
		return sh, nil
	}
	sh := &shared{key: key, ref: strings.TrimPrefix(key, kind+":"), kind: kind, refs: 1, ready: make(chan struct{})}
	var size int64
	if kind == kindSnapshot {
		// Reserve a share before opening, so concurrent opens cannot overrun the bound.
		if share := s.cfg.CacheSize / int64(s.sized+1); share < s.cfg.MinCacheSize {
			s.mu.Unlock()
			return nil, &client.Error{Status: http.StatusServiceUnavailable, Message: fmt.Sprintf(
				"cache memory bound: %d snapshots share %d bytes (--cache-size); one more would leave each less than %d (--min-snapshot-cache): remove a binding of another snapshot first",
				s.sized, s.cfg.CacheSize, s.cfg.MinCacheSize)}
		}
		s.sized++
		sh.counted = true
		size = s.shareLocked()
		s.rebalanceLocked() // shrink the others first: the new one is about to fill its share
	}
	s.snaps[key] = sh
	s.mu.Unlock()

	src, err := open(sh.ref, size)

	s.mu.Lock()
	if err != nil {
		sh.err = openError(kind, sh.ref, err)
		delete(s.snaps, key)
		s.uncountLocked(sh)
	} else {
		sh.src = src
		if cs, ok := src.(cacheSizer); ok && sh.counted {
			sh.sizer = cs
		} else {
			s.uncountLocked(sh)
		}
	}
	s.rebalanceLocked()
	close(sh.ready)
	s.mu.Unlock()
	if err != nil {
		return nil, sh.err
	}
	return sh, nil
}

func openError(kind, ref string, err error) error {
	status := http.StatusBadRequest
	if errors.Is(err, snapshot.ErrTransient) || errors.Is(err, source.ErrTransient) {
		status = http.StatusServiceUnavailable
	}
	return &client.Error{Status: status, Message: fmt.Sprintf("%s %s: %v", kind, ref, err)}
}

// release drops a binding's hold on sh; the last closes it.
func (s *Server) release(sh *shared) {
	s.mu.Lock()
	sh.refs--
	last := sh.refs == 0
	if last {
		delete(s.snaps, sh.key)
		s.uncountLocked(sh)
		s.rebalanceLocked()
	}
	s.mu.Unlock()
	if last {
		sh.src.Close()
		s.log.Info("snapshot closed: no binding uses it", sh.kind, sh.ref)
	}
}

func (s *Server) uncountLocked(sh *shared) {
	if sh.counted {
		sh.counted = false
		s.sized--
	}
}

// shareLocked is each counted snapshot's share of the cache memory bound.
func (s *Server) shareLocked() int64 { return s.cfg.CacheSize / int64(max(s.sized, 1)) }

// rebalanceLocked gives every open counted snapshot its share.
func (s *Server) rebalanceLocked() {
	share := s.shareLocked()
	for _, sh := range s.snaps {
		if sh.sizer != nil {
			sh.sizer.SetCacheSize(share)
		}
	}
}

func badRequest(format string, a ...any) error {
	return &client.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf(format, a...)}
}
