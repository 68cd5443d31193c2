//go:build linux

package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/fleet/client"
)

// maxBody bounds a request body: a Spec is a few paths.
const maxBody = 64 << 10

// Handler is the control API (package client documents it).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /vms/{id}", s.handlePut)
	mux.HandleFunc("GET /vms/{id}", func(w http.ResponseWriter, r *http.Request) {
		vm, err := s.Get(r.PathValue("id"))
		reply(w, http.StatusOK, vm, err)
	})
	mux.HandleFunc("DELETE /vms/{id}", func(w http.ResponseWriter, r *http.Request) {
		force := false
		if f := r.URL.Query().Get("force"); f != "" {
			if force = f == "true" || f == "1"; !force && f != "false" && f != "0" {
				reply(w, 0, nil, badRequest("force=%q: want true or false", f))
				return
			}
		}
		vm, err := s.Delete(r.PathValue("id"), force)
		reply(w, http.StatusOK, vm, err)
	})
	mux.HandleFunc("GET /vms", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, map[string]any{"vms": s.List()}, nil)
	})
	mux.HandleFunc("GET /snapshots", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, map[string]any{"snapshots": s.Snapshots()}, nil)
	})
	// Everything else, as JSON errors too (the mux's own answers are plain text).
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		var allow string
		switch {
		case p == "/vms", p == "/snapshots":
			allow = "GET"
		case strings.HasPrefix(p, "/vms/") && !strings.Contains(p[len("/vms/"):], "/"):
			allow = "GET, PUT, DELETE"
		default:
			reply(w, 0, nil, &client.Error{Status: http.StatusNotFound, Message: fmt.Sprintf("no endpoint %s (the API has /vms, /vms/{id} and /snapshots)", p)})
			return
		}
		w.Header().Set("Allow", allow)
		reply(w, 0, nil, &client.Error{Status: http.StatusMethodNotAllowed, Message: fmt.Sprintf("%s %s: allowed: %s", r.Method, p, allow)})
	})
	return mux
}

func (s *Server) handlePut(w http.ResponseWriter, r *http.Request) {
	var spec client.Spec
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(&spec)
	if err == nil && dec.Decode(&struct{}{}) != io.EOF {
		err = errors.New("more than one JSON value")
	}
	if err != nil {
		reply(w, 0, nil, badRequest("malformed JSON body: %v (want {\"snapshot\" or \"mem_file\": PATH, \"socket\": PATH})", err))
		return
	}
	vm, err := s.Create(r.PathValue("id"), spec)
	reply(w, http.StatusCreated, vm, err)
}

// reply writes v with status, or err as {"error": ...} with its status (500 if it has none).
func reply(w http.ResponseWriter, status int, v any, err error) {
	if err != nil {
		var e *client.Error
		if !errors.As(err, &e) {
			e = &client.Error{Status: http.StatusInternalServerError, Message: err.Error()}
		}
		status, v = e.Status, e
	}
	b, merr := json.MarshalIndent(v, "", "  ")
	if merr != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error": "encoding the answer failed"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// ListenControl serves the control API on a Unix socket at path, bound as the daemon's UFFD
// sockets are (daemon.Listen: mode 0600, a stale socket file replaced, a path another process
// listens on refused). Only the owner's uid (and root) can connect: whoever can reach the
// control API can make the daemon listen anywhere it may write. The socket is closed and
// removed when the server is done (Drain or Close, then every VM gone).
//
// With Config.StateDir it first makes again the bindings of the state directory's fleet.json,
// whose daemons recover their VMs; with Config.Takeover it takes the control socket (path is
// then the predecessor's) and every binding over from the fleet running there (handoff.go).
func (s *Server) ListenControl(path string) error {
	s.mu.Lock()
	if s.draining || s.http != nil || s.served != nil {
		s.mu.Unlock()
		return errors.New("fleet: control socket: the server is stopping or has one")
	}
	s.served = make(chan struct{}) // taken
	s.mu.Unlock()
	err := s.listenControl(path)
	if err != nil {
		s.mu.Lock()
		s.served = nil
		s.mu.Unlock()
	}
	return err
}

func (s *Server) listenControl(path string) error {
	var ln *daemon.Listener
	if dir := s.cfg.StateDir; dir != "" {
		var prev *net.UnixConn // the predecessor, in a takeover
		var err error
		if s.cfg.Takeover {
			if ln, s.lock, prev, err = takeover(dir); err != nil {
				// No live fleet to take over from (none ran, or it died during the hand-off):
				// with the lock free, the bindings are recovered as after a crash.
				var lerr error
				if s.lock, lerr = lockState(dir); lerr != nil {
					return errors.Join(err, lerr)
				}
				s.log.Warn("takeover: no live fleet to take over from; recovering the bindings of the state directory", "err", err)
			}
		} else if s.lock, err = lockState(dir); err != nil {
			return err
		}
		saved, err := loadState(dir)
		if err != nil {
			if prev != nil {
				abortHandoff(prev, err)
				ln.Close()
			}
			s.lock.Close()
			s.lock = nil
			return err
		}
		s.restore(saved, prev != nil)
		if err := s.save(); err != nil {
			s.log.Error("fleet.json not saved", "err", err)
		}
		if prev != nil {
			if ln.Path() != path {
				s.log.Warn("takeover: serving the predecessor's control socket, not the one configured", "socket", ln.Path(), "configured", path)
			}
			// Everything is ours: the predecessor exits once its bindings' daemons have
			// returned.
			sendMsg(prev, handoffMsg{Op: "done"})
			prev.Close()
		}
	}
	if ln == nil {
		var err error
		if ln, err = daemon.Listen(path, 0); err != nil {
			return fmt.Errorf("fleet: control socket: %w", err)
		}
	}
	s.mu.Lock()
	s.ctl = ln
	s.serveControlLocked()
	s.mu.Unlock()
	if s.cfg.StateDir != "" {
		if err := s.listenHandoff(); err != nil {
			s.log.Error("no live upgrade of this fleet: hand-off socket", "err", err)
		}
	}
	s.log.Info("control API listening", "socket", ln.Path(), "max_vms", s.cfg.MaxVMs, "cache_size", s.cfg.CacheSize,
		"state_dir", s.cfg.StateDir, "bindings", len(s.List()))
	return nil
}

// serveControlLocked serves the control API on s.ctl until the server is done or hands over.
func (s *Server) serveControlLocked() {
	s.ctlLn = &ctlListener{UnixListener: s.ctl.UnixListener}
	conns := &sync.WaitGroup{}
	s.http = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second,
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				conns.Add(1)
			case http.StateClosed, http.StateHijacked:
				conns.Done()
			}
		}}
	s.served, s.conns = make(chan struct{}), conns
	srv, ln, served := s.http, s.ctlLn, s.served
	go func() {
		srv.Serve(ln)
		close(served)
	}()
}

// ctlListener is the control socket as the HTTP server sees it: a pause (before a hand-off)
// stops its Accept without closing the socket, which goes on to the successor, connections
// waiting in its backlog included; Close leaves the socket to the Server.
type ctlListener struct {
	*net.UnixListener
	paused atomic.Bool
}

var errPaused = errors.New("fleet: control socket handed over")

func (l *ctlListener) Accept() (net.Conn, error) {
	c, err := l.UnixListener.Accept()
	if err != nil && l.paused.Load() {
		return nil, errPaused // not a timeout: the HTTP server must not retry
	}
	return c, err
}

func (l *ctlListener) Close() error { return nil }
