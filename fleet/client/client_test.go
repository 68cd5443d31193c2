package client_test

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/faultline-go/faultline/fleet/client"
)

// serveUnix serves h on a Unix socket for the test's life.
func serveUnix(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.sock")
	ln, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return p
}

// The request a call sends, and what an answer becomes: a JSON error with its status, a
// non-JSON error body kept as the message, a success decoded.
func TestClient(t *testing.T) {
	var got struct{ method, path, ctype string }
	p := serveUnix(t, func(w http.ResponseWriter, r *http.Request) {
		got.method, got.path, got.ctype = r.Method, r.URL.RequestURI(), r.Header.Get("Content-Type")
		switch r.URL.Path {
		case "/vms/a":
			w.WriteHeader(http.StatusConflict)
			w.Write([]byte(`{"error": "VM \"a\" exists"}`))
		case "/vms/b":
			http.Error(w, "plain text", http.StatusBadGateway)
		default:
			w.Write([]byte(`{"id": "c c", "state": "draining", "stats": {"live": 2}}`))
		}
	})
	c := client.New(p)
	ctx := context.Background()
	_, err := c.Create(ctx, "a", client.Spec{MemFile: "/m", Socket: "/s"})
	if !client.IsStatus(err, http.StatusConflict) || err.Error() != `VM "a" exists (409 Conflict)` || got.method != "PUT" || got.ctype != "application/json" {
		t.Fatalf("create: %v (%+v)", err, got)
	}
	if _, err := c.Get(ctx, "b"); !client.IsStatus(err, http.StatusBadGateway) || err.(*client.Error).Message != "plain text" {
		t.Fatalf("get: %#v", err)
	}
	vm, err := c.Delete(ctx, "c c", true)
	if err != nil || vm.ID != "c c" || vm.State != client.StateDraining || vm.Stats.Live != 2 || got.method != "DELETE" || got.path != "/vms/c%20c?force=true" {
		t.Fatalf("delete: %+v, %v (%+v)", vm, err, got)
	}
}
