//go:build linux

package cli

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/s3test"
	"github.com/faultline-go/faultline/internal/syncbuf"
	"github.com/faultline-go/faultline/internal/vmm"
	"github.com/faultline-go/faultline/snapshot"
)

// s3Endpoint is the S3 server of the CLI tests: the one .ci/run started (FAULTLINE_S3_ENDPOINT,
// its credentials in the AWS environment variables), else a versitygw of the test's own.
func s3Endpoint(t *testing.T) string {
	t.Helper()
	if e := os.Getenv("FAULTLINE_S3_ENDPOINT"); e != "" && os.Getenv("AWS_ACCESS_KEY_ID") != "" {
		return e
	}
	srv := s3test.Start(t)
	t.Setenv("AWS_ACCESS_KEY_ID", srv.Access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.Secret)
	return srv.Endpoint
}

// faultline push, twice: the second uploads nothing. serve of the pushed snapshot with the
// wrong credentials fails at start, saying so, without listening.
func TestPushCLI(t *testing.T) {
	endpoint := s3Endpoint(t)
	tmp := t.TempDir()
	mem := filepath.Join(tmp, "mem")
	var img bytes.Buffer
	if err := snapshot.SampleImage(&img, 6<<20, 9); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(mem, img.Bytes(), 0o644)
	dir := filepath.Join(tmp, "snap")
	if code, _, errs := run("pack", "--mem-file", mem, "--out", dir); code != 0 {
		t.Fatalf("pack: %d %s", code, errs)
	}
	// A bucket of this test's own: .ci/run's server is shared by the runs of every test.
	// (The temporary directory's parent is named after the test and a random number.)
	bucket := strings.ToLower(strings.ReplaceAll(filepath.Base(filepath.Dir(tmp)), "_", "-"))
	if len(bucket) > 63 {
		bucket = bucket[:63]
	}
	url := "s3://" + bucket + "/tmpl/v1"
	code, out, errs := run("push", dir, url, "--s3-endpoint", endpoint)
	if code != 0 {
		t.Fatalf("push: exit %d: %s", code, errs)
	}
	if !regexp.MustCompile(`(?m)^created bucket ` + bucket + `\npushed .* to ` + url + `: [1-9]\d* objects uploaded \([\d.]+ [KM]iB\), 0 already there \(0 B\); [\d.]+s, \d+ MB/s\n$`).MatchString(out) {
		t.Fatalf("first push output:\n%s", out)
	}
	t.Logf("first push: %s", out)
	code, out, errs = run("push", "--s3-endpoint", endpoint, dir, url)
	if code != 0 {
		t.Fatalf("second push: exit %d: %s", code, errs)
	}
	if !regexp.MustCompile(`^pushed .*: 0 objects uploaded \(0 B\), [1-9]\d* already there`).MatchString(out) {
		t.Fatalf("second push output:\n%s", out)
	}

	t.Setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
	sock := filepath.Join(tmp, "uffd.sock")
	code, _, errs = run("serve", "--socket", sock, "--snapshot", url, "--s3-endpoint", endpoint)
	if code != 1 || !strings.Contains(errs, "access denied") || !strings.Contains(errs, "AWS_SECRET_ACCESS_KEY") {
		t.Fatalf("serve with the wrong secret: exit %d, stderr %q", code, errs)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("serve with the wrong secret left a socket: %v", err)
	}
	code, _, errs = run("push", dir, "s3://Bad_Bucket/x")
	if code != 2 || !strings.Contains(errs, "bucket name") {
		t.Fatalf("bad URL: exit %d, %q", code, errs)
	}
}

// serve --snapshot s3://… on its own, then serve --control with s3:// references (the binding
// "default" and one made by vm create, another prefix of the bucket): every VM gets every byte
// of its snapshot, through one disk cache in --cache-dir; SIGTERM ends each serve.
func TestServeS3(t *testing.T) {
	const size = 8 << 20
	endpoint := s3Endpoint(t)
	dir := t.TempDir()
	mem := filepath.Join(dir, "mem")
	b := make([]byte, size)
	puppet.Fill(b, 0x33, 0)
	os.WriteFile(mem, b, 0o600)
	snap := filepath.Join(dir, "snap")
	if _, err := snapshot.Pack(context.Background(), mem, snap, snapshot.PackOptions{}); err != nil {
		t.Fatal(err)
	}
	bucket := strings.ToLower(strings.ReplaceAll(filepath.Base(filepath.Dir(dir)), "_", "-"))
	urlA, urlB := "s3://"+bucket+"/a", "s3://"+bucket+"/b"
	for _, u := range []string{urlA, urlB} {
		if c, _, errs := run("push", snap, u, "--s3-endpoint", endpoint); c != 0 {
			t.Fatalf("push %s: %s", u, errs)
		}
	}
	cacheDir := filepath.Join(dir, "cache")
	touch := func(sock string) *vmm.VMM {
		t.Helper()
		m, err := vmm.Start(vmm.Options{Socket: sock, Regions: []vmm.Region{{Size: size}}})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := m.TouchRange(0, 0, size, 2, 0x33, false); err != nil || got.Wrong != 0 || got.Pages != size/4096 {
			m.Kill()
			t.Fatalf("VM on %s: %+v, %v", sock, got, err)
		}
		return m
	}
	serve := func(args []string, then func()) string {
		t.Helper()
		var logs syncbuf.Buffer
		code := make(chan int, 1)
		go func() { code <- Run(append([]string{"serve"}, args...), io.Discard, &logs) }()
		then()
		if err := syscallKillSelf(); err != nil {
			t.Fatal(err)
		}
		select {
		case c := <-code:
			if c != 0 {
				t.Fatalf("serve exit %d:\n%s", c, logs.String())
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("serve did not return:\n%s", logs.String())
		}
		return logs.String()
	}
	common := []string{"--s3-endpoint", endpoint, "--cache-dir", cacheDir, "--cache-size", "1G"}
	sockA, sockB, ctl := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock"), filepath.Join(dir, "control.sock")
	logs := serve(append([]string{"--socket", sockA, "--snapshot", urlA}, common...), func() {
		waitFor(t, "the socket", func() bool { _, err := os.Stat(sockA); return err == nil })
		touch(sockA).Exit()
	})
	if !strings.Contains(logs, `msg="chunk cache" dir=`+cacheDir) || !strings.Contains(logs, `msg="bucket and chunk cache"`) {
		t.Fatalf("serve log:\n%s", logs)
	}
	logs = serve(append([]string{"--control", ctl, "--socket", sockA, "--snapshot", urlA}, common...), func() {
		waitFor(t, "the control socket", func() bool { _, err := os.Stat(ctl); return err == nil })
		if c, out, errs := run("vm", "create", "b", "--control", ctl, "--snapshot", urlB, "--socket", sockB); c != 0 {
			t.Fatalf("vm create: exit %d, %q, %q", c, out, errs)
		}
		ma, mb := touch(sockA), touch(sockB)
		if _, out, _ := run("vm", "ls", "--control", ctl); !strings.Contains(out, urlA) || !strings.Contains(out, urlB) {
			t.Errorf("vm ls:\n%s", out)
		}
		ma.Exit()
		mb.Exit()
	})
	// The second serve found every chunk in the disk cache the first filled (one cache for
	// both prefixes: their chunks are the same objects).
	if !strings.Contains(logs, `msg="bucket and chunk cache"`) || !regexp.MustCompile(`cache_fetches=0 `).MatchString(logs) {
		t.Errorf("fleet serve log:\n%s", logs)
	}
}
