// Package snapshot reads and writes packed memory snapshots: a directory holding a raw guest
// memory image cut into fixed-size chunks named by a SHA-256 of their contents, each stored as
// small frames compressed with zstd on their own (with a dictionary sampled from the image), so
// that a read costs one frame, a zero map of the pages that are all zero (never stored), and
// optionally a working set (pages in the order a VM first touched them, laid out contiguously
// in an extent of zstd frames so that prefetching it is one sequential read). FORMAT.md, beside
// this file, documents the layout for people who read or write it without this package.
//
// Writing: [Pack] packs a raw memory file, or a Firecracker diff memory file over a base
// snapshot ([PackOptions].Base), using every core; [WriteWorkingSet] adds a recorded working
// set; [Intersect] merges two recordings. Every file is written to a temp name and renamed, and
// the manifest last, so a crash leaves either a whole snapshot or a directory [Open] refuses
// with [ErrNotSnapshot].
//
// Reading: [Open] validates the manifest and finds every chunk file; [OpenFiles] does the same
// for files from elsewhere ([Files]: a bucket behind a cache). A [*Snapshot] is a
// source.Source and a source.Zeros: ReadAt serves bytes from a bounded LRU cache of
// decompressed frames, each loaded once however many readers want it, and zero pages without
// reading. Every chunk and frame is verified against its hash on every read from disk: a bad
// one is an error naming it ([ChunkError], matching [ErrCorrupt] or [ErrMissing]), never
// bytes. [Snapshot.OpenWorkingSet] streams the working set; once one reader has streamed and
// verified all of it, the snapshot holds it decoded for the readers after it, when it takes at
// most half of the cache bound (which it then counts within). [Unpack], [Verify] and [Inspect] back the faultline snapshot commands.
//
// Chunks live in DIR/chunks, so that copying DIR copies the snapshot, unless the snapshot was
// packed with a shared store ([PackOptions].Store), where snapshots of one host with common
// content (a base and its diffs, VMs of one template) store it once.
package snapshot
