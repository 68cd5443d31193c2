//go:build linux

// Package kerneltest holds what every kernel-facing test of the project shares: the rule that a
// test that cannot run here fails in CI instead of skipping, huge page reservation, and waiting
// for a state to come (WaitUntil).
package kerneltest

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/internal/memory"
)

// EnvRequire, set to 1 (as .ci/run does), turns Require's skips into failures.
const EnvRequire = "FAULTLINE_REQUIRE_KERNEL"

// Require ends a test that cannot run on this machine: a failure under
// FAULTLINE_REQUIRE_KERNEL=1 (CI must never skip a kernel test silently), a skip otherwise.
func Require(t testing.TB, why string) {
	t.Helper()
	if os.Getenv(EnvRequire) == "1" {
		t.Fatalf("kernel test cannot run: %s (%s=1)", why, EnvRequire)
	}
	t.Skip(why)
}

// HugePages makes sure the default hugetlb pool has n free pages for the test, raising
// nr_hugepages if need be and restoring it afterwards. It holds the machine-wide huge page lock
// for the rest of the test: huge page users are serialized across the test processes of all
// packages.
func HugePages(t testing.TB, n int) {
	t.Helper()
	unlock, err := memory.LockHugePages()
	if err != nil {
		Require(t, err.Error())
	}
	t.Cleanup(unlock)
	h, err := memory.ReadHugePages()
	if err != nil {
		Require(t, "no hugetlb support: "+err.Error())
	}
	if h.Free >= n {
		return
	}
	const path = "/proc/sys/vm/nr_hugepages"
	old, err := os.ReadFile(path)
	if err != nil {
		Require(t, "cannot read "+path+": "+err.Error())
	}
	if err := os.WriteFile(path, []byte(strconv.Itoa(h.Total+n-h.Free)), 0); err != nil {
		Require(t, "cannot reserve hugepages (need root): "+err.Error())
	}
	t.Cleanup(func() { os.WriteFile(path, []byte(strings.TrimSpace(string(old))), 0) })
	if h, _ = memory.ReadHugePages(); h.Free < n {
		Require(t, "could not reserve "+strconv.Itoa(n)+" free hugepages (memory fragmented?)")
	}
}

// OpenFDs maps this process's open fds to what they point to (readlink of /proc/self/fd/N),
// for tests that check nothing leaks. Compare sets, not counts: an fd of an earlier test (a
// puppet's control socket) may close meanwhile and hide a leaked one from a count.
func OpenFDs(t testing.TB) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range ents {
		if link, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			m[e.Name()] = link // the fd ReadDir itself used is gone by now
		}
	}
	return m
}
