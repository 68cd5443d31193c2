// Package chunkcache is a bounded cache of named, immutable files on local disk: the chunk
// files (and working-set extents) of snapshots kept in object storage, shared by every snapshot
// and VM of a host. Names are content addresses (a chunk is named by the SHA-256 of its bytes),
// so one file serves every snapshot that has that chunk, whichever bucket or prefix it came from.
//
// A [Cache] owns its directory while open (an exclusive flock on DIR/.lock: a second process
// opening the same directory gets an error, not a shared cache whose bound nobody keeps). It
// holds at most its limit in bytes of files that nobody has open, evicting the least recently
// used (by access while open; across restarts by the files' mtimes, renewed on a hit at most
// once a minute); files open by a reader are never removed under it and count towards the
// bound until closed. Opening a file that is missing fetches it once, however many readers ask for it at
// the same time (single flight): the first caller's fetch writes a temporary file, which is
// renamed into place when it is whole, and the others wait for that fetch.
//
// Crash safety: a name only ever holds a file that was written whole to a temporary name first.
// Files are not fsynced (that would cost a disk flush per chunk fetched); after a power failure
// a file may therefore have its length but not its bytes. Its size is checked on every open,
// and its contents are checked by the reader (a chunk's hash is verified on every read): a
// reader that finds a file bad calls [Cache.Forget], which deletes it, and the next open fetches
// it again.
package chunkcache
