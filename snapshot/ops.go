package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
)

// Unpack writes the snapshot's image to the file out, byte-identical to what was packed, with
// zero pages left as holes (a sparse file). It writes a temp file and renames it into place.
func Unpack(ctx context.Context, dir, out string) error {
	s, err := Open(dir)
	if err != nil {
		return err
	}
	defer s.Close()
	m := s.m
	f, err := createTemp(filepath.Dir(out), filepath.Base(out))
	if err != nil {
		return err
	}
	tmp := f.Name()
	fail := func(err error) error { f.Close(); os.Remove(tmp); return err }
	if err := f.Truncate(m.Size); err != nil {
		return fail(err)
	}
	buf := make([]byte, m.ChunkSize)
	per := m.ChunkSize / m.PageSize
	for i, c := range m.Chunks {
		if c.Enc == EncZero {
			continue
		}
		clen := m.chunkLen(i)
		if err := s.ReadChunk(ctx, i, buf[:clen]); err != nil {
			return fail(err)
		}
		off := int64(i) * m.ChunkSize
		// Write each run of non-zero pages; zero pages stay holes.
		for p := int64(0); p*m.PageSize < clen; {
			if m.isZero(int64(i)*per + p) {
				p++
				continue
			}
			q := p + 1
			for q*m.PageSize < clen && !m.isZero(int64(i)*per+q) {
				q++
			}
			a, b := p*m.PageSize, min(q*m.PageSize, clen)
			if _, err := f.WriteAt(buf[a:b], off+a); err != nil {
				return fail(err)
			}
			p = q
		}
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

// Verify reads every chunk of the snapshot in dir and its working set, checking every hash. It
// returns one error per bad chunk (each a *ChunkError) or frame; err is for a snapshot that
// cannot be looked at at all (no manifest, a bad manifest).
func Verify(ctx context.Context, dir string) (bad []error, err error) {
	s, err := openFiles(ctx, dir, DirFiles(dir), Options{CacheSize: 1}, false)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", dir, err)
	}
	defer s.Close()
	buf := make([]byte, s.m.ChunkSize)
	for i := range s.m.Chunks {
		err := s.checkHeader(ctx, i)
		if err == nil {
			err = s.ReadChunk(ctx, i, buf[:s.m.chunkLen(i)])
		}
		if err != nil {
			bad = append(bad, err)
		}
	}
	if s.m.WorkingSet != nil {
		if err := s.ReadWorkingSet(ctx, func(Run) error { return nil }); err != nil {
			bad = append(bad, err)
		}
	}
	return bad, nil
}

// Info is what Inspect reports about a snapshot.
type Info struct {
	Dir        string
	Size       int64 // image bytes
	PageSize   int64
	ChunkSize  int64
	FrameSize  int64
	DictSize   int64 // the zstd dictionary's bytes (0: none)
	Pages      int64
	ZeroPages  int64
	Chunks     int   // all chunks
	ZeroChunks int   // chunks with no file
	Files      int   // distinct chunk files referred to
	Stored     int64 // bytes of those files
	Store      string
	// SharedInStore counts this snapshot's chunk files that other snapshots registered in the
	// store also use; StoreSnapshots is how many other snapshots there are.
	SharedInStore  int
	StoreSnapshots int
	// Base is the base directory of a diff; SharedWithBase counts chunk files this snapshot
	// has in common with it (-1 when the base is gone or has changed).
	Base           string
	SharedWithBase int
	// Working set: pages recorded and the extent file's size.
	WorkingSetPages  int
	WorkingSetStored int64
}

// Ratio is the image size over the stored chunk bytes.
func (i *Info) Ratio() float64 {
	if i.Stored == 0 {
		return 0
	}
	return float64(i.Size) / float64(i.Stored)
}

// Inspect describes the snapshot in dir from its manifest and those of the snapshots it shares
// chunks with; it reads no chunk.
func Inspect(dir string) (*Info, error) {
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, err
	}
	in := &Info{Dir: dir, Size: m.Size, PageSize: m.PageSize, ChunkSize: m.ChunkSize, FrameSize: m.FrameSize,
		Pages: m.Pages(), Chunks: len(m.Chunks), Store: m.Store}
	if m.Dict != nil {
		in.DictSize = m.Dict.Size
	}
	for p := range m.Pages() {
		if m.isZero(p) {
			in.ZeroPages++
		}
	}
	files := make(map[string]bool)
	for _, c := range m.Chunks {
		if c.Enc == EncZero {
			in.ZeroChunks++
			continue
		}
		if !files[c.Hash] {
			files[c.Hash] = true
			in.Stored += c.Stored
		}
	}
	in.Files = len(files)
	shared := func(o *Manifest) int {
		n := 0
		done := make(map[string]bool)
		for _, c := range o.Chunks {
			if c.Enc != EncZero && files[c.Hash] && !done[c.Hash] {
				done[c.Hash] = true
				n++
			}
		}
		return n
	}
	if m.Store != "" {
		self, _ := filepath.Abs(dir)
		others := make(map[string]bool)
		for _, d := range storeSnapshots(m.Store) {
			if d == self {
				continue
			}
			in.StoreSnapshots++
			o, err := ReadManifest(d)
			if err != nil {
				continue
			}
			for _, c := range o.Chunks {
				if c.Enc != EncZero && files[c.Hash] {
					others[c.Hash] = true
				}
			}
		}
		in.SharedInStore = len(others)
	}
	if m.Base != nil {
		in.Base = m.Base.Dir
		in.SharedWithBase = -1
		if b, err := ReadManifest(m.Base.Dir); err == nil && b.Checksum == m.Base.Checksum {
			in.SharedWithBase = shared(b)
		}
	}
	if w := m.WorkingSet; w != nil {
		in.WorkingSetPages = w.Pages
		in.WorkingSetStored = w.ExtentSize
	}
	return in, nil
}

// FormatBytes formats n bytes for people: "512 MiB", "1.5 GiB", "4 KiB", "100 B".
func FormatBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	f := float64(n)
	u := 0
	for f >= 1024 && u < len(units)-1 {
		f /= 1024
		u++
	}
	if u == 0 || f == float64(int64(f)) {
		return fmt.Sprintf("%d %s", int64(f), units[u])
	}
	return fmt.Sprintf("%.1f %s", f, units[u])
}
