package firecracker

import (
	"errors"
	"strings"
	"testing"
)

func TestDecodeVersions(t *testing.T) {
	lim := Limits{FileSize: 3 << 21}
	for _, tc := range []struct {
		name string
		msg  string
		v    Version
		ps   uintptr
	}{
		{"v1.1", `[{"base_host_virt_addr":1073741824,"size":2097152,"offset":0}]`, V1_1, 4096},
		{"v1.7 page_size_kib holds bytes", `[{"base_host_virt_addr":1073741824,"size":2097152,"offset":0,"page_size_kib":4096}]`, V1_7, 4096},
		{"v1.12", `[{"base_host_virt_addr":1073741824,"size":2097152,"offset":2097152,"page_size":2097152,"page_size_kib":2097152}]`, V1_12, 2 << 20},
		{"unknown fields ignored", `[{"base_host_virt_addr":1073741824,"size":4096,"offset":0,"page_size":4096,"gpa_start":7,"is_guest_memfd":false}]`, V1_12, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, v, err := Decode([]byte(tc.msg), lim)
			if err != nil {
				t.Fatal(err)
			}
			if v != tc.v || rs[0].PageSize != tc.ps || rs[0].Base != 1<<30 {
				t.Fatalf("got %v %+v, want %v page size %d", v, rs, tc.v, tc.ps)
			}
			// Round trip through the VMM's encoder.
			b, err := Encode(rs, v)
			if err != nil {
				t.Fatal(err)
			}
			rs2, v2, err := Decode(b, lim)
			if err != nil || v2 != v || rs2[0] != rs[0] {
				t.Fatalf("round trip: %v %v %+v", err, v2, rs2)
			}
		})
	}
}

func TestDecodeRejects(t *testing.T) {
	lim := Limits{FileSize: 1 << 20, MaxRegions: 4}
	for _, tc := range []struct{ msg, want string }{
		{``, "not a JSON array"},
		{`{}`, "not a JSON array"},
		{`[`, "not a JSON array"},
		{`[]`, "no regions"},
		{`[{"size":4096,"offset":0}]`, `missing "base_host_virt_addr"`},
		{`[{"base_host_virt_addr":-1,"size":4096,"offset":0}]`, "unsigned integer"},
		{`[{"base_host_virt_addr":4096,"size":4096,"offset":0.5}]`, "unsigned integer"},
		{`[{"base_host_virt_addr":4096,"size":0,"offset":0}]`, "size 0"},
		{`[{"base_host_virt_addr":4096,"size":100,"offset":0}]`, "not a multiple of the page size"},
		{`[{"base_host_virt_addr":4097,"size":4096,"offset":0}]`, "not aligned"},
		{`[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":3000}]`, "not a power of two"},
		{`[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]`, "disagree"},
		{`[{"base_host_virt_addr":4096,"size":4096,"offset":1048576}]`, "beyond the memory file"},
		{`[{"base_host_virt_addr":4096,"size":18446744073709547520,"offset":0}]`, "outside any address space"},
		{`[{"base_host_virt_addr":4096,"size":8192,"offset":0},{"base_host_virt_addr":8192,"size":4096,"offset":8192}]`, "overlap in the VMM"},
		{`[{"base_host_virt_addr":4096,"size":8192,"offset":0},{"base_host_virt_addr":65536,"size":4096,"offset":4096}]`, "file offsets"},
		{`[{"base_host_virt_addr":4096,"size":4096,"offset":0},{"base_host_virt_addr":65536,"size":4096,"offset":4096,"page_size":4096}]`, "fields of"},
		{`[1,2,3,4,5]`, "exceed the limit"},
		{`[{"base_host_virt_addr":4096,"size":4096,"offset":0}] x`, "trailing"},
	} {
		_, _, err := Decode([]byte(tc.msg), lim)
		if err == nil || !errors.Is(err, ErrHandshake) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%q) = %v, want an ErrHandshake containing %q", tc.msg, err, tc.want)
		}
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`[{"base_host_virt_addr":1073741824,"size":2097152,"offset":0,"page_size":4096,"page_size_kib":4096}]`))
	f.Add([]byte(`[{"base_host_virt_addr":1073741824,"size":2097152,"offset":0}]`))
	f.Add([]byte(`[{"base_host_virt_addr":0,"size":0}]`))
	f.Add([]byte(`[[]]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		lim := Limits{FileSize: 1 << 30}
		rs, v, err := Decode(b, lim)
		if (err == nil) != (rs != nil) {
			t.Fatalf("err %v with regions %v", err, rs)
		}
		if err != nil {
			if !errors.Is(err, ErrHandshake) {
				t.Fatalf("error %v does not match ErrHandshake", err)
			}
			return
		}
		// Every accepted message satisfies the invariants the engine relies on.
		for _, r := range rs {
			if r.Size == 0 || r.Size%r.PageSize != 0 || r.Base%r.PageSize != 0 || r.Offset+int64(r.Size) > lim.FileSize {
				t.Fatalf("accepted an invalid region %+v", r)
			}
		}
		out, err := Encode(rs, v)
		if err != nil {
			t.Fatal(err)
		}
		rs2, v2, err := Decode(out, lim)
		if err != nil || v2 != v || len(rs2) != len(rs) {
			t.Fatalf("re-encoded message rejected: %v", err)
		}
	})
}

// Encode's bytes are Firecracker's own: this message is what a real Firecracker v1.14.2 sent
// for a 128 MiB guest, read off the socket by the e2e package's bare listener.
func TestEncodeMatchesFirecracker(t *testing.T) {
	const real = `[{"base_host_virt_addr":139977044262912,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]`
	rs, v, err := Decode([]byte(real), Limits{FileSize: 128 << 20})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Encode(rs, v)
	if err != nil || string(b) != real {
		t.Fatalf("Encode = %s (%v), want Firecracker's %s", b, err, real)
	}
}
