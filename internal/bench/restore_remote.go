//go:build linux

package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/faultline-go/faultline/chunkcache"
	"github.com/faultline-go/faultline/daemon"
	"github.com/faultline-go/faultline/internal/netdelay"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/internal/s3test"
	"github.com/faultline-go/faultline/remote"
	"github.com/faultline-go/faultline/snapshot"
)

// The restore benchmark's remote cases: the packed snapshot (with the working set recorded on
// trace A) pushed to a real S3-compatible server (versitygw, its own process, over a directory
// beside the snapshot), served by the daemon from the bucket through a disk chunk cache, with a
// user-space TCP proxy (internal/netdelay) between the daemon and the server adding a round-trip
// time (netem is not available in this kernel) and optionally capping its bandwidth. For each
// RTT, one run of each case, in this order:
//
//   - remote-prefetch: trace B with the working set prefetched from the bucket (streamed: its
//     frames are installed as they arrive), the disk cache empty;
//   - remote-second-vm: trace B again by a second VM on the host (a new daemon), over the same
//     disk cache: it reads nothing from the bucket;
//   - remote-on-demand: every page of memory touched in order, no prefetch and no warming, the
//     disk cache empty: chunks are fetched for faults and read ahead of them;
//   - local-on-demand (once, before the RTTs): remote-on-demand's touches from the local packed
//     snapshot, for reference;
//   - remote-fetch: no VM: every chunk read through the daemon's read path (remote.Files and
//     the disk cache) by as many goroutines as the engine has fetchers, the disk cache empty:
//     the read throughput from the bucket, without the decompression and installs a VM's
//     restore adds on this 2-core machine.
//
// The first two run as serve does by default: the working set prefetched, and the disk cache
// warmed with the snapshot's chunks in the background from the open on.

// Remote restore cases.
const (
	CaseRemotePrefetch = "remote-prefetch"
	CaseRemoteSecond   = "remote-second-vm"
	CaseRemoteOnDemand = "remote-on-demand"
	CaseRemoteFetch    = "remote-fetch"
	// CaseLocalOnDemand is remote-on-demand's touches served from the local packed snapshot:
	// its reference (RTT 0 in the results).
	CaseLocalOnDemand = "local-on-demand"
)

// remoteFetchers is how many goroutines read chunks in the remote-fetch case: the engine's
// default number of fetchers.
const remoteFetchers = 8

// RemoteOptions add the remote cases to the restore benchmark.
type RemoteOptions struct {
	RTTs      []time.Duration // one set of cases per RTT; none: no remote cases
	Bandwidth int64           // the proxy's cap per direction in bytes/s (0: none)
	Versitygw string          // the server's binary (default: s3test.Binary)
}

// RemoteResult is one remote case at one RTT.
type RemoteResult struct {
	RestoreResult
	RTT time.Duration `json:"rtt_ns"`
	// BucketBytes is what the VM's reads fetched from the bucket: chunk files and the working
	// set's extent (not the manifest, read once when the daemon opens the snapshot).
	BucketBytes int64 `json:"bucket_bytes"`
	Gets        int64 `json:"gets"` // every GET the daemon sent, the manifest's included
	Retries     int64 `json:"retries"`
	Readaheads  int64 `json:"readaheads"`
	Warmed      int64 `json:"warmed"`
	// MBps is BucketBytes over Restore, in 10^6 bytes per second.
	MBps float64 `json:"mb_per_s"`
}

// RemoteTarget is a target of the remote cases at TargetRTT.
const TargetRTT = 5 * time.Millisecond

// Targets of the remote cases (at TargetRTT).
const (
	// RemotePrefetchBound: remote-prefetch's restore time within this factor of the local
	// prefetch's (faultline-prefetch-cold).
	RemotePrefetchBound = 2.0
	// RemoteOnDemandMBps: remote-on-demand reads at least this from the bucket.
	RemoteOnDemandMBps = 300.0
)

// runRemote runs the remote cases into rep.
func (rb *restoreBench) runRemote(rep *RestoreReport, traceB []puppet.TraceRun) error {
	ro := rb.o.Remote
	if len(ro.RTTs) == 0 {
		return nil
	}
	bin := ro.Versitygw
	if bin == "" {
		var err error
		if bin, err = s3test.Binary(); err != nil {
			return err
		}
	}
	data := filepath.Join(rb.dir, "s3")
	if err := os.Mkdir(data, 0o700); err != nil {
		return err
	}
	srv, err := s3test.Launch(bin, data)
	if err != nil {
		return err
	}
	defer srv.Stop()
	creds := credentials.NewStaticV4(srv.Access, srv.Secret, "")
	loc, _ := remote.ParseURL("s3://bench/restore")
	direct, err := remote.New(loc, remote.Config{Endpoint: srv.Endpoint, Credentials: creds})
	if err != nil {
		return err
	}
	rb.o.Progress("remote: pushing the snapshot to versitygw on %s", srv.Endpoint)
	if _, err := remote.Push(context.Background(), rb.snap, direct, remote.PushOptions{}); err != nil {
		return err
	}
	all := sequentialTrace(rb.o.Size / 4096)
	local, err := rb.runWith(CaseLocalOnDemand, all, func(cfg *daemon.Config) { cfg.Record, cfg.NoPrefetch = false, true })
	if err != nil {
		return fmt.Errorf("%s: %w", CaseLocalOnDemand, err)
	}
	rb.o.Progress("%-24s restore %8.1f ms  faults %6d", CaseLocalOnDemand, float64(local.Restore)/1e6, local.Faults)
	rep.Remote = append(rep.Remote, RemoteResult{RestoreResult: local})
	for _, rtt := range ro.RTTs {
		proxy, err := netdelay.Start("127.0.0.1:0", srv.Endpoint[len("http://"):], netdelay.Options{RTT: rtt, Bandwidth: ro.Bandwidth})
		if err != nil {
			return err
		}
		c, err := remote.New(loc, remote.Config{Endpoint: "http://" + proxy.Addr(), Credentials: creds})
		if err != nil {
			proxy.Close()
			return err
		}
		var files *remote.Files
		var cache *chunkcache.Cache
		fresh := func(warm bool) error {
			if files != nil {
				files.Close()
				cache.Close()
				os.RemoveAll(cache.Dir())
			}
			var err error
			cache, err = chunkcache.Open(filepath.Join(rb.dir, fmt.Sprintf("cache-%v", rtt)), 64<<30)
			if err != nil {
				return err
			}
			files = remote.NewFiles(c, cache, remote.FilesOptions{Warm: warm})
			return nil
		}
		err = rb.remoteCases(rep, rtt, c, traceB, all, fresh, func() *remote.Files { return files })
		if files != nil {
			files.Close()
			cache.Close()
			os.RemoveAll(cache.Dir())
		}
		proxy.Close()
		if err != nil {
			return fmt.Errorf("at %v RTT: %w", rtt, err)
		}
	}
	return nil
}

// remoteCases runs the cases at one RTT; fresh makes a new empty disk cache and Files over it.
func (rb *restoreBench) remoteCases(rep *RestoreReport, rtt time.Duration, c *remote.Client, traceB, all []puppet.TraceRun,
	fresh func(warm bool) error, files func() *remote.Files) error {
	const url = "s3://bench/restore"
	for _, name := range []string{CaseRemotePrefetch, CaseRemoteSecond, CaseRemoteOnDemand, CaseRemoteFetch} {
		switch name {
		case CaseRemotePrefetch:
			if err := fresh(true); err != nil {
				return err
			}
		case CaseRemoteOnDemand, CaseRemoteFetch:
			if err := fresh(false); err != nil {
				return err
			}
		}
		f := files()
		st0, fs0 := c.Stats(), f.Stats()
		var res RestoreResult
		var err error
		switch name {
		case CaseRemoteFetch:
			res, err = fetchAll(rb.snap, f)
		default:
			trace := traceB
			if name == CaseRemoteOnDemand {
				trace = all
			}
			// The daemon serves the snapshot opened from the bucket (as serve does), closed
			// after it.
			var snap *snapshot.Snapshot
			if snap, err = snapshot.OpenFiles(context.Background(), url, f, snapshot.Options{CacheSize: rb.o.CacheSize}); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			res, err = rb.runWith(name, trace, func(cfg *daemon.Config) {
				cfg.Snapshot, cfg.MemFile, cfg.Source, cfg.Record = "", "", snap, false
				cfg.NoPrefetch = name == CaseRemoteOnDemand
			})
			snap.Close()
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		st, fs := c.Stats(), f.Stats()
		r := RemoteResult{RestoreResult: res, RTT: rtt, Gets: st.Gets - st0.Gets, Retries: st.Retries - st0.Retries,
			BucketBytes: fs.ChunkBytes + fs.ExtentBytes - fs0.ChunkBytes - fs0.ExtentBytes,
			Readaheads:  fs.Readaheads - fs0.Readaheads, Warmed: fs.Warmed - fs0.Warmed}
		if res.Restore > 0 {
			r.MBps = float64(r.BucketBytes) / 1e6 / res.Restore.Seconds()
		}
		rb.o.Progress("rtt %-5v %-18s restore %8.1f ms  faults %6d  bucket %7.1f MiB in %4d GETs  %6.0f MB/s",
			rtt, name, float64(res.Restore)/1e6, res.Faults, float64(r.BucketBytes)/(1<<20), r.Gets, r.MBps)
		rep.Remote = append(rep.Remote, r)
	}
	return nil
}

// fetchAll reads every chunk file of the snapshot in dir through f, remoteFetchers at a time.
func fetchAll(dir string, f *remote.Files) (RestoreResult, error) {
	res := RestoreResult{Case: CaseRemoteFetch}
	m, err := snapshot.ReadManifest(dir)
	if err != nil {
		return res, err
	}
	start := time.Now()
	if _, err := f.Manifest(context.Background()); err != nil {
		return res, err
	}
	work := make(chan int)
	errs := make(chan error, remoteFetchers)
	var wg sync.WaitGroup
	for range remoteFetchers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				file, err := f.Chunk(context.Background(), m.ChunkFileName(i), m.Chunks[i].Stored)
				if err != nil {
					errs <- err
					return
				}
				file.Close()
			}
		}()
	}
	for i, c := range m.Chunks {
		if c.Enc != snapshot.EncZero {
			work <- i
		}
	}
	close(work)
	wg.Wait()
	res.Restore = time.Since(start)
	select {
	case err := <-errs:
		return res, err
	default:
	}
	return res, nil
}

// sequentialTrace touches every page of a guest of pages 4 KiB pages in order, reads only, in
// runs of 16 pages (the threads take turns: run i on thread i % threads).
func sequentialTrace(pages int) []puppet.TraceRun {
	var t []puppet.TraceRun
	for p := 0; p < pages; p += 16 {
		t = append(t, puppet.TraceRun{Page: p, Count: min(16, pages-p)})
	}
	return t
}

// RemoteCase returns the result of case name at rtt.
func (r *RestoreReport) RemoteCase(name string, rtt time.Duration) (RemoteResult, bool) {
	for _, x := range r.Remote {
		if x.Case == name && x.RTT == rtt {
			return x, true
		}
	}
	return RemoteResult{}, false
}

// RemoteVerdict is one remote target's figure and whether it is met.
type RemoteVerdict struct {
	Name   string
	Value  float64
	Unit   string
	Target string
	Met    bool
}

// RemoteVerdicts are the remote targets' figures at TargetRTT (none if it was not measured).
func (r *RestoreReport) RemoteVerdicts() []RemoteVerdict {
	var out []RemoteVerdict
	if pre, ok := r.RemoteCase(CaseRemotePrefetch, TargetRTT); ok {
		if local, ok := r.Median(CasePrefetchCold); ok && local.Restore > 0 {
			x := float64(pre.Restore) / float64(local.Restore)
			out = append(out, RemoteVerdict{fmt.Sprintf("remote prefetch at %v RTT vs local prefetch: time ratio", TargetRTT), x, "x",
				fmt.Sprintf("<= %.1fx", RemotePrefetchBound), x <= RemotePrefetchBound})
		}
	}
	if od, ok := r.RemoteCase(CaseRemoteFetch, TargetRTT); ok {
		out = append(out, RemoteVerdict{fmt.Sprintf("on-demand read from the bucket at %v RTT (remote-fetch)", TargetRTT), od.MBps, "MB/s",
			fmt.Sprintf(">= %.0f MB/s", RemoteOnDemandMBps), od.MBps >= RemoteOnDemandMBps})
	}
	if sv, ok := r.RemoteCase(CaseRemoteSecond, TargetRTT); ok {
		out = append(out, RemoteVerdict{fmt.Sprintf("second VM of the snapshot at %v RTT: bytes from the bucket", TargetRTT),
			float64(sv.BucketBytes), "B", "= 0", sv.BucketBytes == 0})
	}
	return out
}
