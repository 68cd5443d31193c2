package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Spec is the body of PUT /vms/{id}: what a new binding serves and where. Exactly one of
// Snapshot and MemFile is set.
type Spec struct {
	// Snapshot is a packed snapshot (faultline pack): an absolute directory path, or a URL whose
	// scheme the daemon has an opener for (such as s3://BUCKET/PREFIX).
	Snapshot string `json:"snapshot,omitempty"`
	// MemFile is a raw memory snapshot file (Firecracker's mem_file), an absolute path.
	MemFile string `json:"mem_file,omitempty"`
	// Socket is the absolute path of the UFFD socket to listen on: the backend_path given to
	// Firecracker's PUT /snapshot/load.
	Socket string `json:"socket"`
	// Record records the working set of the VMs served into the packed snapshot.
	Record bool `json:"record,omitempty"`
}

// States of a binding.
const (
	StateCreating  = "creating"  // the PUT is opening its snapshot and socket
	StateListening = "listening" // VMs may connect
	StateDraining  = "draining"  // deleted: no longer listening; VMs served until they exit
	StateStopped   = "stopped"   // the listener failed; VMs served until they exit
)

// VM is a binding: a UFFD socket serving the VMs that connect to it from one snapshot.
type VM struct {
	ID       string    `json:"id"`
	Snapshot string    `json:"snapshot,omitempty"`
	MemFile  string    `json:"mem_file,omitempty"`
	Socket   string    `json:"socket"`
	Record   bool      `json:"record,omitempty"`
	State    string    `json:"state"`
	Created  time.Time `json:"created"`
	Error    string    `json:"error,omitempty"` // why the listener stopped (StateStopped)
	Stats    Stats     `json:"stats"`
}

// Stats are a binding's counters, over every VM (connection) served on its socket.
type Stats struct {
	Live       int    `json:"live"`       // VMs being served now
	Served     int    `json:"served"`     // VMs served since the binding was made, live ones included
	Faults     uint64 `json:"faults"`     // page-fault messages read
	Pages      uint64 `json:"pages"`      // pages installed, prefetched ones included
	ZeroPages  uint64 `json:"zero_pages"` // of which zero pages
	Prefetched uint64 `json:"prefetched"` // of which installed by the working-set prefetch
	Removed    uint64 `json:"removed"`    // pages dropped by REMOVE events (balloon)
	Bytes      uint64 `json:"bytes"`      // bytes copied from the snapshot
	P50Nanos   int64  `json:"p50_ns"`     // fault latency, estimated
	P99Nanos   int64  `json:"p99_ns"`
}

// Snapshot is a snapshot the daemon has open, shared by the bindings that use it.
type Snapshot struct {
	Ref  string `json:"ref"`
	Kind string `json:"kind"` // "snapshot" or "mem_file"
	Refs int    `json:"refs"` // bindings using it
	// CacheSize is its share of the daemon's cache memory bound (0 for a memory file, whose
	// pages are the kernel's page cache).
	CacheSize int64 `json:"cache_size"`
}

// Error is an error answer of the API.
type Error struct {
	Status  int    `json:"-"`
	Message string `json:"error"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s (%d %s)", e.Message, e.Status, http.StatusText(e.Status))
}

// IsStatus reports whether err is an API error with the status code.
func IsStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == status
}

// Client talks to a daemon's control socket. Its methods are safe for concurrent use.
type Client struct {
	// HTTP is the client used; New sets one that dials the socket.
	HTTP *http.Client
}

// New returns a client of the control socket at path. Nothing is dialled until a call.
func New(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{HTTP: &http.Client{Transport: tr}}
}

// Create binds a new UFFD socket to a snapshot under id; when it returns, the socket listens.
func (c *Client) Create(ctx context.Context, id string, spec Spec) (*VM, error) {
	var vm VM
	return &vm, c.do(ctx, http.MethodPut, "/vms/"+url.PathEscape(id), spec, &vm)
}

// List returns every binding, sorted by id.
func (c *Client) List(ctx context.Context) ([]VM, error) {
	var r struct {
		VMs []VM `json:"vms"`
	}
	return r.VMs, c.do(ctx, http.MethodGet, "/vms", nil, &r)
}

// Get describes one binding.
func (c *Client) Get(ctx context.Context, id string) (*VM, error) {
	var vm VM
	return &vm, c.do(ctx, http.MethodGet, "/vms/"+url.PathEscape(id), nil, &vm)
}

// Delete removes a binding: when it returns, its socket no longer listens and its file is gone.
// VMs connected keep being served until they exit (the binding is listed as draining until
// then), or, with force, are ended now by the daemon's failure policy.
func (c *Client) Delete(ctx context.Context, id string, force bool) (*VM, error) {
	p := "/vms/" + url.PathEscape(id)
	if force {
		p += "?force=true"
	}
	var vm VM
	return &vm, c.do(ctx, http.MethodDelete, p, nil, &vm)
}

// Snapshots lists the snapshots the daemon has open.
func (c *Client) Snapshots(ctx context.Context) ([]Snapshot, error) {
	var r struct {
		Snapshots []Snapshot `json:"snapshots"`
	}
	return r.Snapshots, c.do(ctx, http.MethodGet, "/snapshots", nil, &r)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	// The host is a placeholder: the transport dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://faultline"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(b, e) != nil || e.Message == "" {
			e.Message = string(bytes.TrimSpace(b))
		}
		return e
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("faultline control API: %s %s: decoding the answer: %w", method, path, err)
	}
	return nil
}
