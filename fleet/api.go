//go:build linux

package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
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
func (s *Server) ListenControl(path string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining || s.http != nil {
		return errors.New("fleet: control socket: the server is stopping or has one")
	}
	ln, err := daemon.Listen(path, 0)
	if err != nil {
		return fmt.Errorf("fleet: control socket: %w", err)
	}
	s.ctl = ln
	s.http = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go s.http.Serve(ln)
	s.log.Info("control API listening", "socket", path, "max_vms", s.cfg.MaxVMs, "cache_size", s.cfg.CacheSize)
	return nil
}
