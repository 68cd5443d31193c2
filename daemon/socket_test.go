//go:build linux

package daemon

import (
	"path/filepath"
	"sync"
	"testing"
)

// A daemon removing its socket file as a successor renames its own into place never removes
// the successor's: the check and the unlink hold the path's lock. Without it, some of these
// rounds end with no socket at the path (the race the restore benchmark hit back to back).
func TestRemoveRacingSuccessor(t *testing.T) {
	path := filepath.Join(t.TempDir(), "uffd.sock")
	for round := range 300 {
		a, err := Listen(path, 0)
		if err != nil {
			t.Fatal(err)
		}
		a.Close() // stopped listening; its file stays until Remove
		var b *Listener
		var berr error
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); b, berr = Listen(path, 0) }()
		go func() { defer wg.Done(); a.Remove() }()
		wg.Wait()
		if berr != nil {
			t.Fatalf("round %d: the successor's Listen: %v", round, berr)
		}
		id, err := statID(path)
		if err != nil || id != b.id {
			t.Fatalf("round %d: the path names %v (%v), want the successor's socket %v", round, id, err, b.id)
		}
		b.Close()
		b.Remove()
	}
}
