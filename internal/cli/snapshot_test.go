package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/snapshot"
)

func TestPackInspectVerifyUnpack(t *testing.T) {
	tmp := t.TempDir()
	mem := filepath.Join(tmp, "mem")
	var img bytes.Buffer
	if err := snapshot.SampleImage(&img, 9<<20+4096, 3); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mem, img.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(tmp, "snap")
	code, out, errs := run("pack", "--mem-file", mem, "--out", dir, "--chunk-size", "1M")
	if code != 0 || errs != "" {
		t.Fatalf("pack: exit %d, stderr %q", code, errs)
	}
	if !regexp.MustCompile(`(?m)^packed 9\.0 MiB into .*: 10 chunks \(\d+ zero, 0 reused\), [\d.]+% zero pages\n` +
		`[\d.]+ MiB stored, ratio [\d.]+; [\d.]+s, \d+ MB/s of raw image\n$`).MatchString(out) {
		t.Errorf("pack output:\n%s", out)
	}
	code, out, errs = run("snapshot", "inspect", dir)
	if code != 0 || errs != "" {
		t.Fatalf("inspect: exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{"image        9.0 MiB (9441280 bytes), pages of 4 KiB, chunks of 1 MiB\n",
		"stored       ", "ratio ", "zero         ", "of 10 chunks all zero", "working set  none\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("inspect output has no %q:\n%s", want, out)
		}
	}
	code, out, errs = run("snapshot", "verify", dir)
	if code != 0 || errs != "" || !strings.Contains(out, "every checksum matches") {
		t.Fatalf("verify: exit %d, %q, stderr %q", code, out, errs)
	}
	back := filepath.Join(tmp, "back")
	code, _, errs = run("snapshot", "unpack", dir, "--out", back)
	if code != 0 || errs != "" {
		t.Fatalf("unpack: exit %d, stderr %q", code, errs)
	}
	got, err := os.ReadFile(back)
	if err != nil || !bytes.Equal(got, img.Bytes()) {
		t.Fatalf("unpacked file differs (%v)", err)
	}

	// Two bad chunks: verify names both and fails.
	m, err := snapshot.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	var broken []int
	for i, c := range m.Chunks {
		if c.Enc != snapshot.EncZero && len(broken) < 2 {
			p := filepath.Join(dir, snapshot.ChunksDir, m.ChunkFileName(i))
			os.Chmod(p, 0o644)
			if len(broken) == 0 {
				os.Remove(p)
			} else {
				b, _ := os.ReadFile(p)
				b[len(b)-1] ^= 1
				os.WriteFile(p, b, 0o644)
			}
			broken = append(broken, i)
		}
	}
	code, out, errs = run("snapshot", "verify", dir)
	if code != 1 || !strings.Contains(out, ": 2 bad") {
		t.Errorf("verify of a broken snapshot: exit %d, %q", code, out)
	}
	for _, i := range broken {
		if !strings.Contains(errs, "chunk "+strconv.Itoa(i)+" at offset") {
			t.Errorf("verify does not name chunk %d:\n%s", i, errs)
		}
	}
	if !strings.Contains(errs, "missing") || !strings.Contains(errs, "corrupt") {
		t.Errorf("verify does not say missing and corrupt:\n%s", errs)
	}
	if code, _, errs = run("snapshot", "unpack", dir, "--out", back+"2"); code != 1 || !strings.Contains(errs, "missing") {
		t.Errorf("unpack of a broken snapshot: exit %d, %q", code, errs)
	}
	if _, err := os.Stat(back + "2"); err == nil {
		t.Error("unpack of a broken snapshot left a file")
	}
}

func TestPackUsage(t *testing.T) {
	if code, _, errs := run("pack", "--out", "x"); code != 2 || !strings.Contains(errs, "--mem-file") {
		t.Errorf("pack without --mem-file: exit %d, %q", code, errs)
	}
	if code, _, errs := run("snapshot", "frobnicate", "x"); code != 2 || !strings.Contains(errs, "unknown subcommand") {
		t.Errorf("snapshot frobnicate: exit %d, %q", code, errs)
	}
	if code, _, errs := run("snapshot", "inspect", filepath.Join(t.TempDir(), "nothing")); code != 1 || !strings.Contains(errs, "no manifest") {
		t.Errorf("inspect of no snapshot: exit %d, %q", code, errs)
	}
	if code, _, errs := run("pack", "--mem-file", "m", "--out", "x", "--chunk-size", "lots"); code != 2 || !strings.Contains(errs, "not a size") {
		t.Errorf("bad --chunk-size: exit %d, %q", code, errs)
	}
}

func TestPackDiffAndStore(t *testing.T) {
	tmp := t.TempDir()
	var img bytes.Buffer
	if err := snapshot.SampleImage(&img, 8<<20, 4); err != nil {
		t.Fatal(err)
	}
	mem := filepath.Join(tmp, "mem")
	if err := os.WriteFile(mem, img.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(tmp, "base")
	if code, _, errs := run("pack", "--mem-file", mem, "--out", base); code != 0 {
		t.Fatalf("pack base: %d %s", code, errs)
	}
	// A diff file with one dirty page, in chunk 0.
	diff := filepath.Join(tmp, "diff")
	f, err := os.Create(diff)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(8 << 20)
	page := bytes.Repeat([]byte{0xab}, 4096)
	f.WriteAt(page, 8192)
	f.Close()
	want := bytes.Clone(img.Bytes())
	copy(want[8192:], page)
	out := filepath.Join(tmp, "diffsnap")
	code, o, errs := run("pack", "--mem-file", diff, "--base", base, "--out", out)
	if code != 0 || !strings.Contains(o, "4 chunks (") || !strings.Contains(o, ", 3 reused)") {
		t.Fatalf("pack --base: exit %d\n%s%s", code, o, errs)
	}
	code, o, _ = run("snapshot", "inspect", out)
	if code != 0 || !regexp.MustCompile(`(?m)^base +\S+: \d+ of \d+ chunk files shared$`).MatchString(o) {
		t.Errorf("inspect of a diff:\n%s", o)
	}
	back := filepath.Join(tmp, "back")
	if code, _, errs := run("snapshot", "unpack", out, "--out", back); code != 0 {
		t.Fatal(errs)
	}
	if got, _ := os.ReadFile(back); !bytes.Equal(got, want) {
		t.Error("diff over base unpacks wrong")
	}

	store := filepath.Join(tmp, "store")
	for _, d := range []string{"a", "b"} {
		if code, _, errs := run("pack", "--mem-file", mem, "--out", filepath.Join(tmp, d), "--store", store); code != 0 {
			t.Fatal(errs)
		}
	}
	code, o, _ = run("snapshot", "inspect", filepath.Join(tmp, "b"))
	if code != 0 || !regexp.MustCompile(`(?m)^store +\S+: (\d+) of (\d+) chunk files shared with 1 other snapshot$`).MatchString(o) {
		t.Errorf("inspect in a store:\n%s", o)
	}
}
