package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"strings"
)

const (
	// FormatName is the manifest's "format" field.
	FormatName = "faultline-snapshot"
	// Version is the format version this package writes and the only one it reads.
	Version = 2
	// ManifestName is the manifest's file name inside a snapshot directory.
	ManifestName = "manifest.json"
	// ChunksDir is the directory, inside a snapshot directory, that holds its chunks unless the
	// snapshot uses a shared store.
	ChunksDir = "chunks"

	// maxSize bounds the image size a manifest may claim (1 PiB), so that a corrupt manifest
	// cannot make a reader allocate without bound.
	maxSize = 1 << 50
	// maxChunkSize bounds the chunk size (a chunk is decompressed into one buffer).
	maxChunkSize = 1 << 30
)

// Encoding is how a chunk or a working-set frame is stored.
type Encoding string

const (
	EncZero   Encoding = "zero"   // all zero: no file, nothing stored
	EncFrames Encoding = "frames" // a chunk file of frames (FORMAT.md, "Chunk files")
	EncRaw    Encoding = "raw"    // a working-set frame's payload as is
	EncZstd   Encoding = "zstd"   // a working-set frame's payload as one zstd frame
)

// A Manifest describes a snapshot. It is the file DIR/manifest.json; FORMAT.md documents every
// field.
type Manifest struct {
	Format    string `json:"format"`
	Version   int    `json:"version"`
	Size      int64  `json:"size"`       // image bytes
	PageSize  int64  `json:"page_size"`  // the zero map's unit
	ChunkSize int64  `json:"chunk_size"` // every chunk but the last holds this many image bytes
	FrameSize int64  `json:"frame_size"` // every frame but the last holds this many image bytes
	// Dict is the zstd dictionary the chunks' frames are compressed with, if any.
	Dict *DictRef `json:"dict,omitempty"`
	// Store is the absolute path of the shared chunk store holding the chunks, or "" when they
	// are in DIR/chunks.
	Store  string       `json:"store,omitempty"`
	Chunks []ChunkEntry `json:"chunks"`
	// ZeroMap has one bit per page, bit i%8 of byte i/8 set when page i is all zero. In JSON it
	// is base64.
	ZeroMap []byte `json:"zero_map"`
	// Base names the snapshot this one was packed over as a diff (for inspect only: reading
	// never needs it).
	Base       *BaseRef    `json:"base,omitempty"`
	WorkingSet *WorkingSet `json:"working_set,omitempty"`
	// Checksum is the SHA-256 (hex) of the manifest's compact JSON encoding with this field
	// empty. It protects the zero map, which is served without reading any chunk.
	Checksum string `json:"checksum"`
}

// A ChunkEntry is one chunk of the image.
type ChunkEntry struct {
	// Hash is the chunk's content hash (hex; FORMAT.md: a SHA-256 over its zero bits and its
	// frames' payload hashes). It names the chunk's file. Empty for an all-zero chunk.
	Hash   string   `json:"sha256,omitempty"`
	Stored int64    `json:"stored,omitempty"` // the chunk file's size
	Enc    Encoding `json:"enc"`              // EncZero or EncFrames
	// Frames is the chunk's frame table, as its file's header holds it: per frame the stored
	// size (uvarint) and, unless 0, the SHA-256 of the frame's payload. In JSON it is base64.
	Frames []byte `json:"frames,omitempty"`
}

// A DictRef names a zstd dictionary: raw content (sampled pages), the file <sha256>.dict in
// the chunk directory.
type DictRef struct {
	Hash string `json:"sha256"`
	Size int64  `json:"size"`
}

// A BaseRef names the base of a diff snapshot.
type BaseRef struct {
	Dir      string `json:"dir"`      // absolute path at pack time
	Checksum string `json:"checksum"` // the base manifest's checksum
}

// A WorkingSet is a recorded page order and the extent file holding those pages.
type WorkingSet struct {
	Pages int `json:"pages"` // number of pages in Order
	// Order is the page indexes in access order: each the zigzag-encoded difference from the
	// previous one (the first from 0), as a uvarint. In JSON it is base64.
	Order []byte `json:"order"`
	// Extent is the file name, in DIR, of the frames, stored one after another.
	Extent     string  `json:"extent"`
	ExtentSize int64   `json:"extent_size"`
	Frames     []Frame `json:"frames"`
}

// A Frame covers a run of the working set's order. Its payload is the bytes of those pages that
// are not zero, in order.
type Frame struct {
	Entries int      `json:"entries"` // pages of the order it covers
	Raw     int64    `json:"raw"`     // payload bytes
	Stored  int64    `json:"stored"`  // bytes in the extent file
	Enc     Encoding `json:"enc"`
	Hash    string   `json:"sha256,omitempty"` // SHA-256 (hex) of the stored bytes; empty when Raw is 0
}

// Pages is the number of pages of the image (the last may be partial).
func (m *Manifest) Pages() int64 { return ceilDiv(m.Size, m.PageSize) }

// NumChunks is the number of chunks of the image.
func (m *Manifest) NumChunks() int { return int(ceilDiv(m.Size, m.ChunkSize)) }

// chunkLen is the number of image bytes in chunk i.
func (m *Manifest) chunkLen(i int) int64 {
	return min(m.ChunkSize, m.Size-int64(i)*m.ChunkSize)
}

// pageLen is the number of image bytes in page p.
func (m *Manifest) pageLen(p int64) int64 { return min(m.PageSize, m.Size-p*m.PageSize) }

// isZero reports whether page p is all zero by the zero map.
func (m *Manifest) isZero(p int64) bool { return m.ZeroMap[p>>3]&(1<<(p&7)) != 0 }

// payloadLen is the number of bytes of chunk i's pages that are not zero: the length of what its
// file stores (before compression).
func (m *Manifest) payloadLen(i int) int64 {
	per := m.ChunkSize / m.PageSize
	var n int64
	for p := int64(i) * per; p < min(int64(i+1)*per, m.Pages()); p++ {
		if !m.isZero(p) {
			n += m.pageLen(p)
		}
	}
	return n
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }

// checksum computes the manifest's checksum (of its compact encoding with Checksum empty).
func (m *Manifest) checksum() string {
	c := *m
	c.Checksum = ""
	b, err := json.Marshal(&c)
	if err != nil {
		panic(err) // a Manifest always encodes
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Encode returns the manifest as JSON with its checksum set.
func (m *Manifest) Encode() []byte {
	m.Checksum = m.checksum()
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		panic(err)
	}
	return append(b, '\n')
}

// DecodeManifest decodes and validates a manifest. Every error matches ErrCorrupt or ErrVersion.
func DecodeManifest(b []byte) (*Manifest, error) {
	// The version is looked at first so that a newer format gets ErrVersion, not a complaint
	// about a field this version does not know.
	var head struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(b, &head); err != nil {
		return nil, corruptf("manifest: %v", err)
	}
	if head.Format != FormatName {
		return nil, corruptf("manifest: format %q, want %q", head.Format, FormatName)
	}
	if head.Version != Version {
		return nil, fmt.Errorf("%w: manifest is version %d; this faultline reads version %d", ErrVersion, head.Version, Version)
	}
	m := new(Manifest)
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(m); err != nil {
		return nil, corruptf("manifest: %v", err)
	}
	if dec.More() {
		return nil, corruptf("manifest: data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return m, nil
}

// Validate checks that the manifest is self-consistent: its checksum, sizes, chunk map, zero
// map and working set. It does not look at any file.
func (m *Manifest) Validate() error {
	if m.Format != FormatName {
		return corruptf("manifest: format %q, want %q", m.Format, FormatName)
	}
	if m.Version != Version {
		return fmt.Errorf("%w: manifest is version %d; this faultline reads version %d", ErrVersion, m.Version, Version)
	}
	if got := m.checksum(); m.Checksum != got {
		return corruptf("manifest: checksum %q does not match its contents (%s)", m.Checksum, got)
	}
	if m.PageSize < 512 || m.PageSize > maxChunkSize || bits.OnesCount64(uint64(m.PageSize)) != 1 {
		return corruptf("manifest: page size %d is not a power of two in [512, 1 GiB]", m.PageSize)
	}
	if m.ChunkSize <= 0 || m.ChunkSize > maxChunkSize || m.ChunkSize%m.PageSize != 0 {
		return corruptf("manifest: chunk size %d is not a multiple of the page size %d up to 1 GiB", m.ChunkSize, m.PageSize)
	}
	if m.FrameSize <= 0 || m.FrameSize%m.PageSize != 0 || m.ChunkSize%m.FrameSize != 0 || m.ChunkSize/m.FrameSize > maxFramesPerChunk {
		return corruptf("manifest: frame size %d is not a multiple of the page size %d dividing the chunk size %d into at most 4096 frames", m.FrameSize, m.PageSize, m.ChunkSize)
	}
	if d := m.Dict; d != nil && (!isHash(d.Hash) || d.Size <= 0 || d.Size > 1<<20) {
		return corruptf("manifest: dictionary %q of %d bytes", d.Hash, d.Size)
	}
	if m.Size < 0 || m.Size > maxSize {
		return corruptf("manifest: image size %d out of range", m.Size)
	}
	if n := m.NumChunks(); len(m.Chunks) != n {
		return corruptf("manifest: %d chunks for an image of %d bytes in chunks of %d (want %d)", len(m.Chunks), m.Size, m.ChunkSize, n)
	}
	pages := m.Pages()
	if int64(len(m.ZeroMap)) != ceilDiv(pages, 8) {
		return corruptf("manifest: zero map of %d bytes for %d pages", len(m.ZeroMap), pages)
	}
	if pages%8 != 0 && m.ZeroMap[len(m.ZeroMap)-1]>>(pages%8) != 0 {
		return corruptf("manifest: zero map has bits past the last page")
	}
	if m.Store != "" && !filepath.IsAbs(m.Store) {
		return corruptf("manifest: store %q is not an absolute path", m.Store)
	}
	for i, c := range m.Chunks {
		if err := m.validateChunk(i, c); err != nil {
			return corruptf("manifest: chunk %d: %v", i, err)
		}
	}
	if m.WorkingSet != nil {
		if _, err := m.WorkingSet.order(pages); err != nil {
			return err
		}
		if err := m.validateWorkingSet(); err != nil {
			return corruptf("manifest: working set: %v", err)
		}
	}
	return nil
}

func (m *Manifest) validateChunk(i int, c ChunkEntry) error {
	payload := m.payloadLen(i)
	switch c.Enc {
	case EncZero:
		if c.Hash != "" || c.Stored != 0 || c.Frames != nil {
			return errors.New("a zero chunk has a hash, a stored size or frames")
		}
		if payload != 0 {
			return errors.New("a zero chunk has pages the zero map says are not zero")
		}
		return nil
	case EncFrames:
	default:
		return fmt.Errorf("unknown encoding %q", c.Enc)
	}
	if payload == 0 {
		return errors.New("a stored chunk whose pages are all zero")
	}
	if !isHash(c.Hash) {
		return fmt.Errorf("hash %q is not 64 lowercase hex digits", c.Hash)
	}
	if int64(len(c.Frames)) > m.maxTable() {
		return fmt.Errorf("frame table of %d bytes", len(c.Frames))
	}
	recs, err := m.parseFrames(i, c.Frames)
	if err != nil {
		return err
	}
	size := headerLen(c.Frames)
	for _, r := range recs {
		size += r.stored
	}
	if c.Stored != size {
		return fmt.Errorf("file of %d bytes, its header and frames hold %d", c.Stored, size)
	}
	return nil
}

func (m *Manifest) validateWorkingSet() error {
	w := m.WorkingSet
	if !validExtentName(w.Extent) {
		return fmt.Errorf("extent file name %q", w.Extent)
	}
	order, _ := w.order(m.Pages())
	var entries int
	var stored int64
	for i, f := range w.Frames {
		if f.Entries <= 0 || f.Entries > len(order)-entries {
			return fmt.Errorf("frame %d covers %d pages, %d left", i, f.Entries, len(order)-entries)
		}
		var raw int64
		for _, p := range order[entries : entries+f.Entries] {
			if !m.isZero(int64(p)) {
				raw += m.pageLen(int64(p))
			}
		}
		if f.Raw != raw {
			return fmt.Errorf("frame %d: %d payload bytes, its pages hold %d", i, f.Raw, raw)
		}
		if f.Raw > frameTarget+m.PageSize {
			// What WriteWorkingSet makes: a reader decompresses a frame into one buffer.
			return fmt.Errorf("frame %d: %d payload bytes, more than %d", i, f.Raw, frameTarget+m.PageSize)
		}
		switch {
		case raw == 0:
			if f.Enc != EncZero || f.Stored != 0 || f.Hash != "" {
				return fmt.Errorf("frame %d has only zero pages but stores something", i)
			}
		case f.Enc == EncRaw && f.Stored != raw, f.Enc == EncZstd && (f.Stored <= 0 || f.Stored > 2*raw+1024),
			f.Enc != EncRaw && f.Enc != EncZstd:
			return fmt.Errorf("frame %d: %s, %d bytes stored for %d", i, f.Enc, f.Stored, raw)
		case !isHash(f.Hash):
			return fmt.Errorf("frame %d: hash %q", i, f.Hash)
		}
		entries += f.Entries
		stored += f.Stored
	}
	if entries != len(order) {
		return fmt.Errorf("frames cover %d of %d pages", entries, len(order))
	}
	if stored != w.ExtentSize {
		return fmt.Errorf("frames store %d bytes, the extent has %d", stored, w.ExtentSize)
	}
	return nil
}

// validExtentName accepts the names WriteWorkingSet gives extent files: "workingset-<sha256>.fws".
func validExtentName(s string) bool {
	h, ok := strings.CutPrefix(s, "workingset-")
	if !ok {
		return false
	}
	h, ok = strings.CutSuffix(h, ".fws")
	return ok && isHash(h)
}

func isHash(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// encodeOrder encodes page indexes as the manifest stores them.
func encodeOrder(pages []uint64) []byte {
	b := make([]byte, 0, len(pages)*2)
	var prev uint64
	for _, p := range pages {
		d := int64(p - prev)
		b = binary.AppendUvarint(b, uint64(d<<1)^uint64(d>>63))
		prev = p
	}
	return b
}

// order decodes the page order, checking that it has Pages entries, each a page of the image,
// none twice.
func (w *WorkingSet) order(pages int64) ([]uint64, error) {
	if w.Pages < 0 || int64(w.Pages) > pages || len(w.Order) < w.Pages {
		return nil, corruptf("manifest: working set of %d pages in an image of %d", w.Pages, pages)
	}
	out := make([]uint64, 0, w.Pages)
	seen := make([]byte, ceilDiv(pages, 8))
	b := w.Order
	var prev uint64
	for len(b) > 0 {
		u, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, corruptf("manifest: working set order is not uvarints")
		}
		b = b[n:]
		d := int64(u>>1) ^ -int64(u&1)
		p := prev + uint64(d)
		if p >= uint64(pages) || len(out) == w.Pages {
			return nil, corruptf("manifest: working set page %d out of range or past its %d pages", p, w.Pages)
		}
		if seen[p>>3]&(1<<(p&7)) != 0 {
			return nil, corruptf("manifest: working set has page %d twice", p)
		}
		seen[p>>3] |= 1 << (p & 7)
		out = append(out, p)
		prev = p
	}
	if len(out) != w.Pages {
		return nil, corruptf("manifest: working set order has %d pages, want %d", len(out), w.Pages)
	}
	return out, nil
}

// ReadManifest reads and validates DIR/manifest.json.
func ReadManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		if isNotExist(err) {
			return nil, fmt.Errorf("snapshot %s: %w: %s is missing (a pack that did not finish leaves none)", dir, ErrNotSnapshot, ManifestName)
		}
		return nil, fmt.Errorf("snapshot %s: %w", dir, ioError(err))
	}
	m, err := DecodeManifest(b)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", dir, err)
	}
	return m, nil
}

// writeManifest writes m as DIR/manifest.json atomically and durably.
func writeManifest(dir string, m *Manifest) error {
	return writeFileAtomic(dir, ManifestName, m.Encode(), 0o644)
}

// chunkDir is where m's chunks are.
func (m *Manifest) chunkDir(dir string) string {
	if m.Store != "" {
		return filepath.Join(m.Store, ChunksDir)
	}
	return filepath.Join(dir, ChunksDir)
}
