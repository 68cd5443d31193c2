package firecracker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"sort"
)

// Mapping is one GuestRegionUffdMapping as Firecracker serializes it.
type Mapping struct {
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	Size             uint64 `json:"size"`
	Offset           uint64 `json:"offset"`
	PageSize         uint64 `json:"page_size,omitempty"`
	PageSizeKiB      uint64 `json:"page_size_kib,omitempty"` // bytes, despite the name
}

// Handshake is one validated message and the userfaultfd that came with it.
type Handshake struct {
	Regions []Region
	Version Version
	// UFFD is the received userfaultfd, close-on-exec; the caller owns it.
	UFFD int
}

// Version is the handshake generation a message's fields identify.
type Version int

const (
	// V1_1 is Firecracker v1.1–v1.6: no page size field; the socket closes after the message.
	V1_1 Version = iota + 1
	// V1_7 is v1.7–v1.11: page_size_kib (bytes); the socket closes after the message.
	V1_7
	// V1_12 is v1.12 and later: page_size and page_size_kib; the socket stays open.
	V1_12
)

func (v Version) String() string {
	switch v {
	case V1_1:
		return "v1.1-v1.6"
	case V1_7:
		return "v1.7-v1.11"
	case V1_12:
		return "v1.12+"
	}
	return fmt.Sprintf("Version(%d)", int(v))
}

// KeepsSocketOpen reports whether Firecracker keeps the stream open after the message (EOF then
// means the VM exited).
func (v Version) KeepsSocketOpen() bool { return v >= V1_12 }

// Region is a validated guest memory region.
type Region struct {
	Base     uintptr // in the VMM's address space
	Size     uintptr
	Offset   int64 // in the memory snapshot file
	PageSize uintptr
}

// Limits bound what a peer may send.
type Limits struct {
	MaxRegions int   // default 4096
	MaxMessage int   // bytes of JSON, default 1 MiB
	FileSize   int64 // the memory file's size; regions must lie within it
	// HostPageSize is assumed when a v1.1–v1.6 message carries no page size.
	HostPageSize uintptr
}

func (l Limits) withDefaults() Limits {
	if l.MaxRegions <= 0 {
		l.MaxRegions = 4096
	}
	if l.MaxMessage <= 0 {
		l.MaxMessage = 1 << 20
	}
	if l.HostPageSize == 0 {
		l.HostPageSize = 4096
	}
	return l
}

// ErrHandshake is matched (errors.Is) by every error about a malformed or invalid handshake.
var ErrHandshake = errors.New("firecracker: invalid handshake")

type handshakeError struct{ msg string }

func (e *handshakeError) Error() string   { return "firecracker: handshake: " + e.msg }
func (e *handshakeError) Is(t error) bool { return t == ErrHandshake }

func invalid(format string, args ...any) error {
	return &handshakeError{msg: fmt.Sprintf(format, args...)}
}

// Decode parses and validates one handshake message. Unknown fields are ignored; the page size
// comes from page_size, else page_size_kib (bytes), else the host page size; each must be a
// power of two, both must agree when both are sent. Regions must be page-aligned, non-empty,
// inside the memory file, and overlap neither in the VMM's address space nor in the file.
func Decode(data []byte, lim Limits) ([]Region, Version, error) {
	lim = lim.withDefaults()
	if len(data) > lim.MaxMessage {
		return nil, 0, invalid("message of %d bytes exceeds the limit of %d", len(data), lim.MaxMessage)
	}
	var raw []json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&raw); err != nil {
		return nil, 0, invalid("not a JSON array of regions: %v", err)
	}
	if dec.More() {
		return nil, 0, invalid("trailing data after the JSON array")
	}
	if len(raw) == 0 {
		return nil, 0, invalid("no regions")
	}
	if len(raw) > lim.MaxRegions {
		return nil, 0, invalid("%d regions exceed the limit of %d", len(raw), lim.MaxRegions)
	}
	regions := make([]Region, 0, len(raw))
	version := V1_1
	for i, r := range raw {
		var fields map[string]json.RawMessage
		if err := json.Unmarshal(r, &fields); err != nil {
			return nil, 0, invalid("region %d: not an object: %v", i, err)
		}
		var m Mapping
		for _, f := range []struct {
			name     string
			dst      *uint64
			required bool
		}{
			{"base_host_virt_addr", &m.BaseHostVirtAddr, true},
			{"size", &m.Size, true},
			{"offset", &m.Offset, true},
			{"page_size", &m.PageSize, false},
			{"page_size_kib", &m.PageSizeKiB, false},
		} {
			v, ok := fields[f.name]
			if !ok {
				if f.required {
					return nil, 0, invalid("region %d: missing %q", i, f.name)
				}
				continue
			}
			if err := json.Unmarshal(v, f.dst); err != nil {
				return nil, 0, invalid("region %d: %s: want an unsigned integer, got %s", i, f.name, v)
			}
		}
		_, hasPS := fields["page_size"]
		_, hasKiB := fields["page_size_kib"]
		v := V1_1
		switch {
		case hasPS:
			v = V1_12
		case hasKiB:
			v = V1_7
		}
		if i == 0 {
			version = v
		} else if v != version {
			return nil, 0, invalid("region %d has the fields of %v, region 0 those of %v", i, v, version)
		}
		ps := uint64(lim.HostPageSize)
		switch {
		case hasPS && hasKiB && m.PageSize != m.PageSizeKiB:
			return nil, 0, invalid("region %d: page_size %d and page_size_kib %d disagree (both are bytes)", i, m.PageSize, m.PageSizeKiB)
		case hasPS:
			ps = m.PageSize
		case hasKiB:
			ps = m.PageSizeKiB
		}
		if ps < 4096 || bits.OnesCount64(ps) != 1 || ps > 1<<30 {
			return nil, 0, invalid("region %d: page size %d is not a power of two between 4 KiB and 1 GiB", i, ps)
		}
		switch {
		case m.Size == 0:
			return nil, 0, invalid("region %d: size 0", i)
		case m.Size%ps != 0:
			return nil, 0, invalid("region %d: size %d is not a multiple of the page size %d", i, m.Size, ps)
		case m.BaseHostVirtAddr%ps != 0:
			return nil, 0, invalid("region %d: base %#x is not aligned to the page size %d", i, m.BaseHostVirtAddr, ps)
		case m.BaseHostVirtAddr+m.Size < m.BaseHostVirtAddr || m.BaseHostVirtAddr+m.Size > 1<<57:
			return nil, 0, invalid("region %d: [%#x, +%#x) is outside any address space", i, m.BaseHostVirtAddr, m.Size)
		case m.Offset%ps != 0:
			return nil, 0, invalid("region %d: file offset %d is not a multiple of the page size %d", i, m.Offset, ps)
		case m.Offset+m.Size < m.Offset || lim.FileSize > 0 && m.Offset+m.Size > uint64(lim.FileSize):
			return nil, 0, invalid("region %d: file range [%d, %d) is beyond the memory file's %d bytes", i, m.Offset, m.Offset+m.Size, lim.FileSize)
		}
		regions = append(regions, Region{Base: uintptr(m.BaseHostVirtAddr), Size: uintptr(m.Size), Offset: int64(m.Offset), PageSize: uintptr(ps)})
	}
	if err := checkOverlaps(regions); err != nil {
		return nil, 0, err
	}
	return regions, version, nil
}

func checkOverlaps(rs []Region) error {
	byBase := append([]Region(nil), rs...)
	sort.Slice(byBase, func(i, j int) bool { return byBase[i].Base < byBase[j].Base })
	for i := 1; i < len(byBase); i++ {
		if p := byBase[i-1]; p.Base+p.Size > byBase[i].Base {
			return invalid("regions at %#x and %#x overlap in the VMM's address space", p.Base, byBase[i].Base)
		}
	}
	byOff := append([]Region(nil), rs...)
	sort.Slice(byOff, func(i, j int) bool { return byOff[i].Offset < byOff[j].Offset })
	for i := 1; i < len(byOff); i++ {
		if p := byOff[i-1]; p.Offset+int64(p.Size) > byOff[i].Offset {
			return invalid("regions at file offsets %d and %d overlap", p.Offset, byOff[i].Offset)
		}
	}
	return nil
}

// Encode renders regions as Firecracker of the given version would, byte for byte: the fields
// in the order of its GuestRegionUffdMapping (as Firecracker v1.14.2 sends them:
// base_host_virt_addr, size, offset, page_size, page_size_kib), no spaces.
func Encode(rs []Region, v Version) ([]byte, error) {
	out := make([]Mapping, len(rs))
	for i, r := range rs {
		out[i] = Mapping{BaseHostVirtAddr: uint64(r.Base), Size: uint64(r.Size), Offset: uint64(r.Offset)}
		// A page size is never 0, so omitempty drops exactly the fields v does not send.
		if v >= V1_7 {
			out[i].PageSizeKiB = uint64(r.PageSize)
		}
		if v >= V1_12 {
			out[i].PageSize = uint64(r.PageSize)
		}
	}
	return json.Marshal(out)
}
