// Package fcapi is a small typed client of Firecracker's HTTP API on its Unix socket: the calls
// the end-to-end tests make (boot, machine config, balloon, pause/resume, snapshot create and
// load). It follows Firecracker v1.14's API (swagger firecracker.yaml); fields it does not use
// are left out.
package fcapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Client talks to one Firecracker process's API socket.
type Client struct {
	socket string
	http   *http.Client
}

// New returns a client of the API socket at path. Each call is bounded by timeout (the caller's
// context can shorten it).
func New(socket string, timeout time.Duration) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		// Firecracker serves one connection at a time; a fresh one per call keeps a
		// half-closed idle connection from holding a later call.
		DisableKeepAlives: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Socket is the API socket's path.
func (c *Client) Socket() string { return c.socket }

// Error is an API call Firecracker refused: its status and fault_message.
type Error struct {
	Method, Path string
	Status       int
	Message      string
}

func (e *Error) Error() string {
	return fmt.Sprintf("firecracker %s %s: %d %s", e.Method, e.Path, e.Status, e.Message)
}

// BootSource is PUT /boot-source.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

// MachineConfig is PUT /machine-config.
type MachineConfig struct {
	VcpuCount       int    `json:"vcpu_count"`
	MemSizeMib      int    `json:"mem_size_mib"`
	TrackDirtyPages bool   `json:"track_dirty_pages,omitempty"`
	HugePages       string `json:"huge_pages,omitempty"` // "None" or "2M"
}

// Balloon is PUT /balloon (the device, before boot).
type Balloon struct {
	AmountMib             int  `json:"amount_mib"`
	DeflateOnOOM          bool `json:"deflate_on_oom"`
	StatsPollingIntervalS int  `json:"stats_polling_interval_s,omitempty"`
}

// BalloonStats is GET /balloon/statistics (the fields the tests read).
type BalloonStats struct {
	TargetPages uint64 `json:"target_pages"`
	ActualPages uint64 `json:"actual_pages"`
	TargetMib   uint64 `json:"target_mib"`
	ActualMib   uint64 `json:"actual_mib"`
	FreeMemory  uint64 `json:"free_memory"`
}

// SnapshotCreate is PUT /snapshot/create.
type SnapshotCreate struct {
	SnapshotType string `json:"snapshot_type"` // "Full" or "Diff"
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

// MemBackend says where a loaded snapshot's memory comes from: "File" (backend_path is the
// memory file) or "Uffd" (backend_path is the page-fault handler's socket).
type MemBackend struct {
	BackendType string `json:"backend_type"`
	BackendPath string `json:"backend_path"`
}

// SnapshotLoad is PUT /snapshot/load.
type SnapshotLoad struct {
	SnapshotPath        string     `json:"snapshot_path"`
	MemBackend          MemBackend `json:"mem_backend"`
	EnableDiffSnapshots bool       `json:"enable_diff_snapshots,omitempty"`
	ResumeVM            bool       `json:"resume_vm"`
}

// PutBootSource sets the kernel, initrd and command line.
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.do(ctx, http.MethodPut, "/boot-source", b, nil)
}

// PutMachineConfig sets vCPUs and memory.
func (c *Client) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return c.do(ctx, http.MethodPut, "/machine-config", m, nil)
}

// PutBalloon adds the balloon device (before InstanceStart).
func (c *Client) PutBalloon(ctx context.Context, b Balloon) error {
	return c.do(ctx, http.MethodPut, "/balloon", b, nil)
}

// PatchBalloon sets the balloon's target size.
func (c *Client) PatchBalloon(ctx context.Context, amountMib int) error {
	return c.do(ctx, http.MethodPatch, "/balloon", struct {
		AmountMib int `json:"amount_mib"`
	}{amountMib}, nil)
}

// BalloonStatistics reads the balloon's statistics (needs stats_polling_interval_s > 0).
func (c *Client) BalloonStatistics(ctx context.Context) (BalloonStats, error) {
	var s BalloonStats
	err := c.do(ctx, http.MethodGet, "/balloon/statistics", nil, &s)
	return s, err
}

// InstanceStart boots the configured VM.
func (c *Client) InstanceStart(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "/actions", struct {
		ActionType string `json:"action_type"`
	}{"InstanceStart"}, nil)
}

// Pause pauses the VM's vCPUs.
func (c *Client) Pause(ctx context.Context) error { return c.setState(ctx, "Paused") }

// Resume resumes a paused (or loaded, not resumed) VM.
func (c *Client) Resume(ctx context.Context) error { return c.setState(ctx, "Resumed") }

func (c *Client) setState(ctx context.Context, s string) error {
	return c.do(ctx, http.MethodPatch, "/vm", struct {
		State string `json:"state"`
	}{s}, nil)
}

// CreateSnapshot writes a snapshot of a paused VM.
func (c *Client) CreateSnapshot(ctx context.Context, s SnapshotCreate) error {
	return c.do(ctx, http.MethodPut, "/snapshot/create", s, nil)
}

// LoadSnapshot restores a snapshot into this (fresh) Firecracker process.
func (c *Client) LoadSnapshot(ctx context.Context, s SnapshotLoad) error {
	return c.do(ctx, http.MethodPut, "/snapshot/load", s, nil)
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
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("firecracker %s %s: reading the response: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var f struct {
			FaultMessage string `json:"fault_message"`
		}
		msg := string(data)
		if json.Unmarshal(data, &f) == nil && f.FaultMessage != "" {
			msg = f.FaultMessage
		}
		return &Error{Method: method, Path: path, Status: resp.StatusCode, Message: msg}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("firecracker %s %s: decoding %q: %w", method, path, data, err)
		}
	}
	return nil
}
