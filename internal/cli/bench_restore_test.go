//go:build linux

package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/internal/bench"
)

// faultline bench restore at 16 MiB, the page cache left alone: the table has every case, every
// touched page right, and the three targets' ratios (whatever they measure at this size).
func TestBenchRestore(t *testing.T) {
	var out, errs bytes.Buffer
	if c := Run([]string{"bench", "restore", "--size", "16M", "--reps", "1", "--no-drop-caches", "--rtt", "", "--dir", t.TempDir()}, &out, &errs); c != 0 {
		t.Fatalf("exit %d: %s", c, errs.String())
	}
	s := out.String()
	for _, want := range []string{"file-backend-cold", "file-backend-warm", "faultline-raw-cold", "faultline-packed-cold",
		"faultline-prefetch-cold", "faultline-prefetch-warm", "faultline-prefetch-hot", "prefetch-same-trace-cold", "read_ahead_kb", "prefetch vs on-demand packed", "floor under", "P50-us"} {
		if !strings.Contains(s, want) {
			t.Errorf("no %q in:\n%s", want, s)
		}
	}
	if n, want := strings.Count(s, ", 0 wrong"), len(bench.RestoreCases)+1; n != want {
		t.Errorf("%d rows with every page right, want %d (the recording and every case):\n%s", n, want, s)
	}
	if c := Run([]string{"bench", "restore", "--size", "5K"}, &out, &errs); c != 2 {
		t.Errorf("--size 5K: exit %d, want 2", c)
	}
}
