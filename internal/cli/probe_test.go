package cli

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/probe"
	"github.com/faultline-go/faultline/uffd"
)

func TestProbeJSON(t *testing.T) {
	code, out, errs := run("probe", "--json")
	if code != 0 || errs != "" {
		t.Fatalf("probe --json: exit %d, stderr %q", code, errs)
	}
	var s probe.Support
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		t.Fatalf("decode: %v\n%s", err, out)
	}
	if !strings.Contains(out, "\n  \"kernel\": {") {
		t.Errorf("JSON not indented:\n%.200s", out)
	}
	if s.Kernel.Release == "" || s.Kernel.PageSize != os.Getpagesize() {
		t.Errorf("kernel %+v", s.Kernel)
	}
	if !s.Creation.Any() || !s.Features.Handshake.OK {
		t.Fatalf("no userfaultfd here? creation %+v handshake %+v", s.Creation, s.Features.Handshake)
	}
	if !s.Features.Supported.Has(uffd.KnownFeatures) {
		t.Errorf("supported %v lacks %v", s.Features.Supported, uffd.KnownFeatures&^s.Features.Supported.Feature)
	}
	if got, want := len(s.Register), len(memory.Kinds)*len(probe.Modes); got != want {
		t.Errorf("%d register entries, want %d", got, want)
	}
	if r, ok := s.Registration("anon", uffd.ModeMissing); !ok || !r.OK || r.Ioctls.Ioctls != 0x13c {
		t.Errorf("anon MISSING: %+v, want 0x13c", r)
	}
	if r, ok := s.Registration("hugetlb", uffd.ModeMinor|uffd.ModeWP); !ok || !r.OK || r.Ioctls.Ioctls != 0x1cc {
		t.Errorf("hugetlb MINOR|WP: %+v, want 0x1cc", r)
	}
}

func TestProbeText(t *testing.T) {
	code, out, errs := run("probe")
	if code != 0 || errs != "" {
		t.Fatalf("probe: exit %d, stderr %q", code, errs)
	}
	for _, sec := range []string{"kernel\n", "\ncreation\n", "\nfeatures (", "\nregister (", "\nmemory\n", "\nadvice\n"} {
		if !strings.Contains(out, sec) {
			t.Errorf("no section %q", strings.TrimSpace(sec))
		}
	}
	for _, k := range memory.Kinds {
		if !strings.Contains(out, "\n  "+k.String()+" ") {
			t.Errorf("register matrix has no row for %v", k)
		}
	}
	uffd.KnownFeatures.Each(func(f uffd.Feature) {
		// Name, bit, supported (this kernel has them all), must be requested.
		want := "yes  no"
		if uffd.BehaviourFeatures.Has(f) {
			want = "yes  yes"
		}
		line := lineWith(out, "  "+f.Name()+" ")
		if line == "" {
			t.Errorf("feature %s not listed", f.Name())
		} else if !strings.HasSuffix(strings.Join(strings.Fields(line), "  "), want) {
			t.Errorf("feature line %q, want it to end with %q", line, want)
		}
	})
	for _, m := range probe.Modes {
		if !strings.Contains(lineWith(out, "  KIND "), " "+m.String()) {
			t.Errorf("register matrix has no column %v", m)
		}
	}
	for _, s := range []string{"0x13c  WAKE|COPY|ZEROPAGE|MOVE|POISON", "EVENT_FORK can be enabled by this caller: ", "PAGEMAP_SCAN", "vm.unprivileged_userfaultfd"} {
		if !strings.Contains(out, s) {
			t.Errorf("output lacks %q", s)
		}
	}
}

// lineWith returns the first line of s containing sub.
func lineWith(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

func TestProbeUsageErrors(t *testing.T) {
	for _, args := range [][]string{{"probe", "--bogus"}, {"probe", "-json=maybe"}, {"probe", "extra"}} {
		code, out, errs := run(args...)
		if code != 2 || out != "" || !strings.Contains(errs, "Usage: faultline probe [--json]") {
			t.Errorf("%q: exit %d, stdout %q, stderr:\n%s", args, code, out, errs)
		}
	}
	code, out, _ := run("help", "probe")
	if code != 0 || !strings.Contains(out, "Usage: faultline probe") || !strings.Contains(out, "-json") {
		t.Errorf("help probe: exit %d:\n%s", code, out)
	}
}
