package uffd

import (
	"fmt"
	"math/bits"
	"strings"
)

var featureNames = [...]string{
	"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "MISSING_HUGETLBFS",
	"MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS", "THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM",
	"EXACT_ADDRESS", "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
}

// Name is the kernel's name of a single feature bit without the UFFD_FEATURE_ prefix, or its hex
// value for a bit this package does not know.
func (f Feature) Name() string {
	if bits.OnesCount64(uint64(f)) == 1 {
		if i := bits.TrailingZeros64(uint64(f)); i < len(featureNames) {
			return featureNames[i]
		}
	}
	return fmt.Sprintf("%#x", uint64(f))
}

// Each calls fn for every bit set in f, lowest first.
func (f Feature) Each(fn func(Feature)) {
	for v := uint64(f); v != 0; v &= v - 1 {
		fn(Feature(1) << bits.TrailingZeros64(v))
	}
}

// Has reports whether every bit of want is in f.
func (f Feature) Has(want Feature) bool { return f&want == want }

// String lists the bits as "EVENT_REMOVE|THREAD_ID"; unknown bits are printed as one hex
// value at the end; the empty set is "0".
func (f Feature) String() string {
	return setString(uint64(f), uint64(KnownFeatures), func(bit uint64) string { return Feature(bit).Name() })
}

// FeatureByName parses one feature name as Name prints it (the UFFD_FEATURE_ prefix optional).
func FeatureByName(name string) (Feature, bool) {
	name = strings.TrimPrefix(strings.ToUpper(name), "UFFD_FEATURE_")
	for i, n := range featureNames {
		if n == name {
			return Feature(1) << i, true
		}
	}
	return 0, false
}

func (m RegisterMode) String() string {
	return setString(uint64(m), registerModes, func(bit uint64) string {
		return [...]string{"MISSING", "WP", "MINOR"}[bits.TrailingZeros64(bit)]
	})
}

var ioctlNames = map[int]string{
	nrRegister: "REGISTER", nrUnregister: "UNREGISTER", nrWake: "WAKE", nrCopy: "COPY",
	nrZeropage: "ZEROPAGE", nrMove: "MOVE", nrWriteprotect: "WRITEPROTECT", nrContinue: "CONTINUE",
	nrPoison: "POISON", nrAPI: "API",
}

// Has reports whether every ioctl of want is in s.
func (s Ioctls) Has(want Ioctls) bool { return s&want == want }

func (s Ioctls) String() string {
	var known uint64
	for nr := range ioctlNames {
		known |= 1 << nr
	}
	return setString(uint64(s), known, func(bit uint64) string { return ioctlNames[bits.TrailingZeros64(bit)] })
}

func (f FaultFlags) String() string {
	reason := "MISSING"
	switch {
	case f&FaultWP != 0:
		reason = "WP"
	case f&FaultMinor != 0:
		reason = "MINOR"
	}
	if f&FaultWrite != 0 {
		reason += "|WRITE"
	}
	if extra := uint64(f) &^ uint64(FaultWrite|FaultWP|FaultMinor); extra != 0 {
		reason += fmt.Sprintf("|%#x", extra)
	}
	return reason
}

func (e EventType) String() string {
	switch e {
	case EventPagefault:
		return "PAGEFAULT"
	case EventFork:
		return "FORK"
	case EventRemap:
		return "REMAP"
	case EventRemove:
		return "REMOVE"
	case EventUnmap:
		return "UNMAP"
	}
	return fmt.Sprintf("EVENT(%#x)", uint8(e))
}

// setString prints the known bits of v by name, in ascending order, and any unknown rest in hex.
func setString(v, known uint64, name func(uint64) string) string {
	if v == 0 {
		return "0"
	}
	var b strings.Builder
	for w := v & known; w != 0; w &= w - 1 {
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		b.WriteString(name(w & -w))
	}
	if rest := v &^ known; rest != 0 {
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		fmt.Fprintf(&b, "%#x", rest)
	}
	return b.String()
}
