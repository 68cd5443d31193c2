package uffd

// The constants below keep the kernel's numbers (include/uapi/linux/userfaultfd.h, Linux 6.18)
// under Go names. Only the numbers are ABI; the names and types are ours.

// APIVersion is UFFD_API, the only API number the kernel has ever accepted (unchanged since the
// 2015 RFC).
const APIVersion = 0xAA

// Feature is a set of UFFD_FEATURE_* bits as negotiated by UFFDIO_API.
//
// Some bits are capabilities the kernel reports and that need not be requested (the MISSING_*,
// MINOR_*, WP_HUGETLBFS_SHMEM, PAGEFAULT_FLAG_WP, POISON and MOVE bits); the others change
// behaviour and take effect only when requested (see [BehaviourFeatures]). Bits this package does
// not know are kept, printed in hex, and never rejected here: a newer kernel may speak them.
type Feature uint64

const (
	// FeaturePagefaultFlagWP: write-protect mode on anonymous memory (5.7). Bit 0 was the 2015
	// RFC's UFFD_FEATURE_WRITE_BIT; never send the old meaning.
	FeaturePagefaultFlagWP Feature = 1 << 0
	// FeatureEventFork: fork() children get a uffd of their own, delivered as EventFork (4.11).
	// Needs CAP_SYS_PTRACE at handshake. Bit 1 was the RFC's UFFD_FEATURE_WP_BIT.
	FeatureEventFork Feature = 1 << 1
	// FeatureEventRemap: mremap() is reported as EventRemap and keeps the registration (4.11).
	FeatureEventRemap Feature = 1 << 2
	// FeatureEventRemove: MADV_DONTNEED/MADV_REMOVE are reported as EventRemove (4.11).
	FeatureEventRemove Feature = 1 << 3
	// FeatureMissingHugetlbfs: MISSING mode on hugetlbfs (4.11).
	FeatureMissingHugetlbfs Feature = 1 << 4
	// FeatureMissingShmem: MISSING mode on shmem (4.11).
	FeatureMissingShmem Feature = 1 << 5
	// FeatureEventUnmap: munmap() and implicit unmaps are reported as EventUnmap (4.11).
	FeatureEventUnmap Feature = 1 << 6
	// FeatureSigbus: no messages; a faulting thread gets SIGBUS instead (4.14).
	FeatureSigbus Feature = 1 << 7
	// FeatureThreadID: page-fault messages carry the faulting thread's TID (4.14).
	FeatureThreadID Feature = 1 << 8
	// FeatureMinorHugetlbfs: MINOR mode on hugetlbfs (5.13).
	FeatureMinorHugetlbfs Feature = 1 << 9
	// FeatureMinorShmem: MINOR mode on shmem (5.14).
	FeatureMinorShmem Feature = 1 << 10
	// FeatureExactAddress: fault addresses keep their in-page offset (5.18).
	FeatureExactAddress Feature = 1 << 11
	// FeatureWPHugetlbfsShmem: WP mode on shmem and hugetlbfs (5.19).
	FeatureWPHugetlbfsShmem Feature = 1 << 12
	// FeatureWPUnpopulated: on anonymous memory WRITEPROTECT also protects never-touched pages (6.4).
	FeatureWPUnpopulated Feature = 1 << 13
	// FeaturePoison: UFFDIO_POISON (6.6).
	FeaturePoison Feature = 1 << 14
	// FeatureWPAsync: the kernel resolves WP faults itself; read the dirty set with PAGEMAP_SCAN
	// (6.7). Implies FeatureWPUnpopulated.
	FeatureWPAsync Feature = 1 << 15
	// FeatureMove: UFFDIO_MOVE (6.8).
	FeatureMove Feature = 1 << 16
)

// KnownFeatures is every feature bit this package names: the UFFD_API_FEATURES of Linux 6.18.
const KnownFeatures Feature = 1<<17 - 1

// BehaviourFeatures are the bits that change what the kernel does and therefore take effect only
// when requested in the handshake. The rest of [KnownFeatures] are capability reports.
const BehaviourFeatures = FeatureEventFork | FeatureEventRemap | FeatureEventRemove |
	FeatureEventUnmap | FeatureSigbus | FeatureThreadID | FeatureExactAddress |
	FeatureWPUnpopulated | FeatureWPAsync

// RegisterMode is a set of UFFDIO_REGISTER_MODE_* bits.
type RegisterMode uint64

const (
	// ModeMissing traps accesses to pages with no page table entry (4.3).
	ModeMissing RegisterMode = 1 << 0
	// ModeWP traps writes to write-protected pages (5.7; seed value, implemented later).
	ModeWP RegisterMode = 1 << 1
	// ModeMinor traps accesses to pages in the page cache but not mapped (5.13, shmem/hugetlbfs).
	ModeMinor RegisterMode = 1 << 2
)

// Ioctls is a set of ioctls as the kernel answers them in UFFDIO_API and UFFDIO_REGISTER: bit n
// set means the ioctl with number n is usable.
type Ioctls uint64

// The ioctl numbers (_UFFDIO_*), which double as bit positions in [Ioctls].
const (
	nrRegister     = 0x00
	nrUnregister   = 0x01
	nrWake         = 0x02
	nrCopy         = 0x03
	nrZeropage     = 0x04
	nrMove         = 0x05
	nrWriteprotect = 0x06
	nrContinue     = 0x07
	nrPoison       = 0x08
	nrAPI          = 0x3F
)

const (
	IoctlRegister     Ioctls = 1 << nrRegister
	IoctlUnregister   Ioctls = 1 << nrUnregister
	IoctlWake         Ioctls = 1 << nrWake
	IoctlCopy         Ioctls = 1 << nrCopy
	IoctlZeropage     Ioctls = 1 << nrZeropage
	IoctlMove         Ioctls = 1 << nrMove
	IoctlWriteprotect Ioctls = 1 << nrWriteprotect
	IoctlContinue     Ioctls = 1 << nrContinue
	IoctlPoison       Ioctls = 1 << nrPoison
	IoctlAPI          Ioctls = 1 << nrAPI
)

// Mode bits of the resolving ioctls. Each ioctl has its own type so that a COPY mode cannot be
// passed to MOVE by mistake.
type (
	CopyMode         uint64
	ZeropageMode     uint64
	WriteprotectMode uint64
	ContinueMode     uint64
	PoisonMode       uint64
	MoveMode         uint64
)

const (
	// CopyDontWake leaves the faulting threads asleep; wake them later with Wake.
	CopyDontWake CopyMode = 1 << 0
	// CopyWP maps the new page write-protected (range registered with ModeWP).
	CopyWP CopyMode = 1 << 1

	ZeropageDontWake ZeropageMode = 1 << 0

	// WriteprotectWP protects the range; without it the range is unprotected and woken.
	WriteprotectWP WriteprotectMode = 1 << 0
	// WriteprotectDontWake: unprotect without waking (not valid together with WriteprotectWP).
	WriteprotectDontWake WriteprotectMode = 1 << 1

	ContinueDontWake ContinueMode = 1 << 0
	// ContinueWP maps the page write-protected (6.4; range registered with ModeWP).
	ContinueWP ContinueMode = 1 << 1

	PoisonDontWake PoisonMode = 1 << 0

	MoveDontWake MoveMode = 1 << 0
	// MoveAllowSrcHoles counts unmapped source pages as moved instead of failing with ENOENT.
	MoveAllowSrcHoles MoveMode = 1 << 1
)

// FlagUserModeOnly is UFFD_USER_MODE_ONLY (5.11), the one flag of userfaultfd(2) and
// USERFAULTFD_IOC_NEW besides O_CLOEXEC and O_NONBLOCK: [Open] sets it for
// Options.UserModeOnly; it is exported for callers that make the system call themselves.
const FlagUserModeOnly = 1

// EventType is the uffd_msg.event byte.
type EventType uint8

const (
	EventPagefault EventType = 0x12
	EventFork      EventType = 0x13
	EventRemap     EventType = 0x14
	EventRemove    EventType = 0x15
	EventUnmap     EventType = 0x16
)

// FaultFlags are the UFFD_PAGEFAULT_FLAG_* bits of a page-fault message. Neither FaultWP nor
// FaultMinor set means a MISSING fault.
type FaultFlags uint64

const (
	// FaultWrite: the access was a write (reported for every reason).
	FaultWrite FaultFlags = 1 << 0
	// FaultWP: the reason is write protection (always with FaultWrite).
	FaultWP FaultFlags = 1 << 1
	// FaultMinor: the reason is a minor fault (page cached, not mapped).
	FaultMinor FaultFlags = 1 << 2
)

// MsgSize is the size of one message returned by read(2) on a userfaultfd.
const MsgSize = 32

// Known mode bits per ioctl, for diagnosing EINVAL.
const (
	registerModes     = uint64(ModeMissing | ModeWP | ModeMinor)
	copyModes         = uint64(CopyDontWake | CopyWP)
	zeropageModes     = uint64(ZeropageDontWake)
	writeprotectModes = uint64(WriteprotectWP | WriteprotectDontWake)
	continueModes     = uint64(ContinueDontWake | ContinueWP)
	poisonModes       = uint64(PoisonDontWake)
	moveModes         = uint64(MoveDontWake | MoveAllowSrcHoles)
)
