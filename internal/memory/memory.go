// Package memory maps the kinds of memory userfaultfd distinguishes — anonymous, shmem (shared
// or private mapping of a memfd) and hugetlbfs (shared or private) — so that probes, tests and
// benchmarks exercise each the same way.
package memory

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"
)

// Kind is a kind of memory as userfaultfd sees it.
type Kind int

const (
	Anon           Kind = iota // MAP_PRIVATE|MAP_ANONYMOUS
	Shmem                      // memfd, MAP_SHARED
	ShmemPrivate               // memfd, MAP_PRIVATE
	Hugetlb                    // memfd MFD_HUGETLB (default huge page size), MAP_SHARED
	HugetlbPrivate             // memfd MFD_HUGETLB, MAP_PRIVATE
)

// Kinds lists every kind, in the order the kernel selftests use.
var Kinds = []Kind{Anon, Shmem, ShmemPrivate, Hugetlb, HugetlbPrivate}

var kindNames = []string{"anon", "shmem", "shmem-private", "hugetlb", "hugetlb-private"}

func (k Kind) String() string {
	if k >= 0 && int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// ParseKind parses a name as String prints it.
func ParseKind(s string) (Kind, error) {
	for i, n := range kindNames {
		if n == s {
			return Kind(i), nil
		}
	}
	return 0, fmt.Errorf("unknown memory kind %q (want one of %s)", s, strings.Join(kindNames, ", "))
}

// Huge reports whether k is hugetlbfs memory.
func (k Kind) Huge() bool { return k == Hugetlb || k == HugetlbPrivate }

// Shared reports whether k is a MAP_SHARED mapping.
func (k Kind) Shared() bool { return k == Shmem || k == Hugetlb }

// FileBacked reports whether k has a memfd behind it (shmem and hugetlb kinds).
func (k Kind) FileBacked() bool { return k != Anon }

// Area is a mapping of one kind. For file-backed kinds, File is the memfd behind it, and Alias
// (when asked for) a second shared mapping of the same pages that is never registered: the
// kernel selftests fill and inspect pages through it.
type Area struct {
	Kind     Kind
	Mem      []byte
	Alias    []byte
	File     *os.File
	PageSize int
}

// Addr is the start address of the mapping.
func (a *Area) Addr() uintptr { return uintptr(unsafe.Pointer(&a.Mem[0])) }

// AliasAddr is the start address of the alias, or 0.
func (a *Area) AliasAddr() uintptr {
	if a.Alias == nil {
		return 0
	}
	return uintptr(unsafe.Pointer(&a.Alias[0]))
}

// HugePageSize is the default hugetlb page size in bytes, from /proc/meminfo.
func HugePageSize() (int, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Hugepagesize:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				n, err := strconv.Atoi(f[0])
				return n << 10, err
			}
		}
	}
	return 0, fmt.Errorf("no Hugepagesize in /proc/meminfo")
}

// PageSize is the page size of kind k.
func PageSize(k Kind) (int, error) {
	if k.Huge() {
		return HugePageSize()
	}
	return os.Getpagesize(), nil
}

// HugePages is the state of the default-size hugetlb pool.
type HugePages struct {
	Size, Total, Free int
}

// ReadHugePages reads the default hugetlb pool from /proc/meminfo.
func ReadHugePages() (HugePages, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return HugePages{}, err
	}
	var h HugePages
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "HugePages_Total:":
			h.Total = n
		case "HugePages_Free:":
			h.Free = n
		case "Hugepagesize:":
			h.Size = n << 10
		}
	}
	return h, nil
}
