package snapshot

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

var ctx = context.Background()

// writeImage writes b to a file in t's temp dir and returns its path.
func writeImage(t testing.TB, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func sample(t testing.TB, size int64, seed uint64) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := SampleImage(&b, size, seed); err != nil {
		t.Fatal(err)
	}
	if int64(b.Len()) != size {
		t.Fatalf("SampleImage wrote %d bytes, want %d", b.Len(), size)
	}
	return b.Bytes()
}

func pack(t testing.TB, img []byte, o PackOptions) string {
	t.Helper()
	dir, _ := packStats(t, img, o)
	return dir
}

func packStats(t testing.TB, img []byte, o PackOptions) (string, *PackStats) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "snap")
	st, err := Pack(ctx, writeImage(t, img), dir, o)
	if err != nil {
		t.Fatalf("Pack: %v", err)
	}
	return dir, st
}

// checkUnpack unpacks dir and compares it with img, and reads it back through ReadAt too.
func checkUnpack(t *testing.T, dir string, img []byte) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out")
	if err := Unpack(ctx, dir, out); err != nil {
		t.Fatalf("Unpack: %v", err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatalf("unpacked %d bytes differ from the %d packed", len(got), len(img))
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		if len(img) == 0 {
			break
		}
		off := r.IntN(len(img))
		n := 1 + r.IntN(min(len(img)-off, 3<<20))
		p := make([]byte, n)
		if m, err := s.ReadAt(p, int64(off)); err != nil || m != n {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", n, off, m, err)
		}
		if !bytes.Equal(p, img[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", n, off)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog 12345\n"), 200000)
	rnd := make([]byte, 5<<20+3)
	for i := range rnd {
		rnd[i] = byte(rand.Uint32())
	}
	cases := []struct {
		name string
		img  []byte
		o    PackOptions
	}{
		{"sample-not-chunk-multiple", sample(t, 9<<20+12288, 7), PackOptions{}},
		{"partial-page", sample(t, 3<<20+100, 8), PackOptions{ChunkSize: 1 << 20}},
		{"all-zero", make([]byte, 6<<20), PackOptions{}},
		{"random", rnd, PackOptions{ChunkSize: 512 << 10}},
		{"text", text[:len(text)-77], PackOptions{}},
		{"hugetlb-pages", sample(t, 12<<20, 9), PackOptions{PageSize: 2 << 20}},
		{"partial-frame", sample(t, 5<<20+20480+100, 10), PackOptions{}},
		{"small-frames", sample(t, 3<<20+8192, 11), PackOptions{ChunkSize: 1 << 20, FrameSize: 16 << 10}},
		{"frame-is-chunk", sample(t, 5<<20, 12), PackOptions{FrameSize: 2 << 20}},
		{"empty", nil, PackOptions{}},
		{"one-byte", []byte{9}, PackOptions{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := pack(t, c.img, c.o)
			checkUnpack(t, dir, c.img)
			in, err := Inspect(dir)
			if err != nil {
				t.Fatal(err)
			}
			var zero int64
			ps := int(cmp.Or(c.o.PageSize, 4096))
			for p := 0; p < len(c.img); p += ps {
				if zeroPage(c.img[p:min(p+ps, len(c.img))]) {
					zero++
				}
			}
			if in.ZeroPages != zero || in.Size != int64(len(c.img)) {
				t.Errorf("inspect: %d zero pages of size %d, want %d of %d", in.ZeroPages, in.Size, zero, len(c.img))
			}
			if bad, err := Verify(ctx, dir); err != nil || len(bad) != 0 {
				t.Errorf("Verify: %v %v", bad, err)
			}
		})
	}
}

func TestAllZeroStoresNothing(t *testing.T) {
	dir := pack(t, make([]byte, 8<<20), PackOptions{})
	ents, _ := os.ReadDir(filepath.Join(dir, ChunksDir))
	if len(ents) != 0 {
		t.Errorf("%d chunk files for an all-zero image", len(ents))
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.IsZero(5) || s.ZeroRun(100, 1<<30) != 8<<20-100 {
		t.Errorf("IsZero %v ZeroRun %d", s.IsZero(5), s.ZeroRun(100, 1<<30))
	}
	p := make([]byte, 1<<20)
	if _, err := s.ReadAt(p, 3<<20); err != nil || s.CacheStats().Loads != 0 {
		t.Errorf("ReadAt %v, %d loads (want none: zero pages are not read)", err, s.CacheStats().Loads)
	}
}

// chunkPath returns the path of chunk i's file in dir.
func chunkPath(t *testing.T, dir string, i int) string {
	m, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	c := m.Chunks[i]
	if c.Enc == EncZero {
		t.Fatalf("chunk %d is zero", i)
	}
	return filepath.Join(m.chunkDir(dir), m.chunkFileName(c))
}

func TestCorruption(t *testing.T) {
	img := sample(t, 8<<20, 3)
	// Random pages so that chunk 1 is not all zero whatever the sample does there.
	for i := 2 << 20; i < 2<<20+8192; i++ {
		img[i] = byte(i * 7)
	}
	cases := []struct {
		name   string
		break_ func(t *testing.T, dir string)
		is     error
		want   string // in the error
		atOpen bool
	}{
		{"flipped-byte", func(t *testing.T, dir string) {
			// A byte of chunk 1's first frame, which holds the page at 2 MiB read below.
			m, _ := ReadManifest(dir)
			p := chunkPath(t, dir, 1)
			b, _ := os.ReadFile(p)
			b[headerLen(m.Chunks[1].Frames)+8] ^= 0x40
			os.Chmod(p, 0o644)
			os.WriteFile(p, b, 0o644)
		}, ErrCorrupt, "chunk 1 at offset 0x200000", false},
		{"truncated", func(t *testing.T, dir string) {
			p := chunkPath(t, dir, 1)
			os.Chmod(p, 0o644)
			os.Truncate(p, 100)
		}, ErrCorrupt, "chunk 1 at offset 0x200000", true},
		{"missing", func(t *testing.T, dir string) { os.Remove(chunkPath(t, dir, 1)) }, ErrMissing, "chunk 1 at offset 0x200000", true},
		{"garbage-manifest", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, ManifestName), []byte("{\"format\": garbage"), 0o644)
		}, ErrCorrupt, "manifest", true},
		{"wrong-size", func(t *testing.T, dir string) {
			editManifest(t, dir, func(m *Manifest) { m.Size += 4 << 20 })
		}, ErrCorrupt, "chunks for an image", true},
		{"tampered-zero-map", func(t *testing.T, dir string) {
			b, _ := os.ReadFile(filepath.Join(dir, ManifestName))
			m, _ := DecodeManifest(b)
			m.ZeroMap[512/8] ^= 1    // page 512: chunk 1, not zero
			enc, _ := jsonMarshal(m) // the old checksum stays
			os.WriteFile(filepath.Join(dir, ManifestName), enc, 0o644)
		}, ErrCorrupt, "checksum", true},
		{"wrong-version", func(t *testing.T, dir string) {
			editManifest(t, dir, func(m *Manifest) { m.Version = 3 })
		}, ErrVersion, "version 3", true},
		{"no-manifest", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, ManifestName)) }, ErrNotSnapshot, "manifest.json is missing", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := pack(t, img, PackOptions{})
			c.break_(t, dir)
			s, err := Open(dir)
			if c.atOpen {
				if err == nil {
					s.Close()
					t.Fatal("Open succeeded")
				}
			} else {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				defer s.Close()
				p := make([]byte, 4096)
				n, rerr := s.ReadAt(p, 2<<20)
				if rerr == nil {
					t.Fatalf("ReadAt of the bad chunk returned %d bytes and no error", n)
				}
				if n != 0 {
					t.Errorf("ReadAt returned %d bytes of a bad chunk", n)
				}
				err = rerr
				if err2 := s.ReadChunk(ctx, 1, make([]byte, 2<<20)); !errors.Is(err2, c.is) {
					t.Errorf("ReadChunk: %v", err2)
				}
			}
			if !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q, want %v containing %q", err, c.is, c.want)
			}
			if errors.Is(err, ErrTransient) {
				t.Errorf("error %q is transient", err)
			}
			// Verify names the same bad chunk (or fails as Open does).
			bad, verr := Verify(ctx, dir)
			if verr == nil && (len(bad) != 1 || !strings.Contains(bad[0].Error(), "chunk 1 ")) {
				t.Errorf("Verify: %v", bad)
			}
		})
	}
}

func editManifest(t *testing.T, dir string, f func(*Manifest)) {
	t.Helper()
	m, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	f(m)
	if err := os.WriteFile(filepath.Join(dir, ManifestName), m.Encode(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCrashBeforeManifest(t *testing.T) {
	img := sample(t, 4<<20, 1)
	dir := filepath.Join(t.TempDir(), "snap")
	crash := errors.New("killed")
	_, err := Pack(ctx, writeImage(t, img), dir, PackOptions{beforeManifest: func() error { return crash }})
	if err != crash {
		t.Fatalf("Pack: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, ChunksDir)); len(ents) == 0 {
		t.Fatal("no chunks written before the crash point: the test proves nothing")
	}
	_, err = Open(dir)
	if !errors.Is(err, ErrNotSnapshot) || !strings.Contains(err.Error(), "no manifest") {
		t.Fatalf("Open after a crash: %v", err)
	}
	// Packing again into the same directory finishes the job.
	if _, err := Pack(ctx, writeImage(t, img), dir, PackOptions{}); err != nil {
		t.Fatal(err)
	}
	checkUnpack(t, dir, img)
}

func TestDiff(t *testing.T) {
	const size = 16 << 20
	baseImg := sample(t, size, 11)
	baseDir := pack(t, baseImg, PackOptions{})
	mod := bytes.Clone(baseImg)
	diffPath := filepath.Join(t.TempDir(), "diff")
	f, err := os.Create(diffPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(5, 6))
	dirty := map[int]bool{}
	for range 40 {
		dirty[r.IntN(size/4096/2)] = true // only the first half: the rest is the base's chunks
	}
	dirty[0], dirty[1], dirty[100] = true, true, true
	for p := range dirty {
		page := mod[p*4096 : (p+1)*4096]
		if p == 100 {
			clear(page) // a page that becomes zero
		} else {
			for i := range page {
				page[i] = byte(r.Uint32())
			}
		}
		if _, err := f.WriteAt(page, int64(p)*4096); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	ext, err := dataExtents(mustOpen(t, diffPath), size)
	if err != nil || len(ext) == 0 || ext[len(ext)-1][1] > size/2 {
		t.Fatalf("data extents %v %v: the file system does not report holes?", ext, err)
	}
	out := filepath.Join(t.TempDir(), "diffsnap")
	st, err := Pack(ctx, diffPath, out, PackOptions{Base: baseDir})
	if err != nil {
		t.Fatal(err)
	}
	if st.Reused < 4 {
		t.Errorf("%d chunks reused from the base, want the upper half's", st.Reused)
	}
	// Readable on its own: the base is moved away.
	if err := os.Rename(baseDir, baseDir+".gone"); err != nil {
		t.Fatal(err)
	}
	checkUnpack(t, out, mod)
	os.Rename(baseDir+".gone", baseDir)
	in, err := Inspect(out)
	if err != nil || in.SharedWithBase < 4 {
		t.Errorf("inspect: shared with base %d, %v", in.SharedWithBase, err)
	}
}

func mustOpen(t *testing.T, p string) *os.File {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestSharedStore(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	a := sample(t, 16<<20, 21)
	b := bytes.Clone(a)
	copy(b[8<<20:], sample(t, 8<<20, 22)) // second half differs
	da := pack(t, a, PackOptions{Store: store})
	files := func() int {
		ents, _ := filepath.Glob(filepath.Join(store, ChunksDir, "*.chunk"))
		return len(ents)
	}
	n1 := files()
	db, st := packStats(t, b, PackOptions{Store: store})
	n2 := files()
	ma, _ := ReadManifest(da)
	mb, _ := ReadManifest(db)
	var common int
	for i := range 4 {
		if ma.Chunks[i].Enc != EncZero && ma.Chunks[i].Hash == mb.Chunks[i].Hash {
			common++
		}
	}
	if common == 0 {
		t.Fatal("the first halves share no chunk: the test proves nothing")
	}
	if st.Reused < common {
		t.Errorf("the second pack reused %d chunk files of the store, want %d (it wrote them again)", st.Reused, common)
	}
	distinct := map[string]bool{}
	for _, m := range []*Manifest{ma, mb} {
		for _, c := range m.Chunks {
			if c.Enc != EncZero {
				distinct[c.Hash] = true
			}
		}
	}
	if n2 != len(distinct) || n2-n1 >= 8 {
		t.Errorf("store has %d files after the first, %d after the second; %d distinct chunks", n1, n2, len(distinct))
	}
	if ents, _ := os.ReadDir(filepath.Join(db, ChunksDir)); len(ents) != 0 {
		t.Errorf("a snapshot in a store has %d chunk files of its own", len(ents))
	}
	in, err := Inspect(db)
	if err != nil || in.SharedInStore != common || in.StoreSnapshots != 1 {
		t.Errorf("inspect: %d shared with %d others (%v), want %d with 1", in.SharedInStore, in.StoreSnapshots, err, common)
	}
	checkUnpack(t, da, a)
	checkUnpack(t, db, b)
}

func TestWorkingSet(t *testing.T) {
	img := sample(t, 8<<20, 31)
	dir := pack(t, img, PackOptions{})
	r := rand.New(rand.NewPCG(3, 4))
	var order []uint64
	for range 400 {
		p := uint64(r.IntN(2048 - 3))
		order = append(order, p, p+1, p+2) // runs of 3, repeats are dropped
	}
	if err := WriteWorkingSet(dir, order); err != nil {
		t.Fatal(err)
	}
	want := Intersect(order, order) // the order without repeats, sorted within each window
	for w := 0; w < len(want); w += orderWindow {
		slices.Sort(want[w:min(w+orderWindow, len(want))])
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	w, err := s.OpenWorkingSet()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var got []uint64
	runs := 0
	for {
		run, err := w.Next()
		if err != nil {
			if err.Error() != "EOF" {
				t.Fatal(err)
			}
			break
		}
		runs++
		for k := range run.Count {
			p := run.Page + uint64(k)
			got = append(got, p)
			page := img[p*4096 : (p+1)*4096]
			if run.Zero {
				if !zeroPage(page) {
					t.Fatalf("page %d reported zero", p)
				}
			} else if !bytes.Equal(run.Data[k*4096:(k+1)*4096], page) {
				t.Fatalf("page %d: wrong bytes", p)
			}
		}
	}
	if !slicesEqual(got, want) {
		t.Fatalf("streamed %d pages, want %d in recorded order (by address within a window)", len(got), len(want))
	}
	if runs >= len(want) {
		t.Errorf("%d runs for %d pages: contiguous pages not merged", runs, len(want))
	}
	m := s.Manifest()
	if len(m.WorkingSet.Frames) < 2 {
		t.Errorf("%d frames", len(m.WorkingSet.Frames))
	}
	// A second recording replaces the first and removes its extent.
	old := m.WorkingSet.Extent
	var some []uint64 // ten pages that are not zero: the new extent stores something
	for _, p := range want {
		if len(some) < 10 && !zeroPage(img[p*4096:(p+1)*4096]) {
			some = append(some, p)
		}
	}
	if err := WriteWorkingSet(dir, some); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, old)); !os.IsNotExist(err) {
		t.Errorf("old extent still there: %v", err)
	}
	// A corrupt frame is an error, never bytes.
	m2, _ := ReadManifest(dir)
	p := filepath.Join(dir, m2.WorkingSet.Extent)
	b, _ := os.ReadFile(p)
	b[len(b)/2] ^= 1
	os.WriteFile(p, b, 0o644)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	err = s2.ReadWorkingSet(ctx, func(Run) error { t.Error("a run of a corrupt frame"); return nil })
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "frame 0") {
		t.Errorf("corrupt frame: %v", err)
	}
}

func slicesEqual(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestIntersect(t *testing.T) {
	got := Intersect([]uint64{5, 1, 9, 3, 7, 1}, []uint64{7, 3, 5, 2})
	if !slicesEqual(got, []uint64{5, 3, 7}) {
		t.Errorf("Intersect = %v", got)
	}
}

func TestCacheSingleFlight(t *testing.T) {
	img := sample(t, 8<<20, 41)
	for i := 4 << 20; i < 6<<20; i++ {
		img[i] = byte(i)
	}
	dir := pack(t, img, PackOptions{})
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const n = 32
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make([]error, n)
	for g := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			p := make([]byte, 4096)
			off := int64(4<<20 + g*4096)
			if _, err := s.ReadAt(p, off); err != nil {
				errs[g] = err
			} else if !bytes.Equal(p, img[off:off+4096]) {
				errs[g] = errors.New("wrong bytes")
			}
		}()
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// The reads cover 128 KiB: one load per frame of it, however many goroutines want each.
	frames := int64(n) * 4096 / s.FrameSize()
	if st := s.CacheStats(); st.Loads != frames || st.Hits != int64(n)-frames {
		t.Errorf("%d goroutines on %d frames: %+v, want %d loads", n, frames, st, frames)
	}
}

func TestCacheBound(t *testing.T) {
	img := sample(t, 32<<20, 51)
	for c := 0; c < 16; c++ { // no chunk all zero
		img[c<<21+100] = 1
	}
	dir := pack(t, img, PackOptions{FrameSize: 2 << 20}) // the cache's unit: one chunk
	s, err := OpenWith(dir, Options{CacheSize: 3 << 21})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p := make([]byte, 1<<21)
	for round := range 2 {
		for c := range 16 {
			if _, err := s.ReadAt(p, int64(c)<<21); err != nil || !bytes.Equal(p, img[c<<21:(c+1)<<21]) {
				t.Fatalf("round %d chunk %d: %v or wrong bytes", round, c, err)
			}
			if st := s.CacheStats(); st.Bytes > 3<<21 {
				t.Fatalf("cache holds %d bytes, bound %d", st.Bytes, 3<<21)
			}
		}
	}
	st := s.CacheStats()
	if st.Evictions < 16*2-3 || st.Loads != 32 {
		t.Errorf("%+v: want 32 loads and 29 evictions", st)
	}
	// The most recent chunks are still cached.
	s.ReadAt(p, 15<<21)
	if s.CacheStats().Loads != 32 {
		t.Error("the last chunk read was evicted first")
	}
}

func TestCacheConcurrent(t *testing.T) {
	img := sample(t, 16<<20, 61)
	dir := pack(t, img, PackOptions{ChunkSize: 1 << 20})
	s, err := OpenWith(dir, Options{CacheSize: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 9))
			p := make([]byte, 300<<10)
			for range 200 {
				off := r.IntN(len(img) - len(p))
				if _, err := s.ReadAt(p, int64(off)); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, img[off:off+len(p)]) {
					errs <- errors.New("wrong bytes")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if st := s.CacheStats(); st.Bytes > 2<<20 || st.Evictions == 0 {
		t.Errorf("%+v: want evictions and at most 2 MiB held", st)
	}
}

// A read served from the cache allocates nothing: it is on the fault path.
func TestReadAtCachedAllocs(t *testing.T) {
	img := sample(t, 4<<20, 71)
	img[100] = 1
	dir := pack(t, img, PackOptions{})
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p := make([]byte, 4096)
	if _, err := s.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(100, func() { s.ReadAt(p, 0) }); a != 0 {
		t.Errorf("%v allocations per cached ReadAt", a)
	}
}
