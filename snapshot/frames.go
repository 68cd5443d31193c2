package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
)

// Chunks are stored as frames (FORMAT.md, "Chunk files"): each frame is FrameSize bytes of the
// image, its non-zero pages compressed on their own, so that a read needs one frame — a fault
// on a page no working set predicted costs a small read and a small decompression, not a whole
// chunk's.

// DefaultFrameSize is the image bytes per frame Pack uses when PackOptions leaves it 0 (for a
// page size above it, one page). BENCHMARKS.md ("Pack") and FORMAT.md say why 32 KiB.
const DefaultFrameSize = 32 << 10

// chunkMagic starts every chunk file; the frame table follows it.
const chunkMagic = "FLCHUNK2"

// dictSize is the bytes of sampled pages Pack puts in a chunk directory's dictionary.
const dictSize = 64 << 10

// maxFramesPerChunk bounds chunk_size / frame_size, so that a manifest cannot make a reader
// allocate far more than its own size.
const maxFramesPerChunk = 4096

// A frameLoc is where one frame of a chunk is stored, precomputed at Open.
type frameLoc struct {
	stored int32 // bytes in the chunk file; 0: the frame's pages are all zero
	off    int64 // offset in the chunk file
	hash   [32]byte
}

// framesIn is the number of frames of chunk i.
func (m *Manifest) framesIn(i int) int { return int(ceilDiv(m.chunkLen(i), m.FrameSize)) }

// NumFrames is the number of frames of the image.
func (m *Manifest) NumFrames() int { return int(ceilDiv(m.Size, m.FrameSize)) }

// frameLen is the image bytes of frame g.
func (m *Manifest) frameLen(g int) int64 { return min(m.FrameSize, m.Size-int64(g)*m.FrameSize) }

// framePayload is the bytes of frame g's non-zero pages: what its stored bytes hold.
func (m *Manifest) framePayload(g int) int64 {
	return m.payloadIn(int64(g)*m.FrameSize, m.frameLen(g))
}

// payloadIn is the bytes of the non-zero pages of the image range [off, off+n), off and n
// page-aligned (n may end at the image's end).
func (m *Manifest) payloadIn(off, n int64) int64 {
	var b int64
	for p := off / m.PageSize; p < ceilDiv(off+n, m.PageSize); p++ {
		if !m.isZero(p) {
			b += m.pageLen(p)
		}
	}
	return b
}

// A frameRec is one decoded entry of a chunk's frame table.
type frameRec struct {
	stored int64
	hash   [32]byte
}

// appendFrameRec appends one frame's entry to a frame table: the stored size as a uvarint and,
// when it is not 0, the SHA-256 of the frame's payload.
func appendFrameRec(t []byte, stored int64, hash *[32]byte) []byte {
	t = binary.AppendUvarint(t, uint64(stored))
	if stored > 0 {
		t = append(t, hash[:]...)
	}
	return t
}

// parseFrames decodes chunk i's frame table and checks it against the zero map: a frame
// stores nothing exactly when its pages are all zero, and at most its payload (equal: raw).
func (m *Manifest) parseFrames(i int, t []byte) ([]frameRec, error) {
	g0 := i * int(m.ChunkSize/m.FrameSize)
	return parseTable(m.framesIn(i), t, func(k int) int64 { return m.framePayload(g0 + k) })
}

// parseTable decodes a frame table of n frames whose payload lengths payloadOf gives.
func parseTable(n int, t []byte, payloadOf func(k int) int64) ([]frameRec, error) {
	out := make([]frameRec, n)
	for k := range n {
		u, l := binary.Uvarint(t)
		if l <= 0 {
			return nil, fmt.Errorf("frame table ends at frame %d of %d", k, n)
		}
		t = t[l:]
		payload := payloadOf(k)
		if u > uint64(payload) || (u == 0) != (payload == 0) {
			return nil, fmt.Errorf("frame %d stores %d bytes for %d bytes of non-zero pages", k, u, payload)
		}
		out[k].stored = int64(u)
		if u > 0 {
			if len(t) < 32 {
				return nil, fmt.Errorf("frame table ends in frame %d's hash", k)
			}
			copy(out[k].hash[:], t)
			t = t[32:]
		}
	}
	if len(t) != 0 {
		return nil, fmt.Errorf("%d bytes after the frame table's %d frames", len(t), n)
	}
	return out, nil
}

// chunkHeader is the start of a chunk file: the magic, the frame table's length as a uvarint,
// the table.
func chunkHeader(table []byte) []byte {
	h := append([]byte(chunkMagic), binary.AppendUvarint(nil, uint64(len(table)))...)
	return append(h, table...)
}

// headerLen is the length of the header of a chunk file whose table is t.
func headerLen(t []byte) int64 {
	return int64(len(chunkMagic) + len(binary.AppendUvarint(nil, uint64(len(t)))) + len(t))
}

// readHeader returns the frame table of a chunk file from its first bytes (at least as many as
// the header, which is bounded by maxTable).
func readHeader(b []byte) ([]byte, error) {
	if !bytes.HasPrefix(b, []byte(chunkMagic)) {
		return nil, errors.New("not a chunk file (no " + chunkMagic + " magic)")
	}
	b = b[len(chunkMagic):]
	u, l := binary.Uvarint(b)
	if l <= 0 || u > uint64(len(b)-l) {
		return nil, errors.New("chunk file header is truncated")
	}
	return b[l : l+int(u)], nil
}

// maxTable bounds a chunk's frame table: every frame a 10-byte size and a hash.
func (m *Manifest) maxTable() int64 { return int64(m.ChunkSize/m.FrameSize) * (10 + 32) }

// chunkFileName is the name of a chunk's file in its chunk directory: the SHA-256 of its image
// bytes and its layout (layoutID): the same bytes cut into other frames, or compressed with
// another dictionary, are another file.
func (m *Manifest) chunkFileName(c ChunkEntry) string {
	return c.Hash + "-" + m.layoutID() + ".chunk"
}

// chunkFileNames is every chunk's file name, "" for an all-zero chunk: ChunkFileName for each,
// the layout hashed once.
func (m *Manifest) chunkFileNames() []string {
	layout := m.layoutID()
	names := make([]string, len(m.Chunks))
	for i, c := range m.Chunks {
		if c.Enc != EncZero {
			names[i] = c.Hash + "-" + layout + ".chunk"
		}
	}
	return names
}

// layoutID is the first 16 hex digits of the SHA-256 of "faultline-frames", the frame size and
// the page size (decimal, each after a "/"), and "/" and the dictionary's hash if there is one.
func (m *Manifest) layoutID() string {
	l := fmt.Sprintf("faultline-frames/%d/%d", m.FrameSize, m.PageSize)
	if m.Dict != nil {
		l += "/" + m.Dict.Hash
	}
	return hashHex([]byte(l))[:16]
}

// ChunkFileName is the file name of chunk i (FORMAT.md), "" for an all-zero chunk.
func (m *Manifest) ChunkFileName(i int) string {
	if m.Chunks[i].Enc == EncZero {
		return ""
	}
	return m.chunkFileName(m.Chunks[i])
}

// dictFileName is the dictionary's file name in the chunk directory.
func (d *DictRef) fileName() string { return d.Hash + ".dict" }

// id is the zstd dictionary ID frames name their dictionary with: 0, what RFC 8878 gives a
// raw-content dictionary, so that the zstd tool decodes them (zstd -D); the frame hashes
// catch a wrong dictionary.
func (d *DictRef) id() uint32 { return 0 }

// chunkHash is a chunk's hash (FORMAT.md, "Chunk files"): the SHA-256 of "faultline-chunk",
// the chunk's zero bits (npages bits, least significant first, zero(i) for page i of the
// chunk), and each frame's payload hash (32 zero bytes for a frame with no payload). It is
// what the chunk's bytes determine — the zero pages and the others — without hashing the image
// bytes a second time after the frames.
func chunkHash(npages int64, zero func(i int64) bool, frameHashes func(k int) *[32]byte, nframes int) string {
	h := sha256.New()
	h.Write([]byte("faultline-chunk"))
	bitsOf := make([]byte, ceilDiv(npages, 8))
	for i := range npages {
		if zero(i) {
			bitsOf[i>>3] |= 1 << (i & 7)
		}
	}
	h.Write(bitsOf)
	var none [32]byte
	for k := range nframes {
		if fh := frameHashes(k); fh != nil {
			h.Write(fh[:])
		} else {
			h.Write(none[:])
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// hashOf is chunk i's hash by the manifest: its zero map and frame table.
func (m *Manifest) hashOf(i int, recs []frameRec) string {
	first := int64(i) * (m.ChunkSize / m.PageSize)
	return chunkHash(ceilDiv(m.chunkLen(i), m.PageSize), func(p int64) bool { return m.isZero(first + p) },
		func(k int) *[32]byte {
			if recs[k].stored == 0 {
				return nil
			}
			return &recs[k].hash
		}, len(recs))
}

// hashHex is the lowercase hex SHA-256 of b.
func hashHex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
