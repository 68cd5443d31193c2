//go:build linux

package bench

import (
	"os"
	"testing"
	"time"

	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/s3test"
)

// The remote cases end to end at 32 MiB and 1 ms RTT: every case verified, the second VM reads
// nothing from the bucket, the on-demand VM and the fetch case read every chunk. Correctness
// only: timings are not asserted.
func TestRestoreBenchRemoteTiny(t *testing.T) {
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		kerneltest.Require(t, "no /dev/userfaultfd: "+err.Error())
	}
	bin, err := s3test.Binary()
	if err != nil {
		s3test.Require(t, err.Error())
	}
	rep, err := RunRestore(RestoreOptions{Size: 32 << 20, Reps: 1, Seed: 7, Dir: t.TempDir(), Progress: t.Logf,
		Remote: RemoteOptions{RTTs: []time.Duration{time.Millisecond}, Versitygw: bin}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Remote) != 5 {
		t.Fatalf("%d remote results, want 5 (the local reference and 4 at 1 ms)", len(rep.Remote))
	}
	for _, r := range rep.Remote {
		if r.Case != CaseRemoteFetch && (r.Wrong != 0 || r.Verified != r.Pages || r.Pages == 0) {
			t.Errorf("%s: %d of %d pages verified, %d wrong", r.Case, r.Verified, r.Pages, r.Wrong)
		}
	}
	pre, _ := rep.RemoteCase(CaseRemotePrefetch, time.Millisecond)
	second, _ := rep.RemoteCase(CaseRemoteSecond, time.Millisecond)
	od, _ := rep.RemoteCase(CaseRemoteOnDemand, time.Millisecond)
	fetch, _ := rep.RemoteCase(CaseRemoteFetch, time.Millisecond)
	if pre.Prefetched == 0 || pre.BucketBytes == 0 {
		t.Errorf("remote prefetch: %d pages prefetched, %d bytes from the bucket", pre.Prefetched, pre.BucketBytes)
	}
	if second.BucketBytes != 0 || second.Prefetched == 0 {
		t.Errorf("second VM: %d bytes from the bucket (want 0), %d pages prefetched", second.BucketBytes, second.Prefetched)
	}
	if od.BucketBytes < rep.Packed*9/10 || fetch.BucketBytes < rep.Packed*9/10 {
		t.Errorf("on demand %d, fetch %d bytes from the bucket, of a %d-byte snapshot", od.BucketBytes, fetch.BucketBytes, rep.Packed)
	}
}
