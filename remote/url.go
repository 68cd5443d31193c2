package remote

import (
	"fmt"
	"path"
	"strings"
)

// ChunksPrefix is where a bucket keeps the chunks of all its snapshots.
const ChunksPrefix = "chunks/"

// A Location is a snapshot's place in object storage: s3://Bucket/Prefix.
type Location struct {
	Bucket string
	Prefix string // without leading or trailing "/"; "" for the bucket's root
}

// IsURL reports whether s names a snapshot in object storage (starts with s3://).
func IsURL(s string) bool { return strings.HasPrefix(s, "s3://") }

// ParseURL parses s3://BUCKET/PREFIX. The prefix may be empty (the snapshot at the bucket's
// root) but may not be, or start with, the chunk namespace ("chunks").
func ParseURL(s string) (Location, error) {
	rest, ok := strings.CutPrefix(s, "s3://")
	if !ok {
		return Location{}, fmt.Errorf("remote: %q: want s3://BUCKET/PREFIX", s)
	}
	bucket, prefix, _ := strings.Cut(rest, "/")
	if err := checkBucket(bucket); err != nil {
		return Location{}, fmt.Errorf("remote: %q: %w", s, err)
	}
	prefix = strings.Trim(prefix, "/")
	if prefix != "" {
		if c := path.Clean(prefix); c != prefix || strings.HasPrefix(c, "../") || c == ".." {
			return Location{}, fmt.Errorf("remote: %q: prefix %q is not clean", s, prefix)
		}
	}
	if prefix+"/" == ChunksPrefix || strings.HasPrefix(prefix+"/", ChunksPrefix) {
		return Location{}, fmt.Errorf("remote: %q: the prefix %q is the bucket's chunk namespace", s, ChunksPrefix)
	}
	return Location{Bucket: bucket, Prefix: prefix}, nil
}

// checkBucket applies S3's bucket naming rules (3–63 of a-z, 0-9, '.', '-'; starts and ends
// with a letter or digit).
func checkBucket(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("bucket name %q: want 3 to 63 characters", b)
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (c != '.' && c != '-' || i == 0 || i == len(b)-1) {
			return fmt.Errorf("bucket name %q: lowercase letters, digits, '.' and '-' only, a letter or digit at each end", b)
		}
	}
	return nil
}

func (l Location) String() string {
	if l.Prefix == "" {
		return "s3://" + l.Bucket
	}
	return "s3://" + l.Bucket + "/" + l.Prefix
}

// Key is the object key of name under the location's prefix.
func (l Location) Key(name string) string {
	if l.Prefix == "" {
		return name
	}
	return l.Prefix + "/" + name
}

// ChunkKey is the object key of a chunk file (its FORMAT.md name) of size bytes: the name with
// "-SIZE" before its extension, under chunks/. The size is part of the key because one chunk
// (one hash) may be stored in files of different sizes (packed at other zstd levels): each
// encoding has its own object, and a key always holds the one encoding a manifest expects.
func ChunkKey(name string, size int64) string { return ChunksPrefix + sizedName(name, size) }

// sizedName is name with "-SIZE" inserted before its extension.
func sizedName(name string, size int64) string {
	stem, ext := name, ""
	if i := strings.LastIndexByte(name, '.'); i > 0 {
		stem, ext = name[:i], name[i:]
	}
	return fmt.Sprintf("%s-%d%s", stem, size, ext)
}
