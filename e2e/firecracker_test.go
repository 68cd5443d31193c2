//go:build linux

package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/firecracker"
	"github.com/faultline-go/faultline/internal/fcapi"
	"github.com/faultline-go/faultline/uffd"
)

// One boot, one Full snapshot, many restores, each by a fresh Firecracker served by `faultline
// serve` as a separate process.
func TestRealFirecracker(t *testing.T) {
	setup(t)
	t.Run("handshake_as_sent", testHandshakeAsSent)
	t.Run("restore_resume_vm_true", func(t *testing.T) { testRestore(t, true) })
	t.Run("restore_resume_vm_false_then_resume", func(t *testing.T) { testRestore(t, false) })
	t.Run("balloon_inflate_deflate", testBalloon)
	t.Run("vm_killed_daemon_releases_all", testVMKilled)
	t.Run("memory_file_truncated_vm_killed", testTruncated)
	t.Run("three_vms_one_daemon", testSeveral)
	t.Run("packed_record_then_prefetch", testPackedPrefetch)
	t.Run("diff_snapshot_over_base", testDiff)
	t.Run("daemon_killed_restarted", testDaemonKilled)
	t.Run("daemon_upgraded_takeover", testDaemonUpgraded)
}

// endVM kills Firecracker with SIGKILL and returns the daemon's report of the VM, which must
// show faults served.
func endVM(t *testing.T, d *daemon, f *fcProc) map[string]any {
	t.Helper()
	f.kill()
	rep := d.ended(t, f.pid())
	// A prefetched VM may take no fault at all: then its pages came from the prefetch.
	if num(rep["pages"]) == 0 || (num(rep["faults"]) == 0 && num(rep["prefetched"]) == 0) {
		t.Errorf("%s: the daemon's report shows nothing served: %v", f.name, rep)
	}
	t.Logf("%s: daemon: VM ended: cause=%q faults=%v pages=%v zero_pages=%v first_fault=%vµs p50=%vµs p99=%vµs",
		f.name, rep["cause"], rep["faults"], rep["pages"], rep["zero_pages"],
		num(rep["first_fault"])/1e3, num(rep["p50"])/1e3, num(rep["p99"])/1e3)
	return rep
}

// The restored guest verifies its whole pattern, its pass numbers continuing the snapshot's.
// With resume_vm false, Firecracker faults guest memory during the load itself: the daemon has
// served faults before PATCH /vm Resumed, and the guest prints nothing until then.
func testRestore(t *testing.T, resume bool) {
	d := startDaemon(t, env.snapMem)
	f := restore(t, d, "vm", resume)
	if !resume {
		faults := d.waitMetric(t, "faultline_faults_total", func(v float64) bool { return v > 0 },
			"faults served during the load, before resume")
		if n := len(f.console.matching(reVerifyOK)); n != 0 {
			t.Fatalf("the guest printed %d VERIFY-OK lines before it was resumed", n)
		}
		t.Logf("before PATCH /vm Resumed: the daemon has served %v faults (the load's own)", faults)
		ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
		defer cancel()
		if err := f.api.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	}
	verify(t, f, 0, 3)
	if p := f.console.lastPass(); p <= env.lastPass {
		t.Errorf("pass %d after restore, want more than the snapshot's %d", p, env.lastPass)
	}
	logConsole(t, f, 4)
	endVM(t, d, f)
}

// Balloon on the restored VM: inflating makes Firecracker MADV_DONTNEED the pages the guest gave
// up, which reach the daemon as REMOVE events; deflating hands them back. The pattern stays
// intact throughout. The memtest region is never ballooned (the guest's balloon driver takes
// free pages), so the guest does not read the removed pages back itself; what is asserted is the
// REMOVE count and the pattern.
func testBalloon(t *testing.T) {
	d := startDaemon(t, env.snapMem)
	f := restore(t, d, "vm", true)
	next := verify(t, f, 0, 1)
	m0 := d.metrics(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	balloon := func(mib int) {
		t.Helper()
		t0 := time.Now()
		if err := f.api.PatchBalloon(ctx, mib); err != nil {
			t.Fatal(err)
		}
		var st fcapi.BalloonStats
		err := waitUntil(guestTimeout, func() bool {
			st, _ = f.api.BalloonStatistics(ctx)
			return st.ActualMib == uint64(mib)
		})
		if err != nil {
			t.Fatalf("balloon to %d MiB: actual %d MiB: %v\n%s", mib, st.ActualMib, err, f.tail())
		}
		t.Logf("balloon at %d MiB after %v (target_pages %d, actual_pages %d)", mib, time.Since(t0).Round(time.Millisecond), st.TargetPages, st.ActualPages)
	}
	balloon(balloonMiB)
	wantRemoved := m0["faultline_pages_removed_total"] + balloonMiB<<20/4096
	removed := d.waitMetric(t, "faultline_pages_removed_total", func(v float64) bool { return v >= wantRemoved },
		"REMOVE events of the inflation")
	next = verify(t, f, next, 2)
	balloon(0)
	verify(t, f, next, 2)
	m1 := d.metrics(t)
	t.Logf("pages removed: %v before, %v after inflating %d MiB, %v at the end; zero pages installed: %v before, %v at the end",
		m0["faultline_pages_removed_total"], removed, balloonMiB, m1["faultline_pages_removed_total"],
		m0[`faultline_pages_installed_total{cause="zero"}`], m1[`faultline_pages_installed_total{cause="zero"}`])
	logConsole(t, f, 6)
	endVM(t, d, f)
}

// Firecracker SIGKILLed: the daemon logs the VM's end, its live count drops to 0 and it holds no
// more file descriptors than before the VM came.
func testVMKilled(t *testing.T) {
	d := startDaemon(t, env.snapMem)
	base := d.fds(t) // before any scrape: a scrape's connection closes on its own time
	f := restore(t, d, "vm", true)
	verify(t, f, 0, 2)
	if live := d.metrics(t)["faultline_vms_live"]; live != 1 {
		t.Fatalf("faultline_vms_live = %v with one VM restored", live)
	}
	during := d.fdKinds(t)
	if during["anon_inode:[userfaultfd]"] != 1 || during["anon_inode:[pidfd]"] != 1 {
		t.Errorf("daemon fds while the VM runs: %v, want its uffd and its pidfd", during)
	}
	logConsole(t, f, 4)
	rep := endVM(t, d, f)
	if c, _ := rep["cause"].(string); !strings.Contains(c, "exited") {
		t.Errorf("end cause %q, want the VMM's exit", c)
	}
	d.waitMetric(t, "faultline_vms_live", func(v float64) bool { return v == 0 }, "live VMs after the kill")
	var now int
	if err := waitUntil(10*time.Second, func() bool { now = d.fds(t); return now == base }); err != nil {
		t.Fatalf("daemon fds: %d before the VM, %v while it ran, %d after it ended (%v): %v", base, during, now, d.fdKinds(t), err)
	}
	if after := d.fdKinds(t); after["anon_inode:[userfaultfd]"] != 0 || after["anon_inode:[pidfd]"] != 0 {
		t.Errorf("daemon fds after the VM ended: %v", after)
	}
	t.Logf("daemon fds: %d before the VM, %v while it ran, %d after", base, during, now)
}

// The memory file truncated under the daemon after the load, before the guest runs: the next
// fault cannot be served (UFFDIO_COPY from beyond the file's end fails), so the daemon kills
// Firecracker with SIGKILL rather than leave its vCPU hung or install a wrong page.
func testTruncated(t *testing.T) {
	mem := filepath.Join(baseDir, "trunc.mem")
	if err := copyFile(mem, env.snapMem); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(mem)
	d := startDaemon(t, mem)
	f := restore(t, d, "vm", false)
	d.waitMetric(t, "faultline_faults_total", func(v float64) bool { return v > 0 }, "faults of the load")
	if err := os.Truncate(mem, 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	// The first fault after the truncation can come before Firecracker answers the resume
	// (seen: the answer is lost, Firecracker killed while it resumes), so its error is logged.
	if err := f.api.Resume(ctx); err != nil {
		t.Logf("PATCH /vm Resumed: %v", err)
	}
	st, err := f.waitExit(guestTimeout)
	if err != nil {
		t.Fatalf("%v: the daemon did not kill the VM it cannot serve\n%s", err, f.tail())
	}
	ws, _ := st.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("firecracker ended with %v, want killed by SIGKILL", st)
	}
	noBad(t, f)
	rep := d.ended(t, f.pid())
	if fl, _ := rep["failure"].(string); fl == "" {
		t.Errorf("the daemon's report names no failure: %v", rep)
	}
	if len(d.records("cannot serve VM: killing the VMM")) != 1 {
		t.Errorf("no \"cannot serve VM: killing the VMM\" in the daemon's log:\n%s", d.log.String())
	}
	t.Logf("firecracker: %v; %d VERIFY-OK lines, 0 VERIFY-BAD; daemon: cause=%q failure=%q faults=%v",
		st, len(f.console.matching(reVerifyOK)), rep["cause"], rep["failure"], rep["faults"])
}

func copyFile(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// Three restores of one snapshot at once, from one daemon (one shared mapping of the file).
func testSeveral(t *testing.T) {
	const n = 3
	d := startDaemon(t, env.snapMem)
	var vms []*fcProc
	for i := range n {
		vms = append(vms, restore(t, d, fmt.Sprintf("vm%d", i), true))
	}
	for _, f := range vms {
		verify(t, f, 0, 2)
	}
	if live := d.metrics(t)["faultline_vms_live"]; live != n {
		t.Fatalf("faultline_vms_live = %v, want %d", live, n)
	}
	for _, f := range vms {
		logConsole(t, f, 2)
	}
	for _, f := range vms {
		endVM(t, d, f)
	}
	d.waitMetric(t, "faultline_vms_live", func(v float64) bool { return v == 0 }, "live VMs after the kills")
}

// What Firecracker v1.14 sends and keeps: the handshake read by a bare listener that serves
// nothing. It connects during PUT /snapshot/load, sends one message (a JSON array with both
// page_size and page_size_kib) with one uffd attached, keeps the socket open, keeps its own copy
// of the uffd, and faults guest memory from within the load, before any resume: with no handler
// serving, that thread sleeps in the kernel, also after the handler has closed everything.
func testHandshakeAsSent(t *testing.T) {
	dir, err := os.MkdirTemp(baseDir, "h")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "uffd.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := startFirecracker(t, dir, "capture")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	loaded := make(chan error, 1)
	t0 := time.Now()
	go func() {
		loaded <- f.api.LoadSnapshot(ctx, fcapi.SnapshotLoad{SnapshotPath: env.snapState,
			MemBackend: fcapi.MemBackend{BackendType: "Uffd", BackendPath: sock}, ResumeVM: false})
	}()
	ln.SetDeadline(time.Now().Add(apiTimeout))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatalf("firecracker did not connect: %v\n%s", err, f.tail())
	}
	defer c.Close()
	tConn := time.Since(t0)
	c.SetReadDeadline(time.Now().Add(apiTimeout))
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(8*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	msg := buf[:n]
	var fds []int
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	for _, cm := range cmsgs {
		r, err := unix.ParseUnixRights(&cm)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, r...)
	}
	t.Logf("connected %v into PUT /snapshot/load; one message of %d bytes with %d fds: %s", tConn.Round(time.Microsecond), n, len(fds), msg)
	if len(fds) != 1 {
		t.Fatalf("%d fds attached, want 1", len(fds))
	}
	st, _ := os.Stat(env.snapMem)
	regions, ver, err := firecracker.Decode(msg, firecracker.Limits{FileSize: st.Size(), HostPageSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if ver != firecracker.V1_12 {
		t.Errorf("handshake generation %v, want %v", ver, firecracker.V1_12)
	}
	// The emulator (internal/vmm) sends the same bytes for the same regions.
	if emu, err := firecracker.Encode(regions, firecracker.V1_12); err != nil || string(emu) != string(msg) {
		t.Errorf("the emulator's handshake differs from Firecracker's:\n  firecracker: %s\n  emulator:    %s (%v)", msg, emu, err)
	}
	u, err := uffd.NewFD(fds[0], false)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	info, err := u.Info()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("its uffd: features in force %v, ioctls %v", info.Enabled, info.Ioctls)
	if info.Enabled&uffd.FeatureEventRemove == 0 {
		t.Errorf("Firecracker's uffd lacks EVENT_REMOVE: %v", info.Enabled)
	}
	if k := uffdCount(t, f.pid()); k != 1 {
		t.Errorf("Firecracker holds %d userfaultfds after the handshake, want its own copy (1)", k)
	}

	// A fault arrives during the load, before resume, from a thread of Firecracker.
	r, err := u.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	u.SetReadDeadline(time.Now().Add(apiTimeout))
	msgs := make([]uffd.Msg, 8)
	k, err := r.Read(msgs)
	if err != nil {
		t.Fatalf("no fault during the load: %v", err)
	}
	pf := msgs[0].Pagefault()
	in := false
	for _, rg := range regions {
		in = in || pf.Address >= rg.Base && pf.Address < rg.Base+rg.Size
	}
	if msgs[0].Event() != uffd.EventPagefault || !in {
		t.Fatalf("first message %v at %#x, want a page fault in guest memory %+v", msgs[0].Event(), pf.Address, regions)
	}
	t.Logf("first of %d messages: %v at %#x (flags %v), %v into the load; the load has not returned: %v",
		k, msgs[0].Event(), pf.Address, pf.Flags, time.Since(t0).Round(time.Microsecond), len(loaded) == 0)
	var sleeper string
	err = waitUntil(10*time.Second, func() bool { sleeper = threadIn(f.pid(), "handle_userfault"); return sleeper != "" })
	if err != nil {
		t.Fatalf("no Firecracker thread asleep in handle_userfault: %v", err)
	}
	t.Logf("Firecracker thread %s sleeps in handle_userfault", sleeper)

	// The handler dies: its socket and its uffd copy close. Firecracker keeps its own uffd, so
	// the fault is not failed: the thread stays asleep and Firecracker does not notice.
	u.Close()
	c.Close()
	time.Sleep(2 * time.Second)
	if f.exited() {
		t.Fatalf("firecracker exited when the handler closed: %v\n%s", f.state, f.tail())
	}
	if s := threadIn(f.pid(), "handle_userfault"); s == "" {
		t.Errorf("after the handler closed, no Firecracker thread in handle_userfault any more\n%s", f.tail())
	} else {
		t.Logf("2s after the handler closed its socket and uffd: Firecracker alive, %s still in handle_userfault, %d uffd of its own", s, uffdCount(t, f.pid()))
	}
	f.kill()
	if err := <-loaded; err == nil {
		t.Errorf("the load returned success without its memory served")
	}
}

// uffdCount counts the userfaultfds process pid holds.
func uffdCount(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range es {
		if l, _ := os.Readlink(filepath.Join(dir, e.Name())); l == "anon_inode:[userfaultfd]" {
			n++
		}
	}
	return n
}

// threadIn names a thread of pid ("tid/comm") whose wchan is fn, or "".
func threadIn(pid int, fn string) string {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		w, _ := os.ReadFile(filepath.Join(dir, e.Name(), "wchan"))
		if string(w) == fn {
			comm, _ := os.ReadFile(filepath.Join(dir, e.Name(), "comm"))
			return e.Name() + "/" + strings.TrimSpace(string(comm))
		}
	}
	return ""
}

// A packed snapshot (faultline pack of the Full snapshot's memory file) restored three times:
// with --record (its working set stored in the snapshot), then with that working set
// prefetched from the handshake on, then with --no-prefetch. Every restore verifies the
// guest's pattern; the prefetched one takes fewer faults than the one served on demand, and
// the time from the load to the first VERIFY-OK of each is logged.
func testPackedPrefetch(t *testing.T) {
	dir := filepath.Join(baseDir, "packed")
	pack := exec.Command(env.faultline, "pack", "--mem-file", env.snapMem, "--out", dir)
	out, err := pack.CombinedOutput()
	if err != nil {
		t.Fatalf("faultline pack: %v\n%s", err, out)
	}
	t.Logf("faultline pack: %s", lastLine(string(out)))

	type run struct {
		name    string
		flags   []string
		toFirst time.Duration
		rep     map[string]any
	}
	runs := []*run{
		{name: "record", flags: []string{"--snapshot", dir, "--record"}},
		{name: "prefetch", flags: []string{"--snapshot", dir}},
		{name: "on-demand", flags: []string{"--snapshot", dir, "--no-prefetch"}},
	}
	for _, r := range runs {
		d := startServe(t, r.flags...)
		t0 := time.Now()
		f := restore(t, d, "vm-"+r.name, true)
		if _, err := f.console.wait(0, reVerifyOK, guestTimeout); err != nil {
			t.Fatalf("%s: %v\n%s", r.name, err, f.tail())
		}
		r.toFirst = time.Since(t0)
		verify(t, f, 0, 3)
		logConsole(t, f, 2)
		r.rep = endVM(t, d, f)
		if r.name == "record" {
			if err := waitUntil(10*time.Second, func() bool { return len(d.records("working set recorded")) > 0 }); err != nil {
				t.Fatalf("the working set was not recorded: %v\n%s", err, d.log.String())
			}
			t.Logf("record: working set of %v pages", d.records("working set recorded")[0]["pages"])
		}
		if r.name == "prefetch" && num(r.rep["prefetched"]) == 0 {
			t.Fatalf("prefetch: nothing prefetched: %v", r.rep)
		}
	}
	for _, r := range runs {
		t.Logf("%-9s load -> first VERIFY-OK %v; faults %v, prefetched %v", r.name, r.toFirst.Round(time.Millisecond), r.rep["faults"], r.rep["prefetched"])
	}
	if pre, od := num(runs[1].rep["faults"]), num(runs[2].rep["faults"]); pre >= od/2 {
		t.Errorf("%v faults with the working set prefetched, %v on demand: want fewer than half", pre, od)
	}
}

func lastLine(s string) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	return ls[len(ls)-1]
}

// A Diff snapshot (track_dirty_pages; only the pages dirtied since the Full snapshot are data in
// its sparse memory file) packed over the Full one's packed snapshot (faultline pack --base) and
// restored from it: the guest's pattern verifies and its pass numbers continue the Diff's.
func testDiff(t *testing.T) {
	if env.diffErr != nil {
		t.Fatalf("the Diff snapshot could not be taken: %v", env.diffErr)
	}
	base := filepath.Join(baseDir, "diff-base")
	diff := filepath.Join(baseDir, "diff-packed")
	for _, args := range [][]string{
		{"pack", "--mem-file", env.snapMem, "--out", base},
		{"pack", "--mem-file", env.diffMem, "--base", base, "--out", diff},
	} {
		out, err := exec.Command(env.faultline, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("faultline %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("faultline %s: %s", strings.Join(args[:len(args)-2], " "), lastLine(string(out)))
	}
	var st syscall.Stat_t
	if err := syscall.Stat(env.diffMem, &st); err == nil {
		t.Logf("diff memory file: %d bytes long, %d bytes allocated (sparse)", st.Size, st.Blocks*512)
	}
	d := startServe(t, "--snapshot", diff)
	f, err := startFirecracker(t, d.dir, "vm-diff")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	if err := f.api.LoadSnapshot(ctx, fcapi.SnapshotLoad{SnapshotPath: env.diffState,
		MemBackend: fcapi.MemBackend{BackendType: "Uffd", BackendPath: d.socket}, ResumeVM: true}); err != nil {
		t.Fatalf("snapshot/load of the Diff: %v\n%s\ndaemon:\n%s", err, f.tail(), d.log.String())
	}
	verify(t, f, 0, 3)
	if p := f.console.lastPass(); p <= env.diffPass {
		t.Errorf("pass %d after restoring the Diff, want more than its %d", p, env.diffPass)
	}
	logConsole(t, f, 4)
	endVM(t, d, f)
}
