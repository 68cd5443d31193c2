package engine

import "github.com/faultline-go/faultline/uffd"

// JournalMsgs is the number of messages the reader reads at once, and so the size of the
// journal kept in durable memory (Options.Durable).
const JournalMsgs = 64

// DurableSize is the bytes of durable memory (Options.Durable) an engine serving regions needs:
// the read journal, then each region's bitmaps (durableBitmaps of them), in the order given.
func DurableSize(regions []Region) int {
	n := JournalMsgs * uffd.MsgSize
	for _, r := range regions {
		if r.PageSize != 0 {
			n += durableBitmaps * bitmapWords(int(r.Size/r.PageSize)) * 8
		}
	}
	return n
}

// durableBitmaps is the bitmaps of a region kept durable: removed, installed, dirty.
const durableBitmaps = 3

func bitmapWords(pages int) int { return (pages + 63) / 64 }
