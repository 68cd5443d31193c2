//go:build linux

package uffd_test

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strconv"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/uffd"
)

// Builders of struct uffd_msg in the machine's byte order, laid out as the uapi header has it:
// event at 0, reserved bytes 1-7, the union from 8 (independently of the decoder under test).

func pagefaultMsg(flags uint64, addr uint64, tid uint32) uffd.Msg {
	var m uffd.Msg
	m[0] = byte(uffd.EventPagefault)
	binary.NativeEndian.PutUint64(m[8:], flags)
	binary.NativeEndian.PutUint64(m[16:], addr)
	binary.NativeEndian.PutUint32(m[24:], tid)
	return m
}

func forkMsg(ufd uint32) uffd.Msg {
	var m uffd.Msg
	m[0] = byte(uffd.EventFork)
	binary.NativeEndian.PutUint32(m[8:], ufd)
	return m
}

func remapMsg(from, to, n uint64) uffd.Msg {
	var m uffd.Msg
	m[0] = byte(uffd.EventRemap)
	binary.NativeEndian.PutUint64(m[8:], from)
	binary.NativeEndian.PutUint64(m[16:], to)
	binary.NativeEndian.PutUint64(m[24:], n)
	return m
}

func rangeMsg(ev uffd.EventType, start, end uint64) uffd.Msg {
	var m uffd.Msg
	m[0] = byte(ev)
	binary.NativeEndian.PutUint64(m[8:], start)
	binary.NativeEndian.PutUint64(m[16:], end)
	return m
}

// Addresses where user memory typically sits, with the top bits set on 64-bit architectures.
const (
	msgTop   = uint64(0x7f) << (bits.UintSize - 24)
	msgBelow = uint64(0x7e) << (bits.UintSize - 24)
)

func TestMsgDecode(t *testing.T) {
	t.Run("pagefault", func(t *testing.T) {
		for _, tc := range []struct {
			flags uint64
			addr  uint64
			tid   uint32
			str   string
		}{
			{0, msgTop + 0x1000, 0, fmt.Sprintf("pagefault %#x MISSING", msgTop+0x1000)},
			{1, msgTop + 0x2000, 4242, fmt.Sprintf("pagefault %#x MISSING|WRITE tid 4242", msgTop+0x2000)},
			{3, 0x1000, 7, "pagefault 0x1000 WP|WRITE tid 7"},
			{4, 0x200000, 0, "pagefault 0x200000 MINOR"},
			// EXACT_ADDRESS keeps the in-page offset.
			{0, msgTop + 0x104d, 0, fmt.Sprintf("pagefault %#x MISSING", msgTop+0x104d)},
			// A flag bit newer than this package is kept and printed in hex.
			{1 | 1<<3, 0x3000, 0, "pagefault 0x3000 MISSING|WRITE|0x8"},
			{0, 0x4000, 0xffffffff, "pagefault 0x4000 MISSING tid 4294967295"},
		} {
			m := pagefaultMsg(tc.flags, tc.addr, tc.tid)
			if got := m.Event(); got != uffd.EventPagefault {
				t.Errorf("Event = %v, want PAGEFAULT", got)
			}
			pf := m.Pagefault()
			want := uffd.Pagefault{Flags: uffd.FaultFlags(tc.flags), Address: uintptr(tc.addr), TID: tc.tid}
			if pf != want {
				t.Errorf("Pagefault() = %+v, want %+v", pf, want)
			}
			if err := m.Check(); err != nil {
				t.Errorf("Check(%v): %v", &m, err)
			}
			if got := m.String(); got != tc.str {
				t.Errorf("String() = %q, want %q", got, tc.str)
			}
		}
	})
	t.Run("fork", func(t *testing.T) {
		m := forkMsg(17)
		if m.Event() != uffd.EventFork || m.ForkFD() != 17 {
			t.Errorf("Event %v ForkFD %d, want FORK 17", m.Event(), m.ForkFD())
		}
		if err := m.Check(); err != nil {
			t.Error(err)
		}
		if got, want := m.String(), "fork ufd 17"; got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
	})
	t.Run("remap", func(t *testing.T) {
		m := remapMsg(msgTop, msgBelow, 0x200000)
		want := uffd.Remap{From: uintptr(msgTop), To: uintptr(msgBelow), Len: 0x200000}
		if m.Event() != uffd.EventRemap || m.Remap() != want {
			t.Errorf("Event %v Remap %+v, want REMAP %+v", m.Event(), m.Remap(), want)
		}
		if err := m.Check(); err != nil {
			t.Error(err)
		}
		if got, want := m.String(), fmt.Sprintf("remap %#x -> %#x len 0x200000", msgTop, msgBelow); got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
	})
	for _, tc := range []struct {
		ev  uffd.EventType
		str string
	}{
		{uffd.EventRemove, fmt.Sprintf("REMOVE [%#x, %#x)", msgTop+0x1000, msgTop+0x3000)},
		{uffd.EventUnmap, fmt.Sprintf("UNMAP [%#x, %#x)", msgTop+0x1000, msgTop+0x3000)},
	} {
		t.Run(strings.ToLower(tc.ev.String()), func(t *testing.T) {
			m := rangeMsg(tc.ev, msgTop+0x1000, msgTop+0x3000)
			want := uffd.Range{Start: uintptr(msgTop + 0x1000), End: uintptr(msgTop + 0x3000)}
			if m.Event() != tc.ev || m.Range() != want {
				t.Errorf("Event %v Range %+v, want %v %+v", m.Event(), m.Range(), tc.ev, want)
			}
			if err := m.Check(); err != nil {
				t.Error(err)
			}
			if got := m.String(); got != tc.str {
				t.Errorf("String() = %q, want %q", got, tc.str)
			}
			// An empty range is well-formed.
			if e := rangeMsg(tc.ev, 0x1000, 0x1000); e.Check() != nil {
				t.Errorf("empty range: %v", e.Check())
			}
		})
	}
	t.Run("unknown", func(t *testing.T) {
		var m uffd.Msg
		m[0] = 0x99
		m[8] = 0xab
		m[31] = 0x01
		if got, want := m.String(), "event 0x99 ab 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01"; got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
		if got, want := m.Event().String(), "EVENT(0x99)"; got != want {
			t.Errorf("Event().String() = %q, want %q", got, want)
		}
	})
}

func TestMsgCheckRejects(t *testing.T) {
	type bad struct {
		name string
		m    uffd.Msg
		want string // in the error
	}
	var cases []bad
	good := []uffd.Msg{
		pagefaultMsg(1, 0x1000, 5), forkMsg(3), remapMsg(0x1000, 0x2000, 0x1000),
		rangeMsg(uffd.EventRemove, 0x1000, 0x2000), rangeMsg(uffd.EventUnmap, 0x1000, 0x2000),
	}
	for _, g := range good {
		if err := g.Check(); err != nil {
			t.Fatalf("well-formed %v: %v", &g, err)
		}
		// Every reserved byte, alone.
		for i := 1; i < 8; i++ {
			m := g
			m[i] = 0x80
			cases = append(cases, bad{g.Event().String() + "/reserved" + strconv.Itoa(i), m, "reserved"})
		}
	}
	// Trailing garbage after each event's payload, byte by byte.
	for _, tail := range []struct {
		m    uffd.Msg
		from int
	}{
		{good[0], 28}, {good[1], 12}, {good[3], 24}, {good[4], 24},
	} {
		for i := tail.from; i < uffd.MsgSize; i++ {
			m := tail.m
			m[i] = 1
			cases = append(cases, bad{tail.m.Event().String() + "/tail" + strconv.Itoa(i), m, "non-zero bytes after offset " + strconv.Itoa(tail.from)})
		}
	}
	// Unknown events, including the neighbours of the known range and zero.
	for _, ev := range []uint8{0, 0x11, 0x17, 0x20, 0xff} {
		var m uffd.Msg
		m[0] = ev
		cases = append(cases, bad{"event" + strconv.Itoa(int(ev)), m, "unknown event"})
	}
	// Inverted ranges.
	cases = append(cases,
		bad{"remove/inverted", rangeMsg(uffd.EventRemove, 0x2000, 0x1000), "before start"},
		bad{"unmap/inverted", rangeMsg(uffd.EventUnmap, 0x2001, 0x2000), "before start"},
	)
	for _, c := range cases {
		err := c.m.Check()
		if err == nil {
			t.Errorf("%s: Check(% x) = nil, want an error", c.name, c.m[:])
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Check() = %q, want it to mention %q", c.name, err, c.want)
		}
		_ = c.m.String() // must not panic on bad input either
	}
}

// encodeMsg re-encodes the fields a Msg decodes to, for the round-trip property.
func encodeMsg(m *uffd.Msg) (uffd.Msg, bool) {
	switch m.Event() {
	case uffd.EventPagefault:
		pf := m.Pagefault()
		return pagefaultMsg(uint64(pf.Flags), uint64(pf.Address), pf.TID), true
	case uffd.EventFork:
		return forkMsg(uint32(m.ForkFD())), true
	case uffd.EventRemap:
		r := m.Remap()
		return remapMsg(uint64(r.From), uint64(r.To), uint64(r.Len)), true
	case uffd.EventRemove, uffd.EventUnmap:
		r := m.Range()
		return rangeMsg(m.Event(), uint64(r.Start), uint64(r.End)), true
	}
	return uffd.Msg{}, false
}

// fitsUintptr reports whether the 64-bit fields at the offsets fit a uintptr: on 32-bit
// architectures the accessors truncate addresses, which the kernel never sends there.
func fitsUintptr(m *uffd.Msg, offs ...int) bool {
	if bits.UintSize == 64 {
		return true
	}
	for _, o := range offs {
		if binary.NativeEndian.Uint64(m[o:]) > uint64(^uintptr(0)) {
			return false
		}
	}
	return true
}

func FuzzMsg(f *testing.F) {
	for _, m := range []uffd.Msg{
		pagefaultMsg(0, msgTop+0x1000, 0),
		pagefaultMsg(3, msgTop+0x2000, 1234),
		pagefaultMsg(4, 0x200000, 0),
		forkMsg(9),
		remapMsg(msgTop, msgBelow, 0x1000),
		rangeMsg(uffd.EventRemove, 0x1000, 0x3000),
		rangeMsg(uffd.EventUnmap, 0x1000, 0x3000),
		rangeMsg(uffd.EventUnmap, 0x3000, 0x1000), // inverted
	} {
		f.Add(m[:])
	}
	f.Add([]byte{0x12, 1})  // reserved byte set, short
	f.Add(make([]byte, 40)) // all zero, long
	f.Fuzz(func(t *testing.T, b []byte) {
		var m uffd.Msg
		copy(m[:], b)
		_ = m.Event()
		_ = m.Pagefault()
		_ = m.ForkFD()
		_ = m.Remap()
		_ = m.Range()
		_ = m.String()
		err := m.Check()
		if err != nil {
			if err.Error() == "" {
				t.Fatal("Check returned an empty error")
			}
			return
		}
		switch m.Event() {
		case uffd.EventPagefault:
			if !fitsUintptr(&m, 16) {
				return
			}
		case uffd.EventRemap:
			if !fitsUintptr(&m, 8, 16, 24) {
				return
			}
		case uffd.EventRemove, uffd.EventUnmap:
			if !fitsUintptr(&m, 8, 16) {
				return
			}
			if r := m.Range(); r.End < r.Start {
				t.Fatalf("Check passed an inverted range %+v", r)
			}
		}
		re, ok := encodeMsg(&m)
		if !ok {
			t.Fatalf("Check passed event %#x that no accessor decodes", uint8(m.Event()))
		}
		if re != m {
			t.Fatalf("re-encoding %v gives\n% x\nwant\n% x", &m, re[:], m[:])
		}
	})
}

// FuzzFeatureString checks that every name Feature.String prints parses back: known bits by
// FeatureByName, the unknown rest as one hex number, and together they give the value again.
func FuzzFeatureString(f *testing.F) {
	for _, v := range []uint64{0, 1, uint64(uffd.KnownFeatures), uint64(uffd.FeatureEventRemove | uffd.FeatureThreadID),
		1 << 17, 1 << 63, ^uint64(0), uint64(uffd.FeatureMove) | 1<<40} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v uint64) {
		x := uffd.Feature(v)
		s := x.String()
		if v == 0 {
			if s != "0" {
				t.Fatalf("Feature(0).String() = %q, want 0", s)
			}
			return
		}
		var got uffd.Feature
		parts := strings.Split(s, "|")
		for i, p := range parts {
			if strings.HasPrefix(p, "0x") {
				if i != len(parts)-1 {
					t.Fatalf("%#x: hex part %q is not last in %q", v, p, s)
				}
				u, err := strconv.ParseUint(p, 0, 64)
				if err != nil {
					t.Fatalf("%#x: unknown part %q of %q: %v", v, p, s, err)
				}
				if uffd.Feature(u) != x&^uffd.KnownFeatures {
					t.Fatalf("%#x: unknown part %q, want %#x", v, p, uint64(x&^uffd.KnownFeatures))
				}
				got |= uffd.Feature(u)
				continue
			}
			bit, ok := uffd.FeatureByName(p)
			if !ok {
				t.Fatalf("%#x: FeatureByName(%q) failed (String %q)", v, p, s)
			}
			if bit&x == 0 || bits.OnesCount64(uint64(bit)) != 1 {
				t.Fatalf("%#x: %q parses to %#x, not a single bit of the value", v, p, uint64(bit))
			}
			if bit.Name() != p {
				t.Fatalf("%#x: %v.Name() = %q, want %q", v, uint64(bit), bit.Name(), p)
			}
			if got&bit != 0 {
				t.Fatalf("%#x: %q printed twice in %q", v, p, s)
			}
			if b2, ok := uffd.FeatureByName("uffd_feature_" + strings.ToLower(p)); !ok || b2 != bit {
				t.Fatalf("FeatureByName with prefix, lower case: %q → %#x %v", p, uint64(b2), ok)
			}
			got |= bit
		}
		if got != x {
			t.Fatalf("%q parses back to %#x, want %#x", s, uint64(got), v)
		}
		// Each visits the same bits.
		var each uffd.Feature
		x.Each(func(b uffd.Feature) { each |= b })
		if each != x {
			t.Fatalf("Each visits %#x, want %#x", uint64(each), v)
		}
	})
}
