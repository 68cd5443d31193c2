package uffd

import (
	"encoding/binary"
	"fmt"
)

// Msg is one 32-byte message read from a userfaultfd (struct uffd_msg), in the machine's byte
// order. Decode it with the accessor matching Event. A Msg is a plain array so that a []Msg is
// a read buffer the kernel fills directly.
type Msg [MsgSize]byte

// Pagefault is the payload of an EventPagefault message.
type Pagefault struct {
	Flags FaultFlags
	// Address is page-aligned (huge-page-aligned on hugetlb) unless FeatureExactAddress is on.
	Address uintptr
	// TID is the faulting thread (with FeatureThreadID), else 0.
	TID uint32
}

// Remap is the payload of an EventRemap message: mremap moved [From, From+Len) to To.
type Remap struct {
	From, To, Len uintptr
}

// Range is [Start, End), the payload of EventRemove and EventUnmap messages.
type Range struct {
	Start, End uintptr
}

func (m *Msg) u64(off int) uint64 { return binary.NativeEndian.Uint64(m[off : off+8]) }

// Event is the message's event type.
func (m *Msg) Event() EventType { return EventType(m[0]) }

// Pagefault decodes an EventPagefault message.
func (m *Msg) Pagefault() Pagefault {
	return Pagefault{
		Flags:   FaultFlags(m.u64(8)),
		Address: uintptr(m.u64(16)),
		TID:     binary.NativeEndian.Uint32(m[24:28]),
	}
}

// ForkFD decodes an EventFork message: the number of the child's new userfaultfd, already
// installed in the reading process by the read that returned the message. The reader owns it.
func (m *Msg) ForkFD() int { return int(binary.NativeEndian.Uint32(m[8:12])) }

// Remap decodes an EventRemap message.
func (m *Msg) Remap() Remap {
	return Remap{From: uintptr(m.u64(8)), To: uintptr(m.u64(16)), Len: uintptr(m.u64(24))}
}

// Range decodes an EventRemove or EventUnmap message.
func (m *Msg) Range() Range { return Range{Start: uintptr(m.u64(8)), End: uintptr(m.u64(16))} }

// Check reports whether m is a well-formed message of a known event type: reserved bytes zero,
// payload bytes beyond the event's fields zero, ranges not inverted. The kernel zeroes every
// message before filling it, so a failed check means a corrupt buffer or an event newer than
// this package.
func (m *Msg) Check() error {
	if m[1] != 0 || m[2] != 0 || m[3] != 0 || m[4] != 0 || m[5] != 0 || m[6] != 0 || m[7] != 0 {
		return fmt.Errorf("uffd: message reserved bytes not zero: % x", m[1:8])
	}
	zeroFrom := func(off int) error {
		for _, b := range m[off:] {
			if b != 0 {
				return fmt.Errorf("uffd: %v message has non-zero bytes after offset %d", m.Event(), off)
			}
		}
		return nil
	}
	switch m.Event() {
	case EventPagefault:
		return zeroFrom(28)
	case EventFork:
		return zeroFrom(12)
	case EventRemap:
		return nil
	case EventRemove, EventUnmap:
		if r := m.Range(); r.End < r.Start {
			return fmt.Errorf("uffd: %v message with end %#x before start %#x", m.Event(), r.End, r.Start)
		}
		return zeroFrom(24)
	}
	return fmt.Errorf("uffd: unknown event %#x", uint8(m.Event()))
}

func (m *Msg) String() string {
	switch m.Event() {
	case EventPagefault:
		p := m.Pagefault()
		s := fmt.Sprintf("pagefault %#x %v", p.Address, p.Flags)
		if p.TID != 0 {
			s += fmt.Sprintf(" tid %d", p.TID)
		}
		return s
	case EventFork:
		return fmt.Sprintf("fork ufd %d", m.ForkFD())
	case EventRemap:
		r := m.Remap()
		return fmt.Sprintf("remap %#x -> %#x len %#x", r.From, r.To, r.Len)
	case EventRemove, EventUnmap:
		r := m.Range()
		return fmt.Sprintf("%v [%#x, %#x)", m.Event(), r.Start, r.End)
	}
	return fmt.Sprintf("event %#x % x", uint8(m.Event()), m[8:])
}
