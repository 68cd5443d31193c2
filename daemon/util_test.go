package daemon_test

import (
	"fmt"
	"testing"
	"time"
)

var fmtSprintf = fmt.Sprintf

// waitUntil polls cond (real state: counters, logs, files) for up to 10 s.
func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
