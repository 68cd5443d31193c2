//go:build linux

package source_test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"github.com/faultline-go/faultline/source"
)

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// requireKernel fails under FAULTLINE_REQUIRE_KERNEL=1 (CI) and skips otherwise.
func requireKernel(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("FAULTLINE_REQUIRE_KERNEL") == "1" {
		t.Fatalf("test cannot run: %s (FAULTLINE_REQUIRE_KERNEL=1)", why)
	}
	t.Skip(why)
}

// pattern returns n bytes that differ from their neighbours and from zero.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+i>>8) | 1
	}
	return b
}

// checkReadAt checks the io.ReaderAt contract of s against want, its whole content.
func checkReadAt(t *testing.T, s source.Source, want []byte) {
	t.Helper()
	size := int64(len(want))
	if s.Size() != size {
		t.Fatalf("Size = %d, want %d", s.Size(), size)
	}
	for _, tc := range []struct{ off, n int64 }{
		{0, size}, {0, 1}, {1, 4096}, {size - 1, 1}, {size / 2, size / 4}, {4095, 2},
	} {
		p := bytes.Repeat([]byte{0xEE}, int(tc.n))
		n, err := s.ReadAt(p, tc.off)
		if err != nil || n != int(tc.n) {
			t.Errorf("ReadAt(%d bytes at %d) = %d, %v", tc.n, tc.off, n, err)
			continue
		}
		if !bytes.Equal(p, want[tc.off:tc.off+tc.n]) {
			t.Errorf("ReadAt(%d bytes at %d): wrong bytes", tc.n, tc.off)
		}
	}
	// Past the end: short, with io.EOF; the bytes that exist are filled.
	p := bytes.Repeat([]byte{0xEE}, 100)
	n, err := s.ReadAt(p, size-10)
	if n != 10 || err != io.EOF {
		t.Errorf("ReadAt across the end = %d, %v; want 10, io.EOF", n, err)
	}
	if !bytes.Equal(p[:10], want[size-10:]) {
		t.Errorf("ReadAt across the end: wrong bytes")
	}
	if n, err := s.ReadAt(p, size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end = %d, %v; want 0, io.EOF", n, err)
	}
	if n, err := s.ReadAt(p, size+4096); n != 0 || err == nil {
		t.Errorf("ReadAt beyond the end = %d, %v; want 0 and an error", n, err)
	}
	if n, err := s.ReadAt(p, -1); n != 0 || err == nil {
		t.Errorf("ReadAt at -1 = %d, %v; want 0 and an error", n, err)
	}
	if n, err := s.ReadAt(nil, 0); n != 0 || err != nil {
		t.Errorf("ReadAt of nothing = %d, %v; want 0, nil", n, err)
	}
}

func TestMemory(t *testing.T) {
	b := pattern(3*4096 + 100)
	want := append([]byte(nil), b...)
	m := source.NewMemory(b)
	checkReadAt(t, m, want)

	var _ source.Resident = m
	if _, ok := source.Source(m).(source.Zeros); ok {
		t.Error("Memory claims to know its zeros")
	}
	// Bytes aliases the image: same memory, no copy.
	got := m.Bytes(4096, 100)
	if len(got) != 100 || &got[0] != &b[4096] {
		t.Fatalf("Bytes(4096, 100) does not alias the image (len %d)", len(got))
	}
	b[4096] = 0
	if got[0] != 0 {
		t.Error("a change to the image is not seen through Bytes")
	}
	if got := m.Bytes(int64(len(b)), 0); len(got) != 0 {
		t.Errorf("Bytes at the end = %d bytes", len(got))
	}
	if err := m.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func TestZero(t *testing.T) {
	const size = 5*4096 + 12
	z := source.NewZero(size)
	checkReadAt(t, z, make([]byte, size))
	var zs source.Zeros = z
	if _, ok := source.Source(z).(source.Resident); ok {
		t.Error("Zero claims to be resident")
	}
	for _, tc := range []struct{ off, n, want int64 }{
		{0, size, size},
		{0, 4096, 4096},
		{4096, 1 << 30, size - 4096}, // bounded by the image
		{size - 1, 10, 1},
		{size, 10, 0},
		{size + 4096, 10, 0}, // beyond the image: nothing known, never negative
		{-4096, 10, 0},       // before it
		{100, 0, 0},
	} {
		if got := zs.ZeroRun(tc.off, tc.n); got != tc.want {
			t.Errorf("ZeroRun(%d, %d) = %d, want %d", tc.off, tc.n, got, tc.want)
		}
	}
	if err := z.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// writeSparse makes a file of size bytes with data at the given runs and holes elsewhere, and
// returns its path and content.
func writeSparse(t *testing.T, size int64, runs [][2]int64) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "image")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for _, r := range runs {
		p := pattern(int(r[1]))
		copy(want[r[0]:], p)
		if _, err := f.WriteAt(p, r[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return path, want
}

func TestFile(t *testing.T) {
	want := pattern(64<<10 + 100)
	path := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := source.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	checkReadAt(t, s, want)
	var _ source.Resident = s
	var _ source.Zeros = s
	if !bytes.Equal(s.Bytes(0, int64(len(want))), want) {
		t.Error("Bytes differs from the file")
	}
	if got := s.ZeroRun(0, 4096); got != 0 {
		t.Errorf("ZeroRun in data = %d, want 0", got)
	}
	// Bytes is the shared mapping of the file: a write to the file shows through it.
	b := s.Bytes(8192, 16)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("changed"), 8192); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if string(b[:7]) != "changed" {
		t.Errorf("Bytes after a write to the file = %q, want it to show the write", b[:7])
	}
	if uintptr(unsafe.Pointer(&b[0]))-uintptr(unsafe.Pointer(&s.Bytes(0, 1)[0])) != 8192 {
		t.Error("Bytes slices are not views of one mapping")
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func TestFileHoles(t *testing.T) {
	const kb = 1024
	const size = 1024 * kb
	// Data at [0, 8K), [64K, 68K), [512K, 520K) and the last 4K; holes elsewhere.
	runs := [][2]int64{{0, 8 * kb}, {64 * kb, 4 * kb}, {512 * kb, 8 * kb}, {size - 4*kb, 4 * kb}}
	path, want := writeSparse(t, size, runs)
	s, err := source.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.ZeroRun(8*kb, 4*kb) == 0 {
		requireKernel(t, "the filesystem of the temporary directory reports no holes (no SEEK_HOLE)")
	}
	checkReadAt(t, s, want)
	if !bytes.Equal(s.Bytes(0, size), want) {
		t.Error("Bytes of a sparse file differs from its content (holes must read zero)")
	}
	for _, tc := range []struct{ off, n, want int64 }{
		{0, 4 * kb, 0},                         // data
		{8 * kb, 4 * kb, 4 * kb},               // hole, bounded by n
		{8 * kb, size, 56 * kb},                // hole, bounded by the next data
		{12 * kb, 1 << 30, 52 * kb},            // from inside a hole
		{64 * kb, 4 * kb, 0},                   // data after a hole
		{68 * kb, size, 444 * kb},              // [68K, 512K)
		{520 * kb, size, size - 4*kb - 520*kb}, // up to the last data
		{size - 4*kb, 4 * kb, 0},               // the last data
		{size, 4 * kb, 0},                      // at the end
		{size + 4*kb, 4 * kb, 0},               // beyond it
	} {
		if got := s.ZeroRun(tc.off, tc.n); got != tc.want {
			t.Errorf("ZeroRun(%d, %d) = %d, want %d", tc.off, tc.n, got, tc.want)
		}
	}
	// Every hole is reported, and only holes: ZeroRun's runs are all zero in the content.
	for off := int64(0); off < size; off += 4 * kb {
		z := s.ZeroRun(off, size-off)
		if !allZero(want[off : off+z]) {
			t.Fatalf("ZeroRun(%d) = %d covers data", off, z)
		}
		if z == 0 && allZero(want[off:off+4*kb]) {
			t.Fatalf("page at %d is a hole but ZeroRun says 0", off)
		}
	}
}

// A file that ends in a hole: the last hole runs to the end of the file.
func TestFileTrailingHole(t *testing.T) {
	path, _ := writeSparse(t, 256<<10, [][2]int64{{0, 4096}})
	s, err := source.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.ZeroRun(4096, 4096) == 0 {
		requireKernel(t, "the filesystem of the temporary directory reports no holes (no SEEK_HOLE)")
	}
	if got := s.ZeroRun(4096, 1<<30); got != 256<<10-4096 {
		t.Errorf("ZeroRun of the trailing hole = %d, want %d", got, 256<<10-4096)
	}
}

func TestOpenFileErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	for _, tc := range []struct {
		name, path, want string
		is               error
	}{
		{"dir", dir, "not a regular file", nil},
		{"empty", empty, "empty", nil},
		{"missing", missing, "missing", fs.ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := source.OpenFile(tc.path)
			if err == nil {
				s.Close()
				t.Fatalf("OpenFile(%s) succeeded", tc.path)
			}
			if s != nil {
				t.Errorf("OpenFile returned a source with its error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "source: ") {
				t.Errorf("error %q lacks the package prefix", err)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v is not %v", err, tc.is)
			}
		})
	}
}
