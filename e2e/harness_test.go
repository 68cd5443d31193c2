//go:build linux

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/fcapi"
	"github.com/faultline-go/faultline/internal/kerneltest"
)

// EnvDir names the directory with firecracker, vmlinux and initrd.cpio.
const EnvDir = "FAULTLINE_FIRECRACKER_DIR"

// The guest: small, so that one boot fits CI's time on a nested hypervisor (measured on a
// busy 2-CPU machine: 85-140 s from InstanceStart to /init, then 2-5 s per MiB of pattern
// fill). clearcpuid/noxsave hide CPU features the nested hypervisor's instruction emulator
// lacks (kvm-pvm emulates the guest kernel's IRQs-off code).
const (
	guestMemMiB  = 128
	memtestMiB   = 16
	balloonMiB   = 16
	bootArgs     = "console=ttyS0 reboot=k panic=1 pci=off nomodules 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd clearcpuid=cx16,popcnt,smap,fsgsbase noxsave quiet"
	bootTimeout  = 7 * time.Minute // InstanceStart to the first VERIFY-OK, on a busy 2-CPU machine
	apiTimeout   = 60 * time.Second
	guestTimeout = 90 * time.Second // a restored guest's next VERIFY-OK
)

var (
	baseDir string // this run's temporary directory (short: socket paths are limited to 108 bytes)

	setupOnce sync.Once
	setupErr  error
	setupSkip string
	env       struct {
		dir, firecracker, kernel, initrd string
		faultline                        string // the built binary
		snapState, snapMem               string // the shared Full snapshot
		lastPass                         int    // the guest's last VERIFY-OK pass before the snapshot
	}
)

func TestMain(m *testing.M) {
	var err error
	baseDir, err = os.MkdirTemp("", "fl-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(baseDir)
	os.Exit(code)
}

// setup builds faultline and boots, fills and snapshots the one VM of this run (once); every
// test calls it first.
func setup(t *testing.T) {
	t.Helper()
	setupOnce.Do(func() { setupSkip, setupErr = doSetup(t) })
	if setupSkip != "" {
		kerneltest.Require(t, setupSkip)
	}
	if setupErr != nil {
		t.Fatalf("setup (boot and snapshot of the shared VM): %v", setupErr)
	}
}

func doSetup(t *testing.T) (skip string, err error) {
	env.dir = os.Getenv(EnvDir)
	if env.dir == "" {
		return EnvDir + " is not set (a directory with firecracker, vmlinux, initrd.cpio)", nil
	}
	env.firecracker = filepath.Join(env.dir, "firecracker")
	env.kernel = filepath.Join(env.dir, "vmlinux")
	env.initrd = filepath.Join(env.dir, "initrd.cpio")
	for _, p := range []string{env.firecracker, env.kernel, env.initrd} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Sprintf("%s: %v", EnvDir, err), nil
		}
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return "no /dev/kvm: " + err.Error(), nil
	}
	if os.Geteuid() != 0 {
		return "not root: the daemon's userfaultfd must trap the VMM's kernel-mode faults", nil
	}
	env.faultline = filepath.Join(baseDir, "faultline")
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("building faultline: %w", err)
	}
	build := exec.Command(goBin, "build", "-o", env.faultline, "github.com/faultline-go/faultline/cmd/faultline")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build faultline: %v\n%s", err, out)
	}

	dir := filepath.Join(baseDir, "boot")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	vm, err := startFirecracker(t, dir, "boot")
	if err != nil {
		return "", err
	}
	defer vm.kill()
	ctx := context.Background() // each call is bounded by the client's apiTimeout
	steps := []func() error{
		func() error {
			return vm.api.PutBootSource(ctx, fcapi.BootSource{KernelImagePath: env.kernel, InitrdPath: env.initrd,
				BootArgs: fmt.Sprintf("%s memtest_mib=%d", bootArgs, memtestMiB)})
		},
		func() error {
			return vm.api.PutMachineConfig(ctx, fcapi.MachineConfig{VcpuCount: 1, MemSizeMib: guestMemMiB})
		},
		// A balloon device at 0 MiB, for the balloon case of the restored VMs.
		func() error {
			return vm.api.PutBalloon(ctx, fcapi.Balloon{AmountMib: 0, StatsPollingIntervalS: 1})
		},
		func() error { return vm.api.InstanceStart(ctx) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return "", err
		}
	}
	t0 := time.Now()
	if _, err := vm.console.wait(0, reBoot, bootTimeout); err != nil {
		return "", fmt.Errorf("boot: %w\n%s", err, vm.tail())
	}
	tBoot := time.Since(t0)
	if _, err := vm.console.wait(0, reVerifyOK, bootTimeout-tBoot); err != nil {
		return "", fmt.Errorf("first verify pass: %w\n%s", err, vm.tail())
	}
	tReady := time.Since(t0)
	if err := vm.api.Pause(ctx); err != nil {
		return "", err
	}
	env.lastPass = vm.console.lastPass()
	env.snapState = filepath.Join(baseDir, "snap.state")
	env.snapMem = filepath.Join(baseDir, "snap.mem")
	t1 := time.Now()
	if err := vm.api.CreateSnapshot(ctx, fcapi.SnapshotCreate{SnapshotType: "Full", SnapshotPath: env.snapState, MemFilePath: env.snapMem}); err != nil {
		return "", err
	}
	t.Logf("shared VM: FCBOOT-OK %v after InstanceStart, first VERIFY-OK %v; Full snapshot in %v (last pass before it: %d)",
		tBoot.Round(time.Millisecond), tReady.Round(time.Millisecond), time.Since(t1).Round(time.Millisecond), env.lastPass)
	for _, l := range vm.console.matching(reGuest) {
		t.Logf("  boot| %s", l)
	}
	return "", nil
}

var (
	reBoot     = regexp.MustCompile(`FCBOOT-OK`)
	reVerifyOK = regexp.MustCompile(`VERIFY-OK pass=(\d+)`)
	reBad      = regexp.MustCompile(`VERIFY-BAD`)
	reGuest    = regexp.MustCompile(`FCBOOT-OK|FILL-DONE|VERIFY-`)
	reRecord   = regexp.MustCompile(`^\{`)
)

// console collects a Firecracker process's stdout (the guest's serial console) and stderr.
type console struct {
	mu    sync.Mutex
	buf   []byte
	lines []string
}

func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = append(c.buf, p...)
	for {
		i := bytes.IndexByte(c.buf, '\n')
		if i < 0 {
			break
		}
		c.lines = append(c.lines, strings.TrimRight(string(c.buf[:i]), "\r"))
		c.buf = c.buf[i+1:]
	}
	return len(p), nil
}

// wait returns the index of the first line at or after from that matches re.
func (c *console) wait(from int, re *regexp.Regexp, timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for {
		c.mu.Lock()
		for i := from; i < len(c.lines); i++ {
			if re.MatchString(c.lines[i]) {
				c.mu.Unlock()
				return i, nil
			}
		}
		from = max(from, len(c.lines))
		c.mu.Unlock()
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no console line matching %q within %v", re, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitVerify waits for n more VERIFY-OK lines after line from and returns the index after the
// last one.
func (c *console) waitVerify(from, n int, timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for range n {
		i, err := c.wait(from, reVerifyOK, time.Until(deadline))
		if err != nil {
			return 0, err
		}
		from = i + 1
	}
	return from, nil
}

// String is everything written so far.
func (c *console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Join(c.lines, "\n") + "\n" + string(c.buf)
}

func (c *console) matching(re *regexp.Regexp) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, l := range c.lines {
		if re.MatchString(l) {
			out = append(out, l)
		}
	}
	return out
}

func (c *console) lastPass() int {
	ls := c.matching(reVerifyOK)
	if len(ls) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(reVerifyOK.FindStringSubmatch(ls[len(ls)-1])[1])
	return n
}

// fcProc is one Firecracker process.
type fcProc struct {
	name    string
	cmd     *exec.Cmd
	api     *fcapi.Client
	console *console
	logPath string
	done    chan struct{} // closed when it has exited and been reaped
	state   *os.ProcessState
}

// startFirecracker starts `firecracker --api-sock DIR/NAME.sock` and waits for its API socket.
// The test's cleanup kills it.
func startFirecracker(t *testing.T, dir, name string) (*fcProc, error) {
	sock := filepath.Join(dir, name+".sock")
	f := &fcProc{name: name, console: &console{}, logPath: filepath.Join(dir, name+".log"), done: make(chan struct{})}
	if err := os.WriteFile(f.logPath, nil, 0o600); err != nil {
		return nil, err
	}
	f.cmd = exec.Command(env.firecracker, "--api-sock", sock, "--id", name, "--log-path", f.logPath, "--level", "Info")
	f.cmd.Stdout = f.console
	f.cmd.Stderr = f.console
	f.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test
	if err := f.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		f.cmd.Wait()
		f.state = f.cmd.ProcessState
		close(f.done)
	}()
	t.Cleanup(f.kill)
	f.api = fcapi.New(sock, apiTimeout)
	// The socket file appears at bind, before listen: wait until it accepts a connection.
	listening := func() bool {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
		return err == nil || f.exited()
	}
	if err := waitUntil(10*time.Second, listening); err != nil || f.exited() {
		return nil, fmt.Errorf("firecracker %s: no API socket: %v\n%s", name, err, f.tail())
	}
	return f, nil
}

func (f *fcProc) pid() int { return f.cmd.Process.Pid }

func (f *fcProc) exited() bool {
	select {
	case <-f.done:
		return true
	default:
		return false
	}
}

// kill SIGKILLs the process and reaps it.
func (f *fcProc) kill() {
	f.cmd.Process.Signal(syscall.SIGKILL)
	<-f.done
}

// waitExit waits for the process to exit by itself (or someone else's signal).
func (f *fcProc) waitExit(timeout time.Duration) (*os.ProcessState, error) {
	select {
	case <-f.done:
		return f.state, nil
	case <-time.After(timeout):
		return nil, fmt.Errorf("firecracker %s still running after %v", f.name, timeout)
	}
}

// tail is the end of the console and of Firecracker's log, for failure messages.
func (f *fcProc) tail() string {
	f.console.mu.Lock()
	ls := f.console.lines[max(0, len(f.console.lines)-15):]
	out := "console:\n  " + strings.Join(ls, "\n  ")
	f.console.mu.Unlock()
	if b, err := os.ReadFile(f.logPath); err == nil {
		l := strings.Split(strings.TrimSpace(string(b)), "\n")
		out += "\nfirecracker log:\n  " + strings.Join(l[max(0, len(l)-10):], "\n  ")
	}
	return out
}

// restore starts a fresh Firecracker and loads the shared snapshot into it with the Uffd
// backend on the daemon's socket.
func restore(t *testing.T, d *daemon, name string, resume bool) *fcProc {
	t.Helper()
	f, err := startFirecracker(t, d.dir, name)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	t0 := time.Now()
	err = f.api.LoadSnapshot(ctx, fcapi.SnapshotLoad{SnapshotPath: env.snapState,
		MemBackend: fcapi.MemBackend{BackendType: "Uffd", BackendPath: d.socket}, ResumeVM: resume})
	if err != nil {
		t.Fatalf("snapshot/load: %v\n%s\ndaemon:\n%s", err, f.tail(), d.log.String())
	}
	t.Logf("%s: snapshot/load (resume_vm %v) took %v", name, resume, time.Since(t0).Round(time.Millisecond))
	return f
}

// verify waits for n VERIFY-OK lines after console line from, fails the test on VERIFY-BAD,
// and returns the index after the last one.
func verify(t *testing.T, f *fcProc, from, n int) int {
	t.Helper()
	next, err := f.console.waitVerify(from, n, guestTimeout)
	if err != nil {
		t.Fatalf("%s: %v\n%s", f.name, err, f.tail())
	}
	noBad(t, f)
	return next
}

func noBad(t *testing.T, f *fcProc) {
	t.Helper()
	if bad := f.console.matching(reBad); len(bad) > 0 {
		t.Fatalf("%s: the restored guest read wrong memory: %q", f.name, bad)
	}
}

// logConsole logs the guest's console lines of f (at most n VERIFY lines, the first and the
// last ones).
func logConsole(t *testing.T, f *fcProc, n int) {
	t.Helper()
	ls := f.console.matching(reGuest)
	if len(ls) > n {
		ls = append(append(ls[:n/2:n/2], fmt.Sprintf("... (%d more)", len(ls)-n)), ls[len(ls)-(n-n/2):]...)
	}
	for _, l := range ls {
		t.Logf("  %s| %s", f.name, l)
	}
}

// daemon is one `faultline serve` process.
type daemon struct {
	dir, socket string
	cmd         *exec.Cmd
	log         *console // its stderr: JSON log records
	metricsAddr string
	done        chan struct{}
}

// startDaemon runs `faultline serve --socket DIR/uffd.sock --mem-file MEM --metrics-addr
// 127.0.0.1:0 --log-format json` in a directory of its own and waits until it serves.
func startDaemon(t *testing.T, mem string) *daemon {
	t.Helper()
	return startServe(t, "--mem-file", mem)
}

// startServe is startDaemon with the source flags given (--mem-file M, or --snapshot DIR ...).
func startServe(t *testing.T, source ...string) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp(baseDir, "t")
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{dir: dir, socket: filepath.Join(dir, "uffd.sock"), log: &console{}, done: make(chan struct{})}
	args := append([]string{"serve", "--socket", d.socket}, source...)
	d.cmd = exec.Command(env.faultline, append(args, "--metrics-addr", "127.0.0.1:0", "--log-format", "json")...)
	d.cmd.Stdout = d.log
	d.cmd.Stderr = d.log
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.done
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log.String())
		}
	})
	err = waitUntil(10*time.Second, func() bool {
		for _, r := range d.records("metrics") {
			d.metricsAddr, _ = r["addr"].(string)
		}
		return d.metricsAddr != "" && len(d.records("serving")) > 0
	})
	if err != nil {
		t.Fatalf("faultline serve did not start: %v\n%s", err, d.log.String())
	}
	return d
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

// records are the daemon's JSON log records with this msg.
func (d *daemon) records(msg string) []map[string]any {
	var out []map[string]any
	for _, l := range d.log.matching(reRecord) {
		var r map[string]any
		if json.Unmarshal([]byte(l), &r) == nil && r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// ended waits for the daemon's "VM ended" report of the VMM with this pid.
func (d *daemon) ended(t *testing.T, pid int) map[string]any {
	t.Helper()
	var rep map[string]any
	err := waitUntil(30*time.Second, func() bool {
		for _, r := range d.records("VM ended") {
			if num(r["pid"]) == float64(pid) {
				rep = r
				return true
			}
		}
		return false
	})
	if err != nil {
		t.Fatalf("no \"VM ended\" report for pid %d: %v\n%s", pid, err, d.log.String())
	}
	return rep
}

func num(v any) float64 { f, _ := v.(float64); return f }

var metricsClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// metrics scrapes the daemon's Prometheus endpoint: series (name with labels) → value.
func (d *daemon) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	resp, err := metricsClient.Get("http://" + d.metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	m := map[string]float64{}
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
			m[l[:i]] = v
		}
	}
	return m
}

// waitMetric waits until cond holds for the series' value.
func (d *daemon) waitMetric(t *testing.T, series string, cond func(float64) bool, what string) float64 {
	t.Helper()
	var v float64
	if err := waitUntil(30*time.Second, func() bool { v = d.metrics(t)[series]; return cond(v) }); err != nil {
		t.Fatalf("%s: %s = %v: %v", what, series, v, err)
	}
	return v
}

// fds counts the daemon's open file descriptors.
func (d *daemon) fds(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.pid()))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// fdKinds counts the daemon's file descriptors by what they are: "socket", "pipe",
// "anon_inode:[userfaultfd]", "anon_inode:[pidfd]", "file", ...
func (d *daemon) fdKinds(t *testing.T) map[string]int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", d.pid())
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int{}
	for _, e := range es {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		switch {
		case err != nil:
			continue // closed meanwhile
		case strings.HasPrefix(l, "/"):
			l = "file"
		case !strings.HasPrefix(l, "anon_inode:"):
			l, _, _ = strings.Cut(l, ":[") // socket:[123], pipe:[45]
		}
		m[l]++
	}
	return m
}

func waitUntil(timeout time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}
