package uffd

// DevicePath is the misc device that creates userfaultfds by file permission (Linux 6.1+).
const DevicePath = "/dev/userfaultfd"

// Options control how [Open] creates a userfaultfd.
type Options struct {
	// UserModeOnly creates the fd with UFFD_USER_MODE_ONLY: faults raised inside the kernel
	// (syscalls copying to user memory, GUP, KVM) fail with EFAULT instead of being reported.
	// Unprivileged callers may create only such fds when vm.unprivileged_userfaultfd is 0.
	UserModeOnly bool
	// FallbackUserModeOnly creates a user-mode-only fd when the kernel refuses a full one for
	// lack of privilege. Check FD.UserModeOnly afterwards. Never use it for VMM memory: KVM
	// reads guest memory from inside the kernel.
	FallbackUserModeOnly bool
	// Blocking creates the fd without O_NONBLOCK: Read blocks in read(2) on its thread instead
	// of parking in the netpoller, and Close does not interrupt it. poll(2) on such an fd always
	// reports POLLERR.
	Blocking bool
	// NoDevice skips /dev/userfaultfd and uses the userfaultfd(2) system call only.
	NoDevice bool
}

// APIResult is the kernel's answer to the handshake.
type APIResult struct {
	// Supported is every feature this kernel supports, not just the requested ones. The enabled
	// set is in [FD.Info].
	Supported Feature
	// Ioctls are the ioctls usable on the fd itself (REGISTER, UNREGISTER, API).
	Ioctls Ioctls
}

// Info is what /proc/self/fdinfo tells about a userfaultfd.
type Info struct {
	// Enabled are the features in force on this fd: those requested at handshake, plus the
	// ones the kernel implies (WP_ASYNC brings WP_UNPOPULATED).
	Enabled Feature
	// Initialized reports whether the handshake was done.
	Initialized bool
	// Pending counts fault messages not read yet; Total counts those plus faults read but not
	// resolved.
	Pending, Total uint64
	// Ioctls as the kernel lists them in fdinfo.
	Ioctls Ioctls
}
