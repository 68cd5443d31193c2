package snapshot

import (
	"encoding/binary"
	"io"
	"math/rand/v2"
)

// SampleImage writes size bytes of a memory image that compresses the way guest memory does,
// the same for the same seed: runs of zero pages (about 40% of the pages, in runs of 1–64),
// text-like pages (words and numbers, as in page cache and heap strings), pointer-rich pages
// (8-byte values with shared high bits, many zero), and random pages (compressed or encrypted
// data, about 15%). Pages are 4 KiB; runs of one kind are 1–64 pages long.
func SampleImage(w io.Writer, size int64, seed uint64) error {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	const ps = 4096
	page := make([]byte, ps)
	buf := make([]byte, 0, 1<<20)
	words := sampleWords(r)
	var kind, left int
	for off := int64(0); off < size; off += ps {
		if left == 0 {
			left = 1 + r.IntN(64)
			switch x := r.IntN(100); {
			case x < 40:
				kind = 0 // zero
			case x < 75:
				kind = 1 // text
			case x < 85:
				kind = 2 // pointers
			default:
				kind = 3 // random
			}
		}
		left--
		switch kind {
		case 0:
			clear(page)
		case 1:
			p := page[:0]
			for len(p) < ps {
				if r.IntN(8) == 0 {
					p = binary.BigEndian.AppendUint32(p, r.Uint32()%100000)
				}
				p = append(p, words[r.IntN(len(words))]...)
				p = append(p, ' ')
			}
			copy(page, p)
		case 2:
			baseAddr := uint64(0xffff_8880_0000_0000) | uint64(r.IntN(1<<20))<<12
			for i := 0; i < ps; i += 8 {
				var v uint64
				switch r.IntN(4) {
				case 0:
					v = baseAddr + uint64(r.IntN(1<<16))*8
				case 1:
					v = uint64(r.IntN(256))
				}
				binary.LittleEndian.PutUint64(page[i:], v)
			}
		case 3:
			for i := 0; i < ps; i += 8 {
				binary.LittleEndian.PutUint64(page[i:], r.Uint64())
			}
		}
		n := min(int64(ps), size-off)
		buf = append(buf, page[:n]...)
		if len(buf) == cap(buf) {
			if _, err := w.Write(buf); err != nil {
				return err
			}
			buf = buf[:0]
		}
	}
	_, err := w.Write(buf)
	return err
}

// sampleWords is a vocabulary of 2,000 pronounceable words of 2–10 letters.
func sampleWords(r *rand.Rand) [][]byte {
	const cons, vow = "bcdfghjklmnprstvwz", "aeiou"
	words := make([][]byte, 2000)
	for i := range words {
		n := 2 + r.IntN(9)
		w := make([]byte, n)
		for j := range w {
			if j%2 == 0 {
				w[j] = cons[r.IntN(len(cons))]
			} else {
				w[j] = vow[r.IntN(len(vow))]
			}
		}
		words[i] = w
	}
	return words
}
