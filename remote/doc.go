// Package remote keeps packed snapshots (package snapshot, FORMAT.md "In object storage") in an
// S3-compatible bucket and reads them back through a local disk cache (package chunkcache).
//
// A snapshot in a bucket is named by a URL, s3://BUCKET/PREFIX ([ParseURL]). Its manifest and
// working-set extent live under PREFIX; its chunks live under chunks/ at the bucket's root, a
// namespace shared by every snapshot of the bucket: a chunk is named by its hash, so a second
// snapshot of the same template uploads only the chunks the first lacks ([Push]).
//
// [New] makes a [Client] from a [Config]: an endpoint (path-style addressing, for S3-compatible
// servers) or the standard AWS configuration (AWS_ENDPOINT_URL, AWS_REGION, the credentials
// environment variables and shared credentials file). Every request it makes is retried on
// transient failures (5xx, SlowDown, connection resets and refusals, timeouts) with exponential
// backoff and jitter, abandoned when it makes no progress for a while, and stopped by its
// context. Errors say what failed: a missing object matches snapshot.ErrMissing, a request that
// kept failing snapshot.ErrTransient, refused credentials [ErrAccess].
//
// [Files] is a snapshot.Files over a bucket: the snapshot package reads a remote snapshot
// through it, chunks fetched whole (one GET each) into the disk cache, the working set
// streamed from its first byte while it is cached.
package remote
