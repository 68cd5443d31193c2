// Package uffd is the Linux userfaultfd interface in pure Go: every ioctl, struct, flag and
// message of Linux 6.18, typed and documented, with no cgo.
//
// A userfaultfd lets one program resolve the page faults of memory that another program (or a
// thread of its own) registered: each first touch of a missing page, each write to a
// write-protected page, each access to a page that is cached but not mapped becomes a message on
// the fd, and the handler installs the page ([FD.Copy], [FD.Zeropage], [FD.Continue],
// [FD.Move], [FD.Poison]) or lifts the protection ([FD.Writeprotect]).
//
// # Life of a userfaultfd
//
//	f, err := uffd.Open(uffd.Options{})          // /dev/userfaultfd, else userfaultfd(2)
//	_, err = f.API(uffd.FeatureEventRemove)      // the handshake, once per fd
//	ioctls, err := f.Register(addr, size, uffd.ModeMissing)
//	r, _ := f.NewReader()
//	msgs := make([]uffd.Msg, 64)
//	n, err := r.Read(msgs)                       // many messages per read(2), netpoller-driven
//	_, err = f.Copy(page, src, pageSize, 0)      // resolve and wake
//
// In production the memory belongs to another process — a VMM such as Firecracker creates the
// fd, registers guest memory and sends the fd over a Unix socket; [NewFD] adopts it. A Go
// program must not serve faults of its own memory from the same process: a goroutine blocked in
// a fault keeps its P, and a stop-the-world waits for it (see ARCHITECTURE.md).
//
// # Errors
//
// Every operation returns an [*OpError] naming the ioctl, the range, the bytes done and why.
// Branch with errors.Is on the package's sentinels — [ErrPartial] (resume at
// [OpError.Resume]), [ErrEventsPending] (read events, retry), [ErrExist] (already mapped: wake
// and move on), [ErrNotRegistered], [ErrProcessGone], [ErrInvalid], [ErrUnsupported],
// [ErrPermission] — or on the unix.Errno, which the error also matches. The kernel's
// result-field encodings are decoded for you: the field is preset to a sentinel so that "failed
// before running" (field untouched), "ran and failed" (field = -errno), "partial" (EAGAIN,
// field > 0) and "events pending" (EAGAIN, field = -EAGAIN or untouched) are told apart.
//
// # Features
//
// [Feature] has the 17 bits of Linux 6.18 by name. The handshake answers with every supported
// bit; the bits in force are only visible in fdinfo, read by [FD.Info]. Capability bits need
// not be requested; [BehaviourFeatures] must be. [SupportedFeatures] asks on a throwaway fd;
// package probe reports the features, the ways to create an fd, and the ioctls each memory type
// answers. Bits newer than this package are kept and printed in hex, never rejected here.
//
// # From the 2015 RFC to Linux 6.18
//
// The project grew from the userfaultfd header of the May 2015 RFC (v4, patch 11 of 23). What
// kept its number, and what did not:
//
//   - Same: UFFD_API 0xAA; the ioctl magic 0xAA and numbers REGISTER 0x00, UNREGISTER 0x01,
//     WAKE 0x02, API 0x3F; the UFFDIO_API, UFFDIO_REGISTER and range structs byte for byte;
//     UNREGISTER and WAKE still encoded _IOR although the kernel reads them; register modes
//     MISSING 1<<0 and WP 1<<1 (WP implemented in 5.7); the syscall numbers (x86_64 323).
//   - Changed meaning: feature bits 0 and 1 were UFFD_FEATURE_WRITE_BIT and
//     UFFD_FEATURE_WP_BIT; today they are [FeaturePagefaultFlagWP] and [FeatureEventFork]. Sending
//     the old 0x3 asks for fork events (EPERM without CAP_SYS_PTRACE). This package never sends
//     the old values; the write bit is now always reported in [FaultFlags].
//   - Changed format: read(2) returned 8-byte addresses with flag bits in the low bits; it now
//     returns 32-byte struct uffd_msg records ([Msg], [MsgSize]) with an event type, and a buffer
//     smaller than 32 bytes is EINVAL. The flag values WRITE 1<<0 and WP 1<<1 kept their numbers
//     as [FaultWrite] and [FaultWP].
//   - Stricter: the handshake works exactly once per fd (a second one, even with no features,
//     is EINVAL), so probing uses a throwaway fd.
//   - Added: COPY, ZEROPAGE (4.3); events FORK, REMAP, REMOVE, UNMAP and shmem/hugetlbfs (4.11);
//     ESRCH for an exited process (4.13, was ENOSPC); SIGBUS and THREAD_ID (4.14); WP mode,
//     WRITEPROTECT and COPY_MODE_WP (5.7); UFFD_USER_MODE_ONLY and vm.unprivileged_userfaultfd=0
//     (5.11); MINOR mode and CONTINUE (5.13/5.14); EXACT_ADDRESS (5.18); WP on shmem/hugetlbfs
//     (5.19); /dev/userfaultfd (6.1); WP_UNPOPULATED and CONTINUE_MODE_WP (6.4); POISON (6.6);
//     WP_ASYNC and PAGEMAP_SCAN (6.7); MOVE (6.8, the RFC's UFFDIO_REMAP revived at 0x05).
//
// # Architectures
//
// Request numbers are computed with each architecture's _IOC layout: powerpc and mips differ
// from asm-generic for _IOR and _IO (UNREGISTER, WAKE, USERFAULTFD_IOC_NEW). Messages are
// decoded in native byte order, so big-endian s390x and ppc64 read the same fields. All
// argument structs are 64-bit fields only, identical on 32-bit architectures.
//
// # Other systems
//
// userfaultfd is Linux's. On other systems the package builds with the same types, constants,
// message decoding and error sentinels, so that a program using it compiles everywhere, and
// every operation ([Open], [NewFD], [OpenPagemap], each method) fails with an [*OpError]
// matching [ErrUnsupported] (and errors.ErrUnsupported). The ioctl request numbers
// ([RequestNew], [RequestPagemapScan]) exist on Linux only.
package uffd
