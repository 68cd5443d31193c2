package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/faultline-go/faultline/snapshot"
)

// ErrAccess: the server refused the credentials (or they are missing, or lack a permission).
// Not retried: it will not get better by itself.
var ErrAccess = errors.New("access denied")

// Config says where the bucket's server is and how to talk to it. The zero Config uses the
// standard AWS configuration.
type Config struct {
	// Endpoint is the server's URL (http://127.0.0.1:7070), addressed path-style, as
	// S3-compatible servers expect. "" takes AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS
	// S3 itself.
	Endpoint string
	// Region, "" for AWS_REGION, AWS_DEFAULT_REGION, else us-east-1.
	Region string
	// Credentials, if nil: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else the
	// shared credentials file (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, profile
	// AWS_PROFILE or default).
	Credentials *credentials.Credentials
	// Attempts is how many times a request is tried before its error is returned (default 10:
	// with the backoff below, about 15 s of trying).
	Attempts int
	// Backoff is the first retry's wait (default 50 ms), doubled after each failure up to
	// MaxBackoff (default 2 s); each wait is drawn uniformly from [wait/2, wait] (jitter, so that
	// many clients do not retry in step).
	Backoff, MaxBackoff time.Duration
	// Stall abandons (and retries) a request that gets no response, or no body bytes, for this
	// long (default 10 s).
	Stall time.Duration
	// MaxConns bounds the connections kept open to the server (default 64): enough for the
	// chunks a daemon fetches at once.
	MaxConns int
}

func (c *Config) defaults() {
	if c.Attempts <= 0 {
		c.Attempts = 10
	}
	if c.Backoff <= 0 {
		c.Backoff = 50 * time.Millisecond
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = 2 * time.Second
	}
	if c.Stall <= 0 {
		c.Stall = 10 * time.Second
	}
	if c.MaxConns <= 0 {
		c.MaxConns = 64
	}
}

// A Client reads and writes one location's objects. It is safe for concurrent use.
type Client struct {
	loc    Location
	cfg    Config
	region string
	mc     *minio.Client
	st     stats
}

type stats struct {
	gets, getBytes, puts, putBytes, retries, lists atomic.Int64
}

// Stats counts a Client's requests since New.
type Stats struct {
	Gets     int64 // GET requests answered (each attempt)
	GetBytes int64 // body bytes received
	Puts     int64
	PutBytes int64
	Lists    int64
	Retries  int64 // attempts that failed and were tried again
}

// Stats returns the client's counters.
func (c *Client) Stats() Stats {
	return Stats{Gets: c.st.gets.Load(), GetBytes: c.st.getBytes.Load(), Puts: c.st.puts.Load(),
		PutBytes: c.st.putBytes.Load(), Lists: c.st.lists.Load(), Retries: c.st.retries.Load()}
}

// url is key's s3:// URL, for errors.
func (c *Client) url(key string) string { return "s3://" + c.loc.Bucket + "/" + key }

// Location is where the client's snapshot is.
func (c *Client) Location() Location { return c.loc }

// New makes a client for loc. It does not talk to the server; [Client.Check] does.
func New(loc Location, cfg Config) (*Client, error) {
	cfg.defaults()
	endpoint := cfg.Endpoint
	explicit := endpoint != ""
	for _, v := range []string{"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} {
		if endpoint == "" {
			endpoint, explicit = os.Getenv(v), true
		}
	}
	if endpoint == "" {
		endpoint, explicit = "https://s3.amazonaws.com", false
	}
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return nil, fmt.Errorf("remote: endpoint %q: want http(s)://HOST[:PORT]", endpoint)
	}
	region := cfg.Region
	for _, v := range []string{"AWS_REGION", "AWS_DEFAULT_REGION"} {
		if region == "" {
			region = os.Getenv(v)
		}
	}
	if region == "" {
		region = "us-east-1"
	}
	creds := cfg.Credentials
	if creds == nil {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.FileAWSCredentials{},
		})
	}
	lookup := minio.BucketLookupAuto
	if explicit {
		lookup = minio.BucketLookupPath
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: cfg.Stall, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:          cfg.MaxConns,
		MaxIdleConnsPerHost:   cfg.MaxConns,
		MaxConnsPerHost:       cfg.MaxConns,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   cfg.Stall,
		ResponseHeaderTimeout: cfg.Stall,
		ExpectContinueTimeout: time.Second,
		// Chunks are compressed already; a gzip'ed response would cost CPU for nothing.
		DisableCompression: true,
		WriteBufferSize:    256 << 10,
		ReadBufferSize:     256 << 10,
	}
	mc, err := minio.New(u.Host, &minio.Options{
		Creds:        creds,
		Secure:       u.Scheme == "https",
		Transport:    tr,
		Region:       region,
		BucketLookup: lookup,
		MaxRetries:   1, // the retries are ours (retry below), so they are counted and bounded in one place
	})
	if err != nil {
		return nil, fmt.Errorf("remote: %w", err)
	}
	return &Client{loc: loc, cfg: cfg, region: region, mc: mc}, nil
}

// Check makes sure the credentials are there and the server takes them, and reports whether
// the bucket exists: the error a daemon should give at start, not at its first fault.
func (c *Client) Check(ctx context.Context) (bucketExists bool, err error) {
	v, err := c.mc.GetCreds()
	if err != nil || v.AccessKeyID == "" || v.SecretAccessKey == "" {
		return false, fmt.Errorf("remote: %s: %w: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in the shared credentials file)", c.loc, ErrAccess)
	}
	err = c.retry(ctx, "check bucket "+c.loc.Bucket, func(ctx context.Context) error {
		var err error
		bucketExists, err = c.mc.BucketExists(ctx, c.loc.Bucket)
		return err
	})
	if errors.Is(err, ErrAccess) {
		return false, fmt.Errorf("%w (the server refused access key %q: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the shared credentials file)", err, v.AccessKeyID)
	}
	if err != nil {
		return false, err
	}
	if !bucketExists {
		return false, nil
	}
	// HEAD bucket may succeed without the right to read objects; a listing of one key proves
	// the credentials work for this prefix (and a missing manifest is the caller's to report).
	err = c.retry(ctx, "list "+c.loc.String(), func(ctx context.Context) error {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		for o := range c.mc.ListObjects(ctx, c.loc.Bucket, minio.ListObjectsOptions{Prefix: c.loc.Key(""), MaxKeys: 1}) {
			return o.Err
		}
		return nil
	})
	if errors.Is(err, ErrAccess) {
		return true, fmt.Errorf("%w (access key %q may not read %s)", err, v.AccessKeyID, c.loc)
	}
	return true, err
}

// EnsureBucket creates the bucket if it does not exist.
func (c *Client) EnsureBucket(ctx context.Context) (created bool, err error) {
	exists, err := c.Check(ctx)
	if err != nil || exists {
		return false, err
	}
	err = c.retry(ctx, "create bucket "+c.loc.Bucket, func(ctx context.Context) error {
		err := c.mc.MakeBucket(ctx, c.loc.Bucket, minio.MakeBucketOptions{Region: c.region})
		if code := minio.ToErrorResponse(err).Code; code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" {
			return nil // a concurrent push made it
		}
		return err
	})
	return err == nil, err
}

// List returns the size of every object whose key starts with prefix, by key.
func (c *Client) List(ctx context.Context, prefix string) (map[string]int64, error) {
	var out map[string]int64
	err := c.retry(ctx, "list "+prefix, func(ctx context.Context) error {
		c.st.lists.Add(1)
		out = map[string]int64{}
		for o := range c.mc.ListObjects(ctx, c.loc.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if o.Err != nil {
				return o.Err
			}
			out[o.Key] = o.Size
		}
		return nil
	})
	return out, err
}

// Put uploads b as key.
func (c *Client) Put(ctx context.Context, key string, b []byte) error {
	return c.retry(ctx, "put "+key, func(ctx context.Context) error {
		c.st.puts.Add(1)
		_, err := c.mc.PutObject(ctx, c.loc.Bucket, key, bytes.NewReader(b), int64(len(b)),
			minio.PutObjectOptions{ContentType: "application/octet-stream", DisableContentSha256: true})
		if err == nil {
			c.st.putBytes.Add(int64(len(b)))
		}
		return err
	})
}

// PutFile uploads the file at path as key.
func (c *Client) PutFile(ctx context.Context, key, path string) error {
	return c.retry(ctx, "put "+key, func(ctx context.Context) error {
		f, err := os.Open(path)
		if err != nil {
			return permanent{err}
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return permanent{err}
		}
		c.st.puts.Add(1)
		_, err = c.mc.PutObject(ctx, c.loc.Bucket, key, f, fi.Size(),
			minio.PutObjectOptions{ContentType: "application/octet-stream", DisableContentSha256: true})
		if err == nil {
			c.st.putBytes.Add(fi.Size())
		}
		return err
	})
}

// GetBytes returns the object key's bytes.
func (c *Client) GetBytes(ctx context.Context, key string) ([]byte, error) {
	var buf bytes.Buffer
	if err := c.Get(ctx, key, -1, &buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Get writes the object key to w, from its first byte. size is the object's expected length
// (-1: whatever it is); a different one is an error matching snapshot.ErrCorrupt. A body cut
// short is resumed where it broke (a ranged GET), so w sees every byte once, in order.
func (c *Client) Get(ctx context.Context, key string, size int64, w io.Writer) error {
	r := c.Open(ctx, key, size)
	defer r.Close()
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	_, err := io.CopyBuffer(w, onlyReader{r}, *bp)
	return err
}

// copyBufs are Get's copy buffers: large, so that a chunk takes few read and write calls.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// onlyReader hides anything but Read (io.CopyBuffer would use a WriterTo or ReaderFrom instead
// of the buffer).
type onlyReader struct{ io.Reader }

// Open returns a stream of the object key from its first byte; the GET is sent at the first
// Read. A failed request, or a body cut short, is retried (from where it broke) as Get says;
// Read returns the error that outlived the retries.
func (c *Client) Open(ctx context.Context, key string, size int64) io.ReadCloser {
	return &reader{c: c, ctx: ctx, key: key, size: size}
}

// reader is a resuming GET: it reads the body of one request and, when that fails part way,
// sends another for the rest (Range: bytes=off-).
type reader struct {
	c    *Client
	ctx  context.Context
	key  string
	size int64 // expected length, -1 unknown (then learnt from the first response)
	off  int64 // bytes returned so far
	// broken counts the bodies in a row that broke before giving a byte: bounded like the
	// attempts of one request.
	broken int

	body   io.ReadCloser
	cancel context.CancelFunc
	stall  *time.Timer
	err    error // sticky
}

func (r *reader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	for {
		if r.body == nil {
			if err := r.c.retry(r.ctx, "get "+r.c.url(r.key), r.start); err != nil {
				r.err = err
				return 0, err
			}
		}
		n, err := r.body.Read(p)
		if n > 0 {
			r.broken = 0
			r.stall.Reset(r.c.cfg.Stall)
			r.off += int64(n)
			r.c.st.getBytes.Add(int64(n))
			if r.off > r.size {
				r.drop()
				r.err = fmt.Errorf("remote: get %s: %w: longer than the %d bytes expected", r.c.url(r.key), snapshot.ErrCorrupt, r.size)
				return 0, r.err
			}
		}
		switch {
		case err == nil:
			return n, nil
		case err == io.EOF && r.off == r.size:
			r.drop()
			r.err = io.EOF
			return n, io.EOF
		}
		// A broken body: resume with a new request, unless the caller is gone.
		r.drop()
		if cerr := r.ctx.Err(); cerr != nil {
			r.err = fmt.Errorf("remote: get %s: %w: %w", r.c.url(r.key), snapshot.ErrTransient, cerr)
			return n, r.err
		}
		if n == 0 {
			if r.broken++; r.broken >= r.c.cfg.Attempts {
				r.err = fmt.Errorf("remote: get %s: %w: the body broke at byte %d %d times in a row: %w", r.c.url(r.key), snapshot.ErrTransient, r.off, r.broken, err)
				return 0, r.err
			}
		}
		r.c.st.retries.Add(1)
		if n > 0 {
			return n, nil
		}
	}
}

// start sends one GET for the bytes from r.off on (one attempt, for retry).
func (r *reader) start(ctx context.Context) error {
	actx, cancel := context.WithCancel(ctx)
	stall := time.AfterFunc(r.c.cfg.Stall, cancel)
	var opts minio.GetObjectOptions
	if r.off > 0 {
		if err := opts.SetRange(r.off, 0); err != nil {
			stall.Stop()
			cancel()
			return permanent{err}
		}
	}
	r.c.st.gets.Add(1)
	body, info, _, err := minio.Core{Client: r.c.mc}.GetObject(actx, r.c.loc.Bucket, r.key, opts)
	if err != nil {
		stalled := actx.Err() != nil && ctx.Err() == nil
		stall.Stop()
		cancel()
		if stalled {
			return fmt.Errorf("no response within %v: %w", r.c.cfg.Stall, err)
		}
		return err
	}
	total := info.Size + r.off
	if r.size < 0 {
		r.size = total
	} else if total != r.size {
		body.Close()
		stall.Stop()
		cancel()
		return permanent{fmt.Errorf("%w: object has %d bytes, want %d", snapshot.ErrCorrupt, total, r.size)}
	}
	r.body, r.cancel, r.stall = body, cancel, stall
	return nil
}

func (r *reader) drop() {
	if r.body != nil {
		r.body.Close()
		r.stall.Stop()
		r.cancel()
		r.body = nil
	}
}

func (r *reader) Close() error {
	r.drop()
	if r.err == nil {
		r.err = errors.New("remote: read after close")
	}
	return nil
}

// permanent marks an error that retrying cannot cure.
type permanent struct{ err error }

func (p permanent) Error() string { return p.err.Error() }
func (p permanent) Unwrap() error { return p.err }

// retry runs op until it succeeds, fails for good, or the attempts run out; it returns an error
// naming what and matching snapshot.ErrMissing, ErrAccess or snapshot.ErrTransient.
func (c *Client) retry(ctx context.Context, what string, op func(context.Context) error) error {
	wait := c.cfg.Backoff
	var err error
	for attempt := 1; ; attempt++ {
		if cerr := ctx.Err(); cerr != nil {
			return fmt.Errorf("remote: %s: %w: %w", what, snapshot.ErrTransient, cerr)
		}
		err = op(ctx)
		if err == nil {
			return nil
		}
		kind := classify(err)
		if ctx.Err() != nil {
			kind = snapshot.ErrTransient
		} else if kind == errRetry && attempt < c.cfg.Attempts {
			c.st.retries.Add(1)
			d := wait/2 + rand.N(wait/2+1)
			wait = min(2*wait, c.cfg.MaxBackoff)
			t := time.NewTimer(d)
			select {
			case <-t.C:
				continue
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("remote: %s: %w: %w (after %v)", what, snapshot.ErrTransient, ctx.Err(), err)
			}
		}
		if kind == errRetry {
			return fmt.Errorf("remote: %s: %w after %d attempts: %w", what, snapshot.ErrTransient, attempt, err)
		}
		if errors.Is(err, kind) {
			return fmt.Errorf("remote: %s: %w", what, err)
		}
		return fmt.Errorf("remote: %s: %w: %w", what, kind, err)
	}
}

// errRetry is classify's answer for an error worth another attempt.
var errRetry = errors.New("retry")

// classify says what err is: errRetry (transient: try again), snapshot.ErrMissing, ErrAccess,
// snapshot.ErrCorrupt, or errPermanent for the rest.
func classify(err error) error {
	var p permanent
	switch {
	case errors.As(err, &p):
		for _, k := range []error{snapshot.ErrCorrupt, snapshot.ErrMissing, ErrAccess} {
			if errors.Is(err, k) {
				return k
			}
		}
		return errPermanent
	case errors.Is(err, snapshot.ErrCorrupt):
		return snapshot.ErrCorrupt
	}
	var resp minio.ErrorResponse
	if errors.As(err, &resp) {
		switch resp.Code {
		case "NoSuchKey", "NoSuchBucket", "NotFound":
			return snapshot.ErrMissing
		case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccountProblem", "AllAccessDisabled":
			return ErrAccess
		case "SlowDown", "SlowDownRead", "SlowDownWrite", "Throttling", "ThrottlingException", "RequestTimeout",
			"RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "RequestError":
			return errRetry
		}
		switch s := resp.StatusCode; {
		case s == http.StatusNotFound:
			return snapshot.ErrMissing
		case s == http.StatusForbidden || s == http.StatusUnauthorized:
			return ErrAccess
		case s >= 500, s == http.StatusTooManyRequests, s == http.StatusRequestTimeout:
			return errRetry
		case s != 0:
			return errPermanent
		}
	}
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNABORTED),
		errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF), errors.Is(err, context.Canceled),
		errors.Is(err, context.DeadlineExceeded):
		// A cancelled context of our own (a stall) lands here; the caller's is checked first.
		return errRetry
	case errors.As(err, &ne):
		return errRetry
	case strings.Contains(err.Error(), "connection reset"), strings.Contains(err.Error(), "server closed idle connection"),
		strings.Contains(err.Error(), "broken pipe"):
		return errRetry
	}
	return errPermanent
}

// errPermanent: an error none of the sentinels describe (a bad request, say). Not retried.
var errPermanent = errors.New("request failed")
