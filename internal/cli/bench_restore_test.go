//go:build linux

package cli

import (
	"bytes"
	"strings"
	"testing"
)

// faultline bench restore at 16 MiB, the page cache left alone: the table has every case, every
// touched page right, and the three targets' ratios (whatever they measure at this size).
func TestBenchRestore(t *testing.T) {
	var out, errs bytes.Buffer
	if c := Run([]string{"bench", "restore", "--size", "16M", "--reps", "1", "--no-drop-caches", "--dir", t.TempDir()}, &out, &errs); c != 0 {
		t.Fatalf("exit %d: %s", c, errs.String())
	}
	s := out.String()
	for _, want := range []string{"file-backend-cold", "file-backend-warm", "faultline-raw-cold", "faultline-packed-cold",
		"faultline-prefetch-cold", "faultline-prefetch-warm", "prefetch-same-trace-cold", "read_ahead_kb", "prefetch vs on-demand packed"} {
		if !strings.Contains(s, want) {
			t.Errorf("no %q in:\n%s", want, s)
		}
	}
	if n := strings.Count(s, ", 0 wrong"); n != 8 {
		t.Errorf("%d rows with every page right, want 8 (the recording and 7 cases):\n%s", n, s)
	}
	if c := Run([]string{"bench", "restore", "--size", "5K"}, &out, &errs); c != 2 {
		t.Errorf("--size 5K: exit %d, want 2", c)
	}
}
