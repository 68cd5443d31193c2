package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/faultline-go/faultline/remote"
	"github.com/faultline-go/faultline/snapshot"
)

func init() {
	register(&Command{
		Name:    "push",
		Summary: "upload a packed snapshot to an S3-compatible bucket (s3://BUCKET/PREFIX)",
		Run:     runPush,
	})
}

// s3EndpointUsage is the --s3-endpoint flag's help, shared by push and serve.
const s3EndpointUsage = "URL of an S3-compatible server (path-style addressing); default AWS_ENDPOINT_URL, else AWS S3. " +
	"Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the shared credentials file; region AWS_REGION"

func runPush(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("push", "DIR s3://BUCKET/PREFIX [--s3-endpoint URL] [--parallel N]\n\n"+
		"Push uploads the packed snapshot in DIR (faultline pack) to the bucket: the chunks the bucket\n"+
		"lacks (chunks are shared by all the bucket's snapshots, under chunks/, named by their hash),\n"+
		"then the working set, then the manifest last, so an interrupted push leaves no snapshot that\n"+
		"looks whole; running it again finishes it. It creates the bucket if it is missing.", stderr)
	endpoint := fs.String("s3-endpoint", "", s3EndpointUsage)
	parallel := fs.Int("parallel", 8, "uploads in flight")
	pos, code, ok := parseInterspersed(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 2 || !remote.IsURL(pos[1]) {
		fmt.Fprintln(stderr, "faultline push: want DIR and s3://BUCKET/PREFIX")
		fs.Usage()
		return 2
	}
	c, err := newRemoteClient(pos[1], *endpoint)
	if err != nil {
		fmt.Fprintln(stderr, "faultline push:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	o := remote.PushOptions{Parallel: *parallel}
	progress, finish := newProgress(stderr, "uploading")
	o.Progress = progress
	st, err := remote.Push(ctx, pos[0], c, o)
	finish()
	if err != nil {
		fmt.Fprintln(stderr, "faultline push:", err)
		return 1
	}
	if st.BucketCreated {
		fmt.Fprintf(stdout, "created bucket %s\n", c.Location().Bucket)
	}
	secs := st.Elapsed.Seconds()
	fmt.Fprintf(stdout, "pushed %s to %s: %d objects uploaded (%s), %d already there (%s); %.2fs, %.0f MB/s\n",
		pos[0], c.Location(), st.Uploaded, snapshot.FormatBytes(st.UploadedBytes), st.Skipped,
		snapshot.FormatBytes(st.SkippedBytes), secs, float64(st.UploadedBytes)/1e6/max(secs, 1e-9))
	return 0
}

// newRemoteClient makes the client of a snapshot URL, the endpoint from the flag or the AWS
// configuration.
func newRemoteClient(url, endpoint string) (*remote.Client, error) {
	loc, err := remote.ParseURL(url)
	if err != nil {
		return nil, err
	}
	return remote.New(loc, remote.Config{Endpoint: endpoint})
}

// newProgress returns a progress callback drawing a bar of bytes on stderr when it is a
// terminal (a no-op otherwise), and the function that ends it.
func newProgress(stderr io.Writer, what string) (progress func(done, total int64), finish func()) {
	f, ok := stderr.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, func() {}
	}
	bar := progressbar.NewOptions64(-1, progressbar.OptionSetWriter(stderr),
		progressbar.OptionShowBytes(true), progressbar.OptionSetDescription(what),
		progressbar.OptionClearOnFinish(), progressbar.OptionThrottle(100e6))
	return func(done, total int64) {
		bar.ChangeMax64(total)
		bar.Set64(done)
	}, func() { bar.Finish() }
}
