//go:build linux

package engine_test

import (
	"context"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/internal/kerneltest"
	"github.com/faultline-go/faultline/internal/memory"
	"github.com/faultline-go/faultline/internal/puppet"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// requireKernel fails under FAULTLINE_REQUIRE_KERNEL=1 (CI) and skips otherwise.
func requireKernel(t testing.TB, why string) { t.Helper(); kerneltest.Require(t, why) }

// needHugePages reserves n free huge pages for the test (see kerneltest.HugePages).
func needHugePages(t testing.TB, n int) { t.Helper(); kerneltest.HugePages(t, n) }

// vm is a puppet child playing the VMM: memory of one kind, registered on a uffd it created
// and sent over, as Firecracker does.
type vm struct {
	t        testing.TB
	p        *puppet.Puppet
	area     int
	addr     uintptr
	size     int
	pageSize int
	fd       *uffd.FD
}

func newVM(t testing.TB, kind memory.Kind, size int, features uffd.Feature, mode uffd.RegisterMode) *vm {
	t.Helper()
	if kind.Huge() {
		needHugePages(t, size/(2<<20)+8)
	}
	return startVM(t, kind, size, features, mode)
}

// startVM is newVM without reserving huge pages: hugetlb areas are mapped MAP_NORESERVE and need
// none until touched.
func startVM(t testing.TB, kind memory.Kind, size int, features uffd.Feature, mode uffd.RegisterMode) *vm {
	t.Helper()
	p, err := puppet.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	v := &vm{t: t, p: p}
	rep, fds, err := p.Do(puppet.Request{Op: "map", Kind: kind.String(), Size: size})
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	v.area, v.addr, v.size, v.pageSize = rep.Area, uintptr(rep.Addr), rep.Size, rep.PageSize
	_, fds, err = p.Do(puppet.Request{Op: "uffd", Features: uint64(features)})
	if err != nil || len(fds) != 1 {
		t.Fatalf("uffd: %v (%d fds)", err, len(fds))
	}
	if v.fd, err = uffd.NewFD(fds[0], false); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.Do(puppet.Request{Op: "register", Area: v.area, Mode: uint64(mode)}); err != nil {
		t.Fatal(err)
	}
	return v
}

// region describes the whole VM area served from src at offset 0.
func (v *vm) region(src source.Source) engine.Region {
	return engine.Region{Name: "mem", Base: v.addr, Size: uintptr(v.size), PageSize: uintptr(v.pageSize), Source: src}
}

func (v *vm) do(req puppet.Request) puppet.Reply {
	v.t.Helper()
	req.Area = v.area
	rep, _, err := v.p.Do(req)
	if err != nil {
		v.t.Fatalf("%s: %v", req.Op, err)
	}
	return rep
}

func (v *vm) start(req puppet.Request) *puppet.Call {
	v.t.Helper()
	req.Area = v.area
	c, err := v.p.Go(req)
	if err != nil {
		v.t.Fatal(err)
	}
	return c
}

// patternSource returns a memory source of size bytes holding the pattern of seed.
func patternSource(t testing.TB, size int, seed uint64) *source.Memory {
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	puppet.Fill(b, seed, 0)
	return source.NewMemory(b)
}

// serve runs an engine over v until the test ends; it returns the engine and a function that
// stops it and returns Run's error.
func serve(t testing.TB, v *vm, regions []engine.Region, opts engine.Options) (*engine.Engine, func() error) {
	t.Helper()
	e, err := engine.New(v.fd, regions, opts)
	if err != nil {
		t.Fatal(err)
	}
	v.fd = nil // owned by the engine now
	errc := make(chan error, 1)
	go func() { errc <- e.Run(context.Background()) }()
	var stopped bool
	var runErr error
	stop := func() error {
		if !stopped {
			stopped = true
			e.Close()
			select {
			case runErr = <-errc:
			case <-time.After(10 * time.Second):
				runErr = context.DeadlineExceeded
			}
		}
		return runErr
	}
	t.Cleanup(func() { stop() })
	return e, stop
}
