//go:build linux

package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/faultline-go/faultline/internal/s3test"
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
