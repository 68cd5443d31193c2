package snapshot

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// Unpack leaves zero pages as holes: an image that is mostly zero unpacks to a file with few
// blocks.
func TestUnpackSparse(t *testing.T) {
	img := make([]byte, 16<<20)
	for i := range 64 << 10 { // 16 non-zero pages at 5 MiB
		img[5<<20+i] = byte(i | 1)
	}
	dir := pack(t, img, PackOptions{})
	out := filepath.Join(t.TempDir(), "out")
	if err := Unpack(ctx, dir, out); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; fi.Size() != 16<<20 || alloc > 1<<20 {
		t.Errorf("unpacked file: size %d, %d bytes allocated (want 16 MiB with about 64 KiB allocated)", fi.Size(), alloc)
	}
	ext, err := dataExtents(mustOpen(t, out), fi.Size())
	if err != nil || len(ext) != 1 || ext[0][0] != 5<<20 {
		t.Errorf("data extents %v, %v; want one at 5 MiB", ext, err)
	}
}
