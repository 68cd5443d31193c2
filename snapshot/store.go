package snapshot

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
)

// StoreSnapshotsDir is the directory, in a shared store, with one file per snapshot packed into
// it; each holds the snapshot directory's absolute path. Inspect uses it to count the chunks
// snapshots share.
const StoreSnapshotsDir = "snapshots"

func registerInStore(store, dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	d := filepath.Join(store, StoreSnapshotsDir)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	sum := sha256.Sum256([]byte(abs))
	return writeFileAtomic(d, hex.EncodeToString(sum[:8]), []byte(abs+"\n"), 0o644)
}

// storeSnapshots lists the snapshot directories registered in store that still hold a
// snapshot using it.
func storeSnapshots(store string) []string {
	ents, _ := os.ReadDir(filepath.Join(store, StoreSnapshotsDir))
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(store, StoreSnapshotsDir, e.Name()))
		if err != nil {
			continue
		}
		dir := strings.TrimSpace(string(b))
		if m, err := ReadManifest(dir); err == nil && m.Store == store {
			out = append(out, dir)
		}
	}
	return out
}
