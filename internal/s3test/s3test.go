// Package s3test runs a real S3-compatible server for tests and benchmarks: versitygw
// (Apache-2.0), started as its own process on a free 127.0.0.1 port over a temporary directory,
// with generated credentials, and stopped with the test. It also has a small HTTP proxy to put in front of it
// that counts requests and answers some with 503 SlowDown, for the tests of retries.
//
// The binary is found as $FAULTLINE_VERSITYGW, on PATH, or in $GOPATH/bin (where `go install
// github.com/versity/versitygw/cmd/versitygw@v1.8.0` puts it; .ci/run does that). Without it a
// test skips, or fails where FAULTLINE_REQUIRE_KERNEL=1 or CI is set (CI must run them).
package s3test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/syncbuf"
)

// Version is the versitygw release the tests are written against.
const Version = "v1.8.0"

// Binary returns the path of the versitygw binary, or an error saying how to get it.
func Binary() (string, error) {
	if p := os.Getenv("FAULTLINE_VERSITYGW"); p != "" {
		return p, nil
	}
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, nil
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = strings.TrimSpace(string(out))
		}
	}
	for _, d := range filepath.SplitList(gopath) {
		p := filepath.Join(d, "bin", "versitygw")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("versitygw not found (go install github.com/versity/versitygw/cmd/versitygw@%s)", Version)
}

// Require fails the test where the S3 tests must run (FAULTLINE_REQUIRE_KERNEL=1, as CI sets,
// or CI set) and skips it elsewhere.
func Require(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("FAULTLINE_REQUIRE_KERNEL") == "1" || os.Getenv("CI") != "" {
		t.Fatalf("S3 test cannot run: %s", why)
	}
	t.Skip(why)
}

// A Server is a running versitygw.
type Server struct {
	Endpoint string // http://127.0.0.1:PORT
	Access   string
	Secret   string
	Dir      string // the directory it serves (a bucket is a directory in it)

	bin  string
	addr string
	mu   sync.Mutex
	cmd  *exec.Cmd
	log  *syncbuf.Buffer
	// exited receives the process's end: the goroutine that waits for it owns cmd.Wait.
	exited chan error
}

// Start starts a server for the test over a temporary directory, stopped at its end.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		Require(t, err.Error())
	}
	s, err := Launch(bin, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Launch starts the versitygw binary bin over dir on a free 127.0.0.1 port with generated
// credentials, and waits until it answers. The caller stops it.
func Launch(bin, dir string) (*Server, error) {
	s := &Server{bin: bin, Dir: dir, Access: "AK" + randHex(8), Secret: randHex(20)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.addr = ln.Addr().String()
	ln.Close()
	s.Endpoint = "http://" + s.addr
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return strings.ToUpper(hex.EncodeToString(b))[:2*n]
}

func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return nil
	}
	log := &syncbuf.Buffer{}
	cmd := exec.Command(s.bin, "--port", s.addr, "--access", s.Access, "--secret", s.Secret, "posix", s.Dir)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start versitygw: %w", err)
	}
	s.cmd, s.log = cmd, log
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-exited:
			s.cmd = nil
			return fmt.Errorf("versitygw exited at start: %v\n%s", err, log.String())
		default:
		}
		// Any HTTP answer (an S3 error for an anonymous request) means it serves.
		if resp, err := http.Get(s.Endpoint + "/"); err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-exited
			s.cmd = nil
			return fmt.Errorf("versitygw did not answer on %s within 30 s\n%s", s.addr, log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.exited = exited
	return nil
}

// Stop kills the server (SIGKILL: as a crash, nothing flushed) and waits for it. Restart
// starts it again on the same port over the same directory.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

// Restart starts a stopped server again.
func (s *Server) Restart() error { return s.start() }

// Log is what the server printed.
func (s *Server) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.log == nil {
		return ""
	}
	return s.log.String()
}

// A Proxy forwards HTTP requests to a server, counting them, and answers the requests a test
// chooses with an S3 error instead.
type Proxy struct {
	URL string // http://127.0.0.1:PORT, to use as the endpoint

	srv *http.Server
	mu  sync.Mutex
	// fail, if set, is asked about every request: a non-zero status is answered with code
	// (an S3 error document) instead of forwarding.
	fail     func(r *http.Request) (status int, code string)
	requests map[string]int // "METHOD path" → count (forwarded ones)
	failed   atomic.Int64
}

// NewProxy starts a proxy to target (an endpoint URL), stopped with the test.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{URL: "http://" + ln.Addr().String(), requests: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.Transport = &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		fail := p.fail
		p.mu.Unlock()
		if fail != nil {
			if status, code := fail(r); status != 0 {
				p.failed.Add(1)
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "application/xml")
				w.WriteHeader(status)
				fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>injected by the test proxy</Message><Resource>%s</Resource></Error>`, code, r.URL.Path)
				return
			}
		}
		p.mu.Lock()
		p.requests[r.Method+" "+r.URL.Path]++
		p.mu.Unlock()
		rp.ServeHTTP(w, r)
	})}
	go p.srv.Serve(ln)
	t.Cleanup(func() { p.srv.Close() })
	return p
}

// Fail sets the function asked about every request (nil: forward all).
func (p *Proxy) Fail(f func(r *http.Request) (status int, code string)) {
	p.mu.Lock()
	p.fail = f
	p.mu.Unlock()
}

// Failed is the number of requests answered with an injected error.
func (p *Proxy) Failed() int64 { return p.failed.Load() }

// Count returns how many requests of method whose path contains sub were forwarded.
func (p *Proxy) Count(method, sub string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for k, v := range p.requests {
		m, path, _ := strings.Cut(k, " ")
		if m == method && strings.Contains(path, sub) {
			n += v
		}
	}
	return n
}

// PerPath returns the forwarded requests of method whose path contains sub, by path.
func (p *Proxy) PerPath(method, sub string) map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]int{}
	for k, v := range p.requests {
		m, path, _ := strings.Cut(k, " ")
		if m == method && strings.Contains(path, sub) {
			out[path] += v
		}
	}
	return out
}
