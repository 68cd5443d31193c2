package kerneltest

import (
	"testing"
	"time"
)

// WaitUntil polls cond — real state: counters, logs, files — every 5 ms for up to 10 s, and
// fails the test naming what it waited for if cond never holds. A liveness bound, not a timing
// assertion: on a slow machine a state that comes late still comes within it.
func WaitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
