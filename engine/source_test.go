//go:build linux

package engine_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// writeFile writes a snapshot file of size bytes: the pattern of seed at each of runs (offset,
// length), holes everywhere else. The file is synced so its holes are settled on disk.
func writeFile(t testing.TB, size int64, seed uint64, runs [][2]int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "snapshot")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, r := range runs {
		b := make([]byte, r[1])
		puppet.Fill(b, seed, int(r[0]))
		if _, err := f.WriteAt(b, r[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return path
}

func openFile(t testing.TB, path string) *source.File {
	t.Helper()
	s, err := source.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// touchRange touches [off, off+n) of v in 4 KiB steps (any memory kind), checking each step
// against verify ("pattern" of seed, or "zero").
func touchRange(t testing.TB, v *vm, off, n int, verify string, seed uint64) {
	t.Helper()
	rep, _, err := v.start(puppet.Request{Op: "touch", Off: off, Len: n, Stride: 4096, Verify: verify, Seed: seed}).Wait(30 * time.Second)
	if err != nil {
		t.Fatalf("touch [%d, %d): %v", off, off+n, err)
	}
	if rep.Mismatch != 0 {
		t.Fatalf("touch [%d, %d) %s: %d steps wrong, first bad byte at %d", off, off+n, verify, rep.Mismatch, rep.FirstBad)
	}
}

// A snapshot file served through the page cache: every byte right, at the region's offset into
// the file, on 4 KiB and huge pages.
func TestFileSource(t *testing.T) {
	for _, k := range []memory.Kind{memory.Anon, memory.Hugetlb} {
		t.Run(k.String(), func(t *testing.T) {
			v := newVM(t, k, 8<<20, 0, uffd.ModeMissing)
			// The region starts 2 MiB into the file; the file's first 2 MiB hold another pattern.
			const skip = 2 << 20
			path := filepath.Join(t.TempDir(), "snapshot")
			b := make([]byte, skip+v.size)
			puppet.Fill(b[:skip], 99, 0)
			puppet.Fill(b[skip:], 7, 0)
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			src := openFile(t, path)
			r := v.region(src)
			r.Offset = skip
			e, stop := serve(t, v, []engine.Region{r}, engine.Options{FaultAround: engine.FaultAround{Min: 1, Max: 8, Adaptive: true}})
			rep, _, err := v.start(puppet.Request{Op: "touch", Threads: 2, Order: "rand", Seed: 7, Verify: "pattern"}).Wait(30 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Mismatch != 0 {
				t.Fatalf("%d pages wrong, first bad byte %d", rep.Mismatch, rep.FirstBad)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			st := e.Stats()[0]
			if st.Bytes != uint64(v.size) || st.PagesZero != 0 {
				t.Errorf("copied %d bytes and %d zero pages, want %d and 0 (%+v)", st.Bytes, st.PagesZero, v.size, st)
			}
		})
	}
}

// A sparse snapshot: holes are installed as zero pages without reading them, data pages carry
// the file's bytes, and a huge page that is only partly a hole is copied whole.
func TestSparseFileSource(t *testing.T) {
	const mb = 1 << 20
	// Eight 2 MiB chunks: 0 data, 1 hole, 2 partly data, 3-5 hole, 6 data, 7 hole but its last
	// 4 KiB.
	data := [][2]int64{
		{0, 2 * mb},
		{4 * mb, 64 << 10}, {5 * mb, 4096},
		{12 * mb, 2 * mb},
		{16*mb - 4096, 4096},
	}
	const size = 16 * mb
	dataBytes := int64(0)
	for _, r := range data {
		dataBytes += r[1]
	}
	path := writeFile(t, size, 21, data)
	src := openFile(t, path)
	if src.ZeroRun(2*mb, 2*mb) != 2*mb {
		requireKernel(t, "the temporary directory's filesystem reports no holes (SEEK_HOLE)")
	}
	for _, k := range []memory.Kind{memory.Anon, memory.Hugetlb} {
		t.Run(k.String(), func(t *testing.T) {
			v := newVM(t, k, size, 0, uffd.ModeMissing)
			e, stop := serve(t, v, []engine.Region{v.region(src)}, engine.Options{})
			// Walk the file in data and hole runs, checking each against what it should hold.
			off := int64(0)
			for _, r := range data {
				if off < r[0] {
					touchRange(t, v, int(off), int(r[0]-off), "zero", 0)
				}
				touchRange(t, v, int(r[0]), int(r[1]), "pattern", 21)
				off = r[0] + r[1]
			}
			if off < size {
				touchRange(t, v, int(off), int(size-off), "zero", 0)
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			st := e.Stats()[0]
			t.Logf("zero pages %d, bytes copied %d", st.PagesZero, st.Bytes)
			if st.PagesZero == 0 {
				t.Fatal("no page of the holes was installed as a zero page")
			}
			var wantZero, wantBytes uint64
			if k.Huge() {
				wantZero, wantBytes = 4, 4*2*mb // chunks 1, 3, 4, 5 are holes; 0, 2, 6, 7 are copied
			} else {
				wantZero, wantBytes = uint64(size-dataBytes)/4096, uint64(dataBytes)
			}
			if st.PagesZero != wantZero || st.Bytes != wantBytes {
				t.Errorf("%d zero pages and %d bytes copied, want %d and %d", st.PagesZero, st.Bytes, wantZero, wantBytes)
			}
			// The causes partition the pages installed: each page once, under one cause
			// (before, a zero page counted as a faulted or fault-around page as well).
			if sum, all := st.PagesFault+st.PagesAround+st.PagesZero+st.PagesPrefetched, uint64(size/v.pageSize); sum != all {
				t.Errorf("pages by cause: %d faulted + %d around + %d zero + %d prefetched = %d, want the %d installed",
					st.PagesFault, st.PagesAround, st.PagesZero, st.PagesPrefetched, sum, all)
			}
		})
	}
}

// An all-zero source is installed with zero pages only — on anonymous memory, all of them the
// one shared zero page — and never copied.
func TestZeroSource(t *testing.T) {
	for _, k := range []memory.Kind{memory.Anon, memory.Hugetlb} {
		t.Run(k.String(), func(t *testing.T) {
			v := newVM(t, k, 8<<20, 0, uffd.ModeMissing)
			e, stop := serve(t, v, []engine.Region{v.region(source.NewZero(int64(v.size)))}, engine.Options{FaultAround: engine.FaultAround{Max: 8}})
			touchRange(t, v, 0, v.size, "zero", 0)
			pages := v.size / v.pageSize
			if !k.Huge() {
				pm := v.do(puppet.Request{Op: "pagemap", Len: v.size}).Pagemap
				const present, pfnMask = 1 << 63, 1<<55 - 1
				for i, ent := range pm {
					if ent&present == 0 {
						t.Fatalf("page %d not present after the touch", i)
					}
					if ent&pfnMask != pm[0]&pfnMask {
						t.Fatalf("page %d maps pfn %#x, page 0 pfn %#x: not the shared zero page", i, ent&pfnMask, pm[0]&pfnMask)
					}
				}
			}
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			st := e.Stats()[0]
			if st.PagesZero != uint64(pages) || st.Bytes != 0 || int(st.Pages()) != pages {
				t.Errorf("zero pages %d, bytes %d, installed %d; want %d, 0, %d", st.PagesZero, st.Bytes, st.Pages(), pages, pages)
			}
			if !k.Huge() && st.Missing >= uint64(pages) {
				t.Errorf("fault-around installed no zero pages ahead of the faults: %d faults for %d pages (%+v)", st.Missing, pages, st)
			}
		})
	}
}

// New rejects regions it could not serve, with a message naming the region and the problem,
// before it touches the fd.
func TestNewValidation(t *testing.T) {
	const ps = 4096
	src := source.NewZero(16 * ps)
	base := uintptr(0x40000000)
	ok := engine.Region{Name: "a", Base: base, Size: 4 * ps, PageSize: ps, Source: src}
	with := func(f func(r *engine.Region)) engine.Region { r := ok; f(&r); return r }
	for _, tc := range []struct {
		name    string
		regions []engine.Region
		want    []string
	}{
		{"overlap", []engine.Region{
			with(func(r *engine.Region) { r.Name = "low" }),
			with(func(r *engine.Region) { r.Name = "high"; r.Base += 3 * ps }),
		}, []string{`"low"`, `"high"`, "overlap"}},
		{"overlap-unsorted", []engine.Region{
			with(func(r *engine.Region) { r.Name = "high"; r.Base += 2 * ps; r.Offset = 4 * ps }),
			with(func(r *engine.Region) { r.Name = "low" }),
			with(func(r *engine.Region) { r.Name = "far"; r.Base += 100 * ps }),
		}, []string{`"low"`, `"high"`, "overlap"}},
		{"size-not-page-multiple", []engine.Region{with(func(r *engine.Region) { r.Size = 4*ps + 100 })}, []string{`"a"`, "size 16484", "page size 4096"}},
		{"size-zero", []engine.Region{with(func(r *engine.Region) { r.Size = 0 })}, []string{`"a"`, "size 0"}},
		{"beyond-source", []engine.Region{with(func(r *engine.Region) { r.Offset = 14 * ps })}, []string{`"a"`, "outside the source", "65536"}},
		{"larger-than-source", []engine.Region{with(func(r *engine.Region) { r.Size = 32 * ps })}, []string{`"a"`, "outside the source"}},
		{"negative-offset", []engine.Region{with(func(r *engine.Region) { r.Offset = -ps })}, []string{`"a"`, "outside the source"}},
		{"page-size-zero", []engine.Region{with(func(r *engine.Region) { r.PageSize = 0 })}, []string{`"a"`, "page size 0"}},
		{"page-size-not-power-of-two", []engine.Region{with(func(r *engine.Region) { r.PageSize = 3 * ps })}, []string{`"a"`, "power of two"}},
		{"base-unaligned", []engine.Region{with(func(r *engine.Region) { r.Base += 100 })}, []string{`"a"`, "aligned"}},
		{"huge-base-unaligned", []engine.Region{with(func(r *engine.Region) {
			r.PageSize = 2 << 20
			r.Size = 2 << 20
			r.Source = source.NewZero(2 << 20)
			r.Base += ps
		})}, []string{`"a"`, "aligned"}},
		{"no-source", []engine.Region{with(func(r *engine.Region) { r.Source = nil })}, []string{`"a"`, "no source"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := inProcessFD(t)
			e, err := engine.New(f, tc.regions, engine.Options{})
			if err == nil {
				t.Fatalf("New accepted %+v", tc.regions)
			}
			if e != nil {
				t.Errorf("New returned an engine with its error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	t.Run("valid", func(t *testing.T) {
		f := inProcessFD(t)
		regions := []engine.Region{
			with(func(r *engine.Region) { r.Name = "high"; r.Base += 4 * ps; r.Offset = 12 * ps }),
			ok,
		}
		e, err := engine.New(f, regions, engine.Options{})
		if err != nil {
			t.Fatalf("New rejected adjacent regions: %v", err)
		}
		// Stats come in the order the regions were given.
		if st := e.Stats(); len(st) != 2 || st[0].Region != "high" || st[1].Region != "a" {
			t.Errorf("Stats regions %+v", st)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := e.Run(ctx); err != nil {
			t.Errorf("Run with a cancelled context: %v", err)
		}
	})
}

// inProcessFD is a userfaultfd of this process with nothing registered: enough for New, which
// must not need the memory.
func inProcessFD(t testing.TB) *uffd.FD {
	t.Helper()
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		requireKernel(t, "no userfaultfd: "+err.Error())
	}
	if _, err := f.API(0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}
