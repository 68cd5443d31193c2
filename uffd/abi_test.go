//go:build linux

package uffd_test

import (
	"bytes"
	"go/ast"
	"go/build/constraint"
	"go/constant"
	"go/parser"
	"go/token"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// asmGeneric are the request numbers as the kernel's headers give them for the asm-generic
// _IOC layout (x86_64, arm64, riscv64, loong64, s390x, 386, arm).
var asmGeneric = map[string]uintptr{
	"UFFDIO_API":          0xC018AA3F,
	"UFFDIO_REGISTER":     0xC020AA00,
	"UFFDIO_UNREGISTER":   0x8010AA01,
	"UFFDIO_WAKE":         0x8010AA02,
	"UFFDIO_COPY":         0xC028AA03,
	"UFFDIO_ZEROPAGE":     0xC020AA04,
	"UFFDIO_MOVE":         0xC028AA05,
	"UFFDIO_WRITEPROTECT": 0xC018AA06,
	"UFFDIO_CONTINUE":     0xC020AA07,
	"UFFDIO_POISON":       0xC020AA08,
	"USERFAULTFD_IOC_NEW": 0xAA00,
}

// threeBit are the same on powerpc and mips, whose _IOC has three direction bits at 29
// (_IOC_NONE 1, _IOC_READ 2, _IOC_WRITE 4): the _IOWR values coincide, _IOR and _IO do not.
var threeBit = map[string]uintptr{
	"UFFDIO_API":          0xC018AA3F,
	"UFFDIO_REGISTER":     0xC020AA00,
	"UFFDIO_UNREGISTER":   0x4010AA01,
	"UFFDIO_WAKE":         0x4010AA02,
	"UFFDIO_COPY":         0xC028AA03,
	"UFFDIO_ZEROPAGE":     0xC020AA04,
	"UFFDIO_MOVE":         0xC028AA05,
	"UFFDIO_WRITEPROTECT": 0xC018AA06,
	"UFFDIO_CONTINUE":     0xC020AA07,
	"UFFDIO_POISON":       0xC020AA08,
	"USERFAULTFD_IOC_NEW": 0x2000AA00,
}

func isThreeBitArch(goarch string) bool {
	switch goarch {
	case "ppc", "ppc64", "ppc64le", "mips", "mipsle", "mips64", "mips64le":
		return true
	}
	return false
}

// TestRequestNumbers pins the request numbers this build computes.
func TestRequestNumbers(t *testing.T) {
	want := asmGeneric
	if isThreeBitArch(runtime.GOARCH) {
		want = threeBit
	}
	if len(uffd.Requests) != len(want) {
		t.Errorf("%d requests exported, want %d", len(uffd.Requests), len(want))
	}
	for name, w := range want {
		got, ok := uffd.Requests[name]
		if !ok {
			t.Errorf("%s missing", name)
			continue
		}
		if got != w {
			t.Errorf("%s = %#x, want %#x (%s)", name, got, w, runtime.GOARCH)
		}
	}
}

// iocLayout is an _IOC layout: direction values and shift (the size sits at bit 16, the type at
// bit 8, the number at bit 0 on every architecture).
type iocLayout struct{ none, read, write, dirShift uintptr }

func (l iocLayout) ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<l.dirShift | size<<16 | typ<<8 | nr
}

// requests computes the userfaultfd request numbers with layout l, from the macros of the
// header (include/uapi/linux/userfaultfd.h) and the package's struct sizes.
func (l iocLayout) requests() map[string]uintptr {
	rw := l.read | l.write
	sz := uffd.SizeofConsts
	return map[string]uintptr{
		"UFFDIO_API":          l.ioc(rw, 0xAA, 0x3F, sz["uffdio_api"]),
		"UFFDIO_REGISTER":     l.ioc(rw, 0xAA, 0x00, sz["uffdio_register"]),
		"UFFDIO_UNREGISTER":   l.ioc(l.read, 0xAA, 0x01, sz["uffdio_range"]),
		"UFFDIO_WAKE":         l.ioc(l.read, 0xAA, 0x02, sz["uffdio_range"]),
		"UFFDIO_COPY":         l.ioc(rw, 0xAA, 0x03, sz["uffdio_copy"]),
		"UFFDIO_ZEROPAGE":     l.ioc(rw, 0xAA, 0x04, sz["uffdio_zeropage"]),
		"UFFDIO_MOVE":         l.ioc(rw, 0xAA, 0x05, sz["uffdio_move"]),
		"UFFDIO_WRITEPROTECT": l.ioc(rw, 0xAA, 0x06, sz["uffdio_writeprotect"]),
		"UFFDIO_CONTINUE":     l.ioc(rw, 0xAA, 0x07, sz["uffdio_continue"]),
		"UFFDIO_POISON":       l.ioc(rw, 0xAA, 0x08, sz["uffdio_poison"]),
		"USERFAULTFD_IOC_NEW": l.ioc(l.none, 0xAA, 0x00, 0),
	}
}

// layoutFile reads an ioctl_*.go file of the package as source: its //go:build expression and
// its _IOC constants. This checks the layout of other architectures without building for them.
func layoutFile(t *testing.T, name string) (constraint.Expr, iocLayout) {
	t.Helper()
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, name, nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	var expr constraint.Expr
	for _, cg := range file.Comments {
		for _, c := range cg.List {
			if constraint.IsGoBuild(c.Text) {
				if expr, err = constraint.Parse(c.Text); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
			}
		}
	}
	if expr == nil {
		t.Fatalf("%s has no //go:build line", name)
	}
	vals := map[string]uintptr{}
	for _, d := range file.Decls {
		gd, ok := d.(*ast.GenDecl)
		if !ok || gd.Tok != token.CONST {
			continue
		}
		for _, s := range gd.Specs {
			vs := s.(*ast.ValueSpec)
			for i, id := range vs.Names {
				lit, ok := vs.Values[i].(*ast.BasicLit)
				if !ok {
					t.Fatalf("%s: %s is not a literal", name, id.Name)
				}
				v, ok := constant.Uint64Val(constant.MakeFromLiteral(lit.Value, lit.Kind, 0))
				if !ok {
					t.Fatalf("%s: %s = %s", name, id.Name, lit.Value)
				}
				vals[id.Name] = uintptr(v)
			}
		}
	}
	for _, k := range []string{"iocNone", "iocRead", "iocWrite", "iocDirShift"} {
		if _, ok := vals[k]; !ok {
			t.Fatalf("%s does not define %s", name, k)
		}
	}
	return expr, iocLayout{vals["iocNone"], vals["iocRead"], vals["iocWrite"], vals["iocDirShift"]}
}

// TestRequestNumbersAllArchs computes the request numbers of both _IOC layouts from the
// package's own source files and pins them, and checks that every Linux GOARCH builds exactly
// one of the two files, the right one.
func TestRequestNumbersAllArchs(t *testing.T) {
	native := iocLayout{uffd.IOCLayout.None, uffd.IOCLayout.Read, uffd.IOCLayout.Write, uffd.IOCLayout.DirShift}
	if uffd.IOCLayout.SizeShift != 16 {
		t.Fatalf("size shift %d, want 16", uffd.IOCLayout.SizeShift)
	}
	// The test's encoder agrees with the package's for this architecture, over every direction,
	// number and size the field widths allow: so the layouts below are applied the package's way.
	for _, dir := range []uintptr{native.none, native.read, native.write, native.read | native.write} {
		for _, nr := range []uintptr{0, 1, 0x3f, 0xff} {
			for _, size := range []uintptr{0, 16, 40, 0x1fff} {
				if got, want := uffd.IOC(dir, 0xAA, nr, size), native.ioc(dir, 0xAA, nr, size); got != want {
					t.Fatalf("ioc(%d, 0xAA, %#x, %d) = %#x, test encoder %#x", dir, nr, size, got, want)
				}
			}
		}
	}

	twoExpr, two := layoutFile(t, "ioctl_twobit.go")
	threeExpr, three := layoutFile(t, "ioctl_threebit.go")
	for arch, pair := range map[string]struct {
		l    iocLayout
		want map[string]uintptr
	}{"asm-generic": {two, asmGeneric}, "powerpc/mips": {three, threeBit}} {
		got := pair.l.requests()
		for name, w := range pair.want {
			if got[name] != w {
				t.Errorf("%s: %s = %#x, want %#x", arch, name, got[name], w)
			}
		}
	}
	// _IOWR is the same in both layouts; _IOR and _IO are not.
	for name, g := range asmGeneric {
		same := g == threeBit[name]
		if wantSame := name != "UFFDIO_UNREGISTER" && name != "UFFDIO_WAKE" && name != "USERFAULTFD_IOC_NEW"; same != wantSame {
			t.Errorf("%s: asm-generic %#x, powerpc/mips %#x", name, g, threeBit[name])
		}
	}
	// The native layout is the one this build picked.
	wantNative := two
	if isThreeBitArch(runtime.GOARCH) {
		wantNative = three
	}
	if native != wantNative {
		t.Errorf("%s uses layout %+v, want %+v", runtime.GOARCH, native, wantNative)
	}

	// go tool dist list, linux/*.
	for _, arch := range []string{"386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le",
		"mipsle", "ppc64", "ppc64le", "riscv64", "s390x", "ppc"} {
		tags := func(tag string) bool { return tag == "linux" || tag == arch }
		inTwo, inThree := twoExpr.Eval(tags), threeExpr.Eval(tags)
		if inTwo == inThree {
			t.Errorf("GOARCH=%s: ioctl_twobit.go built %v, ioctl_threebit.go built %v; want exactly one", arch, inTwo, inThree)
		}
		if inThree != isThreeBitArch(arch) {
			t.Errorf("GOARCH=%s builds the wrong _IOC layout (three-bit: %v)", arch, inThree)
		}
	}
}

// TestArgStructs pins the argument structs against the uapi header's structs: the size, the sizeof
// constant encoded into the request number, and the offset of every field.
func TestArgStructs(t *testing.T) {
	want := map[string]struct {
		size    uintptr
		offsets []uintptr
	}{
		"uffdio_api":          {24, []uintptr{0, 8, 16}},
		"uffdio_range":        {16, []uintptr{0, 8}},
		"uffdio_register":     {32, []uintptr{0, 16, 24}}, // range, mode, ioctls
		"uffdio_copy":         {40, []uintptr{0, 8, 16, 24, 32}},
		"uffdio_zeropage":     {32, []uintptr{0, 16, 24}},
		"uffdio_writeprotect": {24, []uintptr{0, 16}},
		"uffdio_continue":     {32, []uintptr{0, 16, 24}},
		"uffdio_poison":       {32, []uintptr{0, 16, 24}},
		"uffdio_move":         {40, []uintptr{0, 8, 16, 24, 32}},
	}
	if len(uffd.ArgStructs) != len(want) {
		t.Errorf("%d arg structs exported, want %d", len(uffd.ArgStructs), len(want))
	}
	for name, w := range want {
		v, ok := uffd.ArgStructs[name]
		if !ok {
			t.Errorf("%s missing", name)
			continue
		}
		typ := reflect.TypeOf(v)
		if typ.Size() != w.size {
			t.Errorf("unsafe.Sizeof(%s) = %d, want %d", typ, typ.Size(), w.size)
		}
		if c := uffd.SizeofConsts[name]; c != w.size {
			t.Errorf("sizeof constant of %s = %d, want %d", name, c, w.size)
		}
		if typ.NumField() != len(w.offsets) {
			t.Errorf("%s has %d fields, want %d", typ, typ.NumField(), len(w.offsets))
			continue
		}
		for i, off := range w.offsets {
			f := typ.Field(i)
			if f.Offset != off {
				t.Errorf("%s.%s at %d, want %d", typ, f.Name, f.Offset, off)
			}
			// Every leaf is a 64-bit integer: the same layout on 32-bit architectures.
			if f.Type.Kind() == reflect.Struct {
				if f.Type.Size() != 16 || f.Type.Field(0).Type.Size() != 8 || f.Type.Field(1).Type.Size() != 8 {
					t.Errorf("%s.%s is %s, want a 16-byte range of two u64", typ, f.Name, f.Type)
				}
			} else if f.Type.Size() != 8 {
				t.Errorf("%s.%s is %s, want 64 bits", typ, f.Name, f.Type)
			}
		}
	}
	// Result fields are signed (a byte count or a negative errno).
	for _, rf := range []struct{ st, field string }{
		{"uffdio_copy", "copy"}, {"uffdio_zeropage", "zeropage"}, {"uffdio_continue", "mapped"},
		{"uffdio_poison", "updated"}, {"uffdio_move", "move"},
	} {
		f, ok := reflect.TypeOf(uffd.ArgStructs[rf.st]).FieldByName(rf.field)
		if !ok || f.Type.Kind() != reflect.Int64 {
			t.Errorf("%s.%s: want an int64 result field, got %v (found %v)", rf.st, rf.field, f.Type, ok)
		}
	}
	if s := unsafe.Sizeof(uffd.Msg{}); s != 32 || uffd.MsgSize != 32 {
		t.Errorf("Msg is %d bytes, MsgSize %d; want 32", s, uffd.MsgSize)
	}
	if s := unsafe.Sizeof([4]uffd.Msg{}); s != 4*32 {
		t.Errorf("[4]Msg is %d bytes, want 128: a []Msg must be a contiguous read buffer", s)
	}
}

// TestABIConstants pins the numbers of the uapi header (events, fault flags, features, modes,
// ioctl numbers) that travel through the ABI.
func TestABIConstants(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"UFFD_API", uffd.APIVersion, 0xAA},
		{"UFFD_EVENT_PAGEFAULT", uint64(uffd.EventPagefault), 0x12},
		{"UFFD_EVENT_FORK", uint64(uffd.EventFork), 0x13},
		{"UFFD_EVENT_REMAP", uint64(uffd.EventRemap), 0x14},
		{"UFFD_EVENT_REMOVE", uint64(uffd.EventRemove), 0x15},
		{"UFFD_EVENT_UNMAP", uint64(uffd.EventUnmap), 0x16},
		{"UFFD_PAGEFAULT_FLAG_WRITE", uint64(uffd.FaultWrite), 1},
		{"UFFD_PAGEFAULT_FLAG_WP", uint64(uffd.FaultWP), 2},
		{"UFFD_PAGEFAULT_FLAG_MINOR", uint64(uffd.FaultMinor), 4},
		{"UFFDIO_REGISTER_MODE_MISSING", uint64(uffd.ModeMissing), 1},
		{"UFFDIO_REGISTER_MODE_WP", uint64(uffd.ModeWP), 2},
		{"UFFDIO_REGISTER_MODE_MINOR", uint64(uffd.ModeMinor), 4},
		{"UFFDIO_COPY_MODE_DONTWAKE", uint64(uffd.CopyDontWake), 1},
		{"UFFDIO_COPY_MODE_WP", uint64(uffd.CopyWP), 2},
		{"UFFDIO_ZEROPAGE_MODE_DONTWAKE", uint64(uffd.ZeropageDontWake), 1},
		{"UFFDIO_WRITEPROTECT_MODE_WP", uint64(uffd.WriteprotectWP), 1},
		{"UFFDIO_WRITEPROTECT_MODE_DONTWAKE", uint64(uffd.WriteprotectDontWake), 2},
		{"UFFDIO_CONTINUE_MODE_DONTWAKE", uint64(uffd.ContinueDontWake), 1},
		{"UFFDIO_CONTINUE_MODE_WP", uint64(uffd.ContinueWP), 2},
		{"UFFDIO_POISON_MODE_DONTWAKE", uint64(uffd.PoisonDontWake), 1},
		{"UFFDIO_MOVE_MODE_DONTWAKE", uint64(uffd.MoveDontWake), 1},
		{"UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES", uint64(uffd.MoveAllowSrcHoles), 2},
		{"UFFD_API_FEATURES (6.18)", uint64(uffd.KnownFeatures), 0x1ffff},
		// The ioctl bits are the _UFFDIO_* numbers.
		{"_UFFDIO_REGISTER", uint64(uffd.IoctlRegister), 1 << 0x00},
		{"_UFFDIO_UNREGISTER", uint64(uffd.IoctlUnregister), 1 << 0x01},
		{"_UFFDIO_WAKE", uint64(uffd.IoctlWake), 1 << 0x02},
		{"_UFFDIO_COPY", uint64(uffd.IoctlCopy), 1 << 0x03},
		{"_UFFDIO_ZEROPAGE", uint64(uffd.IoctlZeropage), 1 << 0x04},
		{"_UFFDIO_MOVE", uint64(uffd.IoctlMove), 1 << 0x05},
		{"_UFFDIO_WRITEPROTECT", uint64(uffd.IoctlWriteprotect), 1 << 0x06},
		{"_UFFDIO_CONTINUE", uint64(uffd.IoctlContinue), 1 << 0x07},
		{"_UFFDIO_POISON", uint64(uffd.IoctlPoison), 1 << 0x08},
		{"_UFFDIO_API", uint64(uffd.IoctlAPI), 1 << 0x3F},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	// Feature bit n has the kernel's name n (UFFD_FEATURE_* in the uapi header).
	names := []string{"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "MISSING_HUGETLBFS",
		"MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS", "THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM",
		"EXACT_ADDRESS", "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE"}
	for i, n := range names {
		if got := (uffd.Feature(1) << i).Name(); got != n {
			t.Errorf("feature bit %d is %q, want %q", i, got, n)
		}
	}
	if got := (uffd.Feature(1) << len(names)).Name(); got != "0x"+strconv.FormatUint(1<<len(names), 16) {
		t.Errorf("bit %d (not in 6.18) is named %q, want hex", len(names), got)
	}
}

// TestRequestNumbersKernel issues every request number of this build against the kernel, in
// this process and without a fault (every page is installed by an ioctl before it is read): each
// call succeeds, which a wrong number could not (the kernel answers unknown numbers EINVAL).
func TestRequestNumbersKernel(t *testing.T) {
	ps := uintptr(os.Getpagesize())
	f, err := uffd.Open(uffd.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Origin() != uffd.DevicePath {
		t.Fatalf("Origin %q: USERFAULTFD_IOC_NEW on %s failed", f.Origin(), uffd.DevicePath)
	}
	if _, err := f.API(0); err != nil {
		t.Fatal(err)
	}

	// Anonymous memory: pages 0-3 registered MISSING|WP, pages 4-5 not registered.
	mem, err := unix.Mmap(-1, 0, int(6*ps), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	base := addrOf(mem)
	src := source(t, int(ps), 3)
	ioctls, err := f.Register(base, 4*ps, uffd.ModeMissing|uffd.ModeWP)
	if err != nil {
		t.Fatal(err)
	}
	if want := uffd.Ioctls(0x17c); ioctls != want {
		t.Fatalf("REGISTER answered %v, want %v", ioctls, want)
	}
	if n, err := f.Copy(base, addrOf(src), ps, 0); err != nil || n != ps {
		t.Fatalf("COPY: %d, %v", n, err)
	}
	if n, err := f.Zeropage(base+ps, ps, 0); err != nil || n != ps {
		t.Fatalf("ZEROPAGE: %d, %v", n, err)
	}
	if n, err := f.Poison(base+2*ps, ps, 0); err != nil || n != ps {
		t.Fatalf("POISON: %d, %v", n, err)
	}
	if err := f.Writeprotect(base, ps, uffd.WriteprotectWP); err != nil {
		t.Fatalf("WRITEPROTECT: %v", err)
	}
	if err := f.Writeprotect(base, ps, 0); err != nil {
		t.Fatalf("WRITEPROTECT (unprotect): %v", err)
	}
	mem[4*ps] = 0x5a // the MOVE source: unregistered, populated here
	if n, err := f.Move(base+3*ps, base+4*ps, ps, 0); err != nil || n != ps {
		t.Fatalf("MOVE: %d, %v", n, err)
	}
	if err := f.Wake(base, 4*ps); err != nil {
		t.Fatalf("WAKE: %v", err)
	}
	if err := f.Unregister(base, 4*ps); err != nil {
		t.Fatalf("UNREGISTER: %v", err)
	}
	if !bytes.Equal(mem[:ps], src) || mem[ps] != 0 || mem[3*ps] != 0x5a {
		t.Fatalf("pages after COPY/ZEROPAGE/MOVE: % x / %x / %x", mem[:8], mem[ps], mem[3*ps])
	}

	// CONTINUE needs shmem: a page in the page cache, not mapped yet.
	mfd, err := unix.MemfdCreate("abi-continue", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	if _, err := unix.Pwrite(mfd, src, 0); err != nil {
		t.Fatal(err)
	}
	shm, err := unix.Mmap(mfd, 0, int(ps), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(shm)
	if _, err := f.Register(addrOf(shm), ps, uffd.ModeMinor); err != nil {
		t.Fatal(err)
	}
	if n, err := f.Continue(addrOf(shm), ps, 0); err != nil || n != ps {
		t.Fatalf("CONTINUE: %d, %v", n, err)
	}
	if !bytes.Equal(shm, src) {
		t.Fatal("page mapped by CONTINUE differs from the page cache")
	}
}
