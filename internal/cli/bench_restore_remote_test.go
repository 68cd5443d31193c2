//go:build linux

package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/internal/bench"
	"github.com/faultline-go/faultline/internal/s3test"
)

// faultline bench restore --rtt at 16 MiB: the remote table has every case at the RTT, every
// VM's pages right, and the targets' lines.
func TestBenchRestoreRemote(t *testing.T) {
	if _, err := s3test.Binary(); err != nil {
		s3test.Require(t, err.Error())
	}
	var out, errs bytes.Buffer
	if c := Run([]string{"bench", "restore", "--size", "16M", "--reps", "1", "--no-drop-caches", "--rtt", "1ms", "--dir", t.TempDir()}, &out, &errs); c != 0 {
		t.Fatalf("exit %d: %s", c, errs.String())
	}
	s := out.String()
	for _, want := range []string{"local  local-on-demand", "1ms    remote-prefetch", "1ms    remote-second-vm", "1ms    remote-on-demand",
		"1ms    remote-fetch", "(no VM: chunks read and kept)"} {
		if !strings.Contains(s, want) {
			t.Errorf("no %q in:\n%s", want, s)
		}
	}
	// The recording run and the local cases, then local-on-demand and three remote VMs.
	if n, want := strings.Count(s, ", 0 wrong"), 1+len(bench.RestoreCases)+1+3; n != want {
		t.Errorf("%d rows with every page right, want %d:\n%s", n, want, s)
	}
	if c := Run([]string{"bench", "restore", "--rtt", "5"}, &out, &errs); c != 2 {
		t.Errorf("--rtt 5: exit %d, want 2", c)
	}
}
