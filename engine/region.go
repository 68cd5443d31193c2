package engine

import (
	"fmt"
	"sort"
	"time"

	"github.com/faultline-go/faultline/source"
)

// Region maps [Base, Base+Size) of the faulting process to [Offset, Offset+Size) of Source.
type Region struct {
	Name     string
	Base     uintptr
	Size     uintptr
	PageSize uintptr // 4 KiB, or the huge page size of hugetlb memory
	Offset   int64
	Source   source.Source
}

// pageState is the shared state of one registered region: it survives REMAP (which moves the
// addresses) and is copied for FORK children.
type pageState struct {
	spec      Region
	pages     int
	installed *bitmap // a page is mapped (by us, or the kernel said EEXIST)
	removed   *bitmap // REMOVE'd since: serve zeros, never source data
	dirty     *bitmap // written (WP fault seen)
	fetching  *bitmap // a slow-source read is in flight
	touched   *bitmap // faulted at least once while recording (nil unless recording)
	resident  source.Resident
	zeros     source.Zeros
	cached    source.Cached        // some ranges resident (nil if none, or if resident)
	ctxReader source.ContextReader // cancellable reads (nil: ReadAt)
	extent    int                  // pages of the source's natural unit of reading (0: none)
	stats     counters
	fa        faultAround
	rec       *recording // first touches, while recording (nil otherwise)
}

func newPageState(r Region, fa FaultAround) *pageState {
	n := int(r.Size / r.PageSize)
	ps := &pageState{
		spec: r, pages: n,
		installed: newBitmap(n), removed: newBitmap(n), dirty: newBitmap(n), fetching: newBitmap(n),
	}
	ps.resident, _ = r.Source.(source.Resident)
	ps.zeros, _ = r.Source.(source.Zeros)
	if ps.resident == nil {
		ps.cached, _ = r.Source.(source.Cached)
	}
	ps.ctxReader, _ = r.Source.(source.ContextReader)
	if x, ok := r.Source.(source.Extent); ok && x.Extent() > 0 {
		ps.extent = max(int(x.Extent()/int64(r.PageSize)), 1)
	}
	ps.fa.init(fa, r.PageSize)
	return ps
}

// clone copies the page state for a forked child: same source, same installed and removed
// pages (the child inherited them), fresh counters.
func (p *pageState) clone(fa FaultAround) *pageState {
	c := newPageState(p.spec, fa)
	c.installed.copyFrom(p.installed)
	c.removed.copyFrom(p.removed)
	c.dirty.copyFrom(p.dirty)
	return c
}

// span is an address range of the faulting process mapped to pages [first, first+n) of a
// pageState. A region starts as one span; REMAP and UNMAP split it.
type span struct {
	base  uintptr
	first int
	n     int
	st    *pageState
}

func (s *span) end() uintptr { return s.base + uintptr(s.n)*s.st.spec.PageSize }

// table is an immutable sorted list of spans; the engine swaps in a new one on REMAP/UNMAP.
type table []span

func (t table) sort() {
	sort.Slice(t, func(i, j int) bool { return t[i].base < t[j].base })
}

func (t table) lookup(addr uintptr) *span {
	i := sort.Search(len(t), func(i int) bool { return t[i].end() > addr })
	if i < len(t) && t[i].base <= addr {
		return &t[i]
	}
	return nil
}

// without returns t minus the addresses [start, end), splitting spans at page granularity.
func (t table) without(start, end uintptr) table {
	var out table
	for _, s := range t {
		ps := s.st.spec.PageSize
		if s.end() <= start || s.base >= end {
			out = append(out, s)
			continue
		}
		if s.base < start {
			k := int((start - s.base + ps - 1) / ps)
			out = append(out, span{base: s.base, first: s.first, n: k, st: s.st})
		}
		if s.end() > end {
			k := int((end - s.base + ps - 1) / ps)
			if k < s.n {
				out = append(out, span{base: s.base + uintptr(k)*ps, first: s.first + k, n: s.n - k, st: s.st})
			}
		}
	}
	return out
}

// moved returns t with [from, from+n) moved to [to, to+n) (mremap). Whatever was mapped at the
// destination is gone (mremap with MREMAP_FIXED unmaps it first), so its spans are dropped.
func (t table) moved(from, to, n uintptr) table {
	out := t.without(from, from+n).without(to, to+n)
	for _, s := range t {
		ps := s.st.spec.PageSize
		lo, hi := max(s.base, from), min(s.end(), from+n)
		if lo >= hi {
			continue
		}
		k := int((lo - s.base) / ps)
		out = append(out, span{base: to + (lo - from), first: s.first + k, n: int((hi - lo + ps - 1) / ps), st: s.st})
	}
	out.sort()
	return out
}

// each calls fn for every run of pages [idx, idx+n) of st that is mapped now, with the address
// of its first page: after a REMAP a run can be elsewhere, or split, or partly unmapped.
func (t table) each(st *pageState, idx, n int, fn func(addr uintptr, idx, n int)) {
	for _, s := range t {
		if s.st != st {
			continue
		}
		lo, hi := max(idx, s.first), min(idx+n, s.first+s.n)
		if lo < hi {
			fn(s.base+uintptr(lo-s.first)*st.spec.PageSize, lo, hi-lo)
		}
	}
}

func validate(rs []Region) error {
	sorted := append([]Region(nil), rs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Base < sorted[j].Base })
	for i, r := range sorted {
		switch {
		case r.PageSize == 0 || r.PageSize&(r.PageSize-1) != 0:
			return fmt.Errorf("engine: region %q: page size %d is not a power of two", r.Name, r.PageSize)
		case r.Size == 0 || r.Size%r.PageSize != 0:
			return fmt.Errorf("engine: region %q: size %d is not a positive multiple of the page size %d", r.Name, r.Size, r.PageSize)
		case r.Base%r.PageSize != 0:
			return fmt.Errorf("engine: region %q: base %#x not aligned to the page size", r.Name, r.Base)
		case r.Source == nil:
			return fmt.Errorf("engine: region %q: no source", r.Name)
		case r.Offset < 0 || r.Offset+int64(r.Size) > r.Source.Size():
			return fmt.Errorf("engine: region %q: [%d, %d) outside the source's %d bytes", r.Name, r.Offset, r.Offset+int64(r.Size), r.Source.Size())
		case i > 0 && sorted[i-1].Base+sorted[i-1].Size > r.Base:
			return fmt.Errorf("engine: regions %q and %q overlap", sorted[i-1].Name, r.Name)
		}
	}
	return nil
}

// recordInstall marks pages [idx, idx+n) installed for one fault read at `at` and counts them,
// as zero pages or as the faulting page and n-1 pages around it, and the bytes copied from the
// source. The three page counters partition the pages installed.
func (p *pageState) recordInstall(idx, n int, bytes uint64, zero bool, at time.Time) {
	p.installed.setRange(idx, idx+n)
	if zero {
		p.stats.pagesZero.Add(uint64(n))
	} else {
		p.stats.pagesFault.Add(1)
		p.stats.pagesAround.Add(uint64(n - 1))
	}
	p.stats.bytes.Add(bytes)
	p.stats.observeInstall(time.Since(at))
}
