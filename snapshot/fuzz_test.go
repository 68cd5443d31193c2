package snapshot

import (
	"encoding/json"
	"testing"
)

func jsonMarshal(m *Manifest) ([]byte, error) { return json.Marshal(m) }

func FuzzManifest(f *testing.F) {
	img := make([]byte, 3<<20+4096)
	for i := range img[:1<<20] {
		img[i] = byte(i / 7)
	}
	dir := pack(f, img, PackOptions{ChunkSize: 1 << 20})
	if err := WriteWorkingSet(dir, []uint64{3, 4, 5, 700, 1, 2}); err != nil {
		f.Fatal(err)
	}
	m, err := ReadManifest(dir)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(m.Encode())
	f.Add([]byte(`{"format":"faultline-snapshot","version":1}`))
	f.Add([]byte(`{"format":"faultline-snapshot","version":1,"size":-1,"page_size":4096,"chunk_size":0}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeManifest(b)
		if err != nil {
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("decoded manifest fails validation: %v", err)
		}
		if m.WorkingSet != nil {
			if _, err := m.WorkingSet.order(m.Pages()); err != nil {
				t.Fatal(err)
			}
		}
		// Accepted manifests re-encode to themselves.
		m2, err := DecodeManifest(m.Encode())
		if err != nil || m2.Checksum != m.Checksum {
			t.Fatalf("re-encoded manifest: %v", err)
		}
	})
}
