//go:build linux

package cli

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
)

func TestMain(m *testing.M) {
	puppet.Main()
	os.Exit(m.Run())
}

// vmTouched waits for the socket, starts a VMM of 8 MiB on it (killed when the test ends) and
// checks its first half against the pattern of seed 9.
func vmTouched(t *testing.T, sock string) *vmm.VMM {
	t.Helper()
	waitFor(t, "the socket", func() bool { _, err := os.Stat(sock); return err == nil })
	m, err := vmm.Start(vmm.Options{Socket: sock, Regions: []vmm.Region{{Size: 8 << 20}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Kill)
	if got, err := m.TouchRange(0, 0, 4<<20, 2, 9, false); err != nil || got.Wrong != 0 {
		t.Fatalf("touch: %+v %v", got, err)
	}
	return m
}

// waitFor polls real state (counters, logs, files) for up to 10 s.
var waitFor = kerneltest.WaitUntil

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

// faultline serve end to end: metrics endpoint, SIGTERM drains (no new VMs, the live one is
// still served until it exits), then the command returns 0.
func TestServeDrainOnSIGTERM(t *testing.T) {
	dir := t.TempDir()
	mem := filepath.Join(dir, "mem")
	b := make([]byte, 8<<20)
	puppet.Fill(b, 9, 0)
	os.WriteFile(mem, b, 0o600)
	sock := filepath.Join(dir, "fc.sock")
	var stderr syncbuf.Buffer
	code := make(chan int, 1)
	go func() {
		code <- Run([]string{"serve", "--socket", sock, "--mem-file", mem, "--metrics-addr", "127.0.0.1:0"}, io.Discard, &stderr)
	}()
	m := vmTouched(t, sock)
	// Metrics.
	addr := regexp.MustCompile(`msg=metrics addr=(\S+)`).FindStringSubmatch(stderr.String())
	if addr == nil {
		t.Fatalf("no metrics address logged:\n%s", stderr.String())
	}
	body := scrape(t, addr[1])
	for _, want := range []string{"faultline_vms_live 1", "faultline_faults_total", `faultline_pages_installed_total{cause="fault"}`, "faultline_fault_latency_seconds_bucket"} {
		if !strings.Contains(body, want) {
			t.Fatalf("metrics lack %q:\n%s", want, body)
		}
	}
	// Drain.
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	waitFor(t, "the socket to go", func() bool { _, err := os.Stat(sock); return os.IsNotExist(err) })
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		t.Fatal("a new VM could connect while draining")
	}
	if got, err := m.TouchRange(0, 4<<20, 4<<20, 2, 9, false); err != nil || got.Wrong != 0 {
		t.Fatalf("live VM not served while draining: %+v %v", got, err)
	}
	// Still serving, and still counting the VM live: the metrics server stops when serve
	// returns, so this scrape also proves serve has not returned.
	if body := scrape(t, addr[1]); !strings.Contains(body, "faultline_vms_live 1") {
		t.Fatalf("while draining, metrics say:\n%s", body)
	}
	select {
	case c := <-code:
		t.Fatalf("serve returned %d with a VM live", c)
	default:
	}
	m.Exit()
	select {
	case c := <-code:
		if c != 0 {
			t.Fatalf("serve exit code %d\n%s", c, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("serve did not return after the last VM exited\n%s", stderr.String())
	}
	if !strings.Contains(stderr.String(), "VM ended") {
		t.Fatalf("no VM report logged:\n%s", stderr.String())
	}
}

// A second signal exits at once, VMs live or not.
func TestServeSecondSignalExits(t *testing.T) {
	dir := t.TempDir()
	mem := filepath.Join(dir, "mem")
	os.WriteFile(mem, make([]byte, 4<<20), 0o600)
	sock := filepath.Join(dir, "fc.sock")
	var stderr syncbuf.Buffer
	code := make(chan int, 1)
	go func() {
		code <- Run([]string{"serve", "--socket", sock, "--mem-file", mem, "--on-failure", "log"}, io.Discard, &stderr)
	}()
	waitFor(t, "the socket", func() bool { _, err := os.Stat(sock); return err == nil })
	m, err := vmm.Start(vmm.Options{Socket: sock, Regions: []vmm.Region{{Size: 4 << 20}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	waitFor(t, "the VM to be served", func() bool { return strings.Contains(stderr.String(), "msg=serving vm=") })
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	waitFor(t, "draining", func() bool { return strings.Contains(stderr.String(), "draining") })
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	select {
	case c := <-code:
		if c != 0 {
			t.Fatalf("exit code %d", c)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("serve did not exit on the second signal\n%s", stderr.String())
	}
}

// faultline serve --takeover: a second serve takes the socket and the live VM over from the
// first, which returns 0; the VM goes on being served, by the second.
func TestServeTakeover(t *testing.T) {
	dir := t.TempDir()
	mem := filepath.Join(dir, "mem")
	b := make([]byte, 8<<20)
	puppet.Fill(b, 9, 0)
	os.WriteFile(mem, b, 0o600)
	sock, state := filepath.Join(dir, "fc.sock"), filepath.Join(dir, "state")
	args := []string{"serve", "--socket", sock, "--mem-file", mem, "--state-dir", state}
	var errA, errB syncbuf.Buffer
	codeA, codeB := make(chan int, 1), make(chan int, 1)
	go func() { codeA <- Run(args, io.Discard, &errA) }()
	m := vmTouched(t, sock)
	go func() { codeB <- Run(append(args, "--takeover"), io.Discard, &errB) }()
	select {
	case c := <-codeA:
		if c != 0 {
			t.Fatalf("the first serve after the hand-off: exit %d\n%s", c, errA.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the first serve did not return after the takeover\n%s\n%s", errA.String(), errB.String())
	}
	if got, err := m.TouchRange(0, 4<<20, 4<<20, 2, 9, false); err != nil || got.Wrong != 0 {
		t.Fatalf("the VM after the takeover: %+v %v\n%s", got, err, errB.String())
	}
	if !strings.Contains(errB.String(), "VM taken over") || !strings.Contains(errA.String(), "hand-off done") {
		t.Fatalf("logs:\n%s\n%s", errA.String(), errB.String())
	}
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	waitFor(t, "draining", func() bool { return strings.Contains(errB.String(), "draining") })
	m.Exit()
	select {
	case c := <-codeB:
		if c != 0 {
			t.Fatalf("the second serve: exit %d\n%s", c, errB.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the second serve did not return after the VM exited\n%s", errB.String())
	}
	if !strings.Contains(errB.String(), `origin="taken over"`) {
		t.Fatalf("the VM's report does not say it was taken over:\n%s", errB.String())
	}
}

func TestServeUsage(t *testing.T) {
	var out syncbuf.Buffer
	if c := Run([]string{"serve", "--socket", "/x", "--mem-file", "/m", "--takeover"}, io.Discard, &out); c != 2 || !strings.Contains(out.String(), "--takeover needs --state-dir") {
		t.Fatalf("--takeover without --state-dir: exit %d: %s", c, out.String())
	}
	if c := Run([]string{"serve"}, io.Discard, &out); c != 2 || !strings.Contains(out.String(), "--socket and one of --mem-file or --snapshot are required") {
		t.Fatalf("exit %d: %s", c, out.String())
	}
	if c := Run([]string{"serve", "--socket", "/x", "--mem-file", "/m", "--snapshot", "/d"}, io.Discard, &out); c != 2 {
		t.Fatalf("both --mem-file and --snapshot: exit %d: %s", c, out.String())
	}
	if c := Run([]string{"serve", "--socket", "/x", "--mem-file", "/m", "--record"}, io.Discard, &out); c != 2 || !strings.Contains(out.String(), "--record needs --snapshot") {
		t.Fatalf("--record with --mem-file: exit %d: %s", c, out.String())
	}
	if c := Run([]string{"serve", "--socket", "/x", "--snapshot", t.TempDir()}, io.Discard, &out); c != 1 || !strings.Contains(out.String(), "not a snapshot") {
		t.Fatalf("a directory that is no snapshot: exit %d: %s", c, out.String())
	}
	if c := Run([]string{"serve", "--socket", "/x", "--mem-file", "/nonexistent"}, io.Discard, &out); c != 1 || !strings.Contains(out.String(), "memory file") {
		t.Fatalf("missing file: exit %d: %s", c, out.String())
	}
}

func TestDemo(t *testing.T) {
	var out syncbuf.Buffer
	if c := Run([]string{"demo", "--size", "16M", "--threads", "2"}, &out, &out); c != 0 {
		t.Fatalf("demo exit %d:\n%s", c, out.String())
	}
	s := out.String()
	for _, want := range []string{"0 wrong", "the VM exits", "page faults", "zero pages (after the balloon)", "restore with the working set prefetched"} {
		if !strings.Contains(s, want) {
			t.Fatalf("demo output lacks %q:\n%s", want, s)
		}
	}
	// The table adds up, and the prefetched restore takes fewer faults than the recording one.
	// How many fewer depends on how far the prefetch is ahead of the vCPUs, which start at
	// once, as Firecracker's do — on a loaded machine it fell to 1/8; the ≥ 90% cut on the
	// same workload is daemon's TestRecordThenPrefetchVM, which waits for the prefetch first.
	var recPages, recFaults, prePages, preFaults, prefetched int
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "restore with --record") {
			fmt.Sscanf(l[46:], "%d %d", &recPages, &recFaults)
		}
		if strings.HasPrefix(l, "restore with the working set prefetched") {
			fmt.Sscanf(l[46:], "%d %d %d", &prePages, &preFaults, &prefetched)
		}
	}
	if recFaults < recPages || prefetched == 0 || preFaults >= recFaults || prePages != recPages || prefetched+preFaults < prePages {
		t.Fatalf("record: %d pages, %d faults; prefetch: %d pages, %d faults, %d prefetched; want one fault per page recording, "+
			"and with prefetch fewer faults, every page prefetched or faulted:\n%s", recPages, recFaults, prePages, preFaults, prefetched, s)
	}
	if strings.Contains(s, "wrong\n") && regexp.MustCompile(`[1-9]\d* wrong`).MatchString(s) {
		t.Fatalf("demo reports wrong pages:\n%s", s)
	}
}
