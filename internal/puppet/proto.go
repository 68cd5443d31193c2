//go:build linux

package puppet

// Request is one command to the child. Op selects the command; the other fields are its
// arguments (unused ones zero).
type Request struct {
	ID int    `json:"id"`
	Op string `json:"op"`

	Area   int    `json:"area,omitempty"`
	Kind   string `json:"kind,omitempty"`
	Size   int    `json:"size,omitempty"`
	Alias  bool   `json:"alias,omitempty"`
	Off    int    `json:"off,omitempty"`
	Len    int    `json:"len,omitempty"`
	Addr   uint64 `json:"addr,omitempty"`
	Advice int    `json:"advice,omitempty"`

	// uffd creation and registration
	Features     uint64 `json:"features,omitempty"`
	UserModeOnly bool   `json:"user_mode_only,omitempty"`
	Blocking     bool   `json:"blocking,omitempty"`
	Mode         uint64 `json:"mode,omitempty"`

	// touch
	Write   bool   `json:"write,omitempty"`
	Threads int    `json:"threads,omitempty"`
	Order   string `json:"order,omitempty"`  // "seq" (default), "rand", "parts" (touch: a contiguous part per thread)
	Verify  string `json:"verify,omitempty"` // "", "pattern", "zero", "counter"
	Seed    uint64 `json:"seed,omitempty"`
	// PatternBase is the pattern offset of the area's first byte, for areas that hold a slice
	// of a larger image (a guest region at a file offset).
	PatternBase int    `json:"pattern_base,omitempty"`
	Stride      int    `json:"stride,omitempty"`
	Data        []byte `json:"data,omitempty"`
	Expect      int    `json:"expect,omitempty"`

	// Free-form arguments for ops defined outside child.go.
	Ints []int64 `json:"ints,omitempty"`
	Str  string  `json:"str,omitempty"`
}

// Reply answers a Request with the same ID. Err is non-empty when the command failed.
type Reply struct {
	ID  int    `json:"id"`
	Err string `json:"err,omitempty"`

	Area      int      `json:"area,omitempty"`
	Addr      uint64   `json:"addr,omitempty"`
	AliasAddr uint64   `json:"alias_addr,omitempty"`
	Size      int      `json:"size,omitempty"`
	PageSize  int      `json:"page_size,omitempty"`
	Ioctls    uint64   `json:"ioctls,omitempty"`
	Pid       int      `json:"pid,omitempty"`
	Ns        int64    `json:"ns,omitempty"`
	Pages     int      `json:"pages,omitempty"`
	Sigbus    int      `json:"sigbus,omitempty"`
	Mismatch  int      `json:"mismatch,omitempty"`
	FirstBad  int      `json:"first_bad,omitempty"`
	Data      []byte   `json:"data,omitempty"`
	Pagemap   []uint64 `json:"pagemap,omitempty"`
	Status    int      `json:"status,omitempty"`
	NumFDs    int      `json:"num_fds,omitempty"`
	Ints      []int64  `json:"ints,omitempty"`
	Str       string   `json:"str,omitempty"`
}

// Byte is the content of byte off of a pattern-filled source with the given seed: what a
// "pattern" verification expects. It differs between neighbouring pages and within a page, so
// a page installed at the wrong offset or a torn page is caught.
func Byte(seed uint64, off int) byte {
	x := uint64(off)*0x9E3779B97F4A7C15 + seed
	x ^= x >> 29
	return byte(x ^ x>>7 ^ uint64(off>>12))
}

// Fill writes the pattern of seed for offsets [base, base+len(b)) into b.
func Fill(b []byte, seed uint64, base int) {
	for i := range b {
		b[i] = Byte(seed, base+i)
	}
}
