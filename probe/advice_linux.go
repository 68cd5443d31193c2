//go:build linux

package probe

import (
	"fmt"
	"math/bits"
	"strings"

	"github.com/faultline-go/faultline/uffd"
)

// sinceLinux is the kernel release that introduced each feature bit.
var sinceLinux = [...]string{
	"5.7", "4.11", "4.11", "4.11", "4.11", "4.11", "4.11", "4.14", "4.14", "5.13", "5.14",
	"5.18", "5.19", "6.4", "6.6", "6.7", "6.8",
}

// featureConfigs are the kernel options without which a recent kernel still leaves out some
// features.
var featureConfigs = []struct {
	features uffd.Feature
	config   string
	what     string
}{
	{uffd.FeaturePagefaultFlagWP, "CONFIG_HAVE_ARCH_USERFAULTFD_WP", "WP mode on anonymous memory"},
	{uffd.FeatureMinorHugetlbfs | uffd.FeatureMinorShmem, "CONFIG_HAVE_ARCH_USERFAULTFD_MINOR", "MINOR mode and CONTINUE"},
	{uffd.FeatureWPHugetlbfsShmem | uffd.FeatureWPUnpopulated | uffd.FeatureWPAsync, "CONFIG_PTE_MARKER_UFFD_WP", "WP on shmem/hugetlbfs, WP_UNPOPULATED and WP_ASYNC"},
}

// advise turns what is missing in s into next steps.
func advise(s *Support) []string {
	adv := []string{}
	add := func(format string, args ...any) { adv = append(adv, fmt.Sprintf(format, args...)) }
	c := s.Creation

	if c.Syscall.Errno == "ENOSYS" || c.SyscallUserModeOnly.Errno == "ENOSYS" {
		add("userfaultfd(2) fails with ENOSYS: the kernel is built without CONFIG_USERFAULTFD, or a seccomp " +
			"filter (e.g. a container runtime's default profile) blocks the syscall; use a kernel with " +
			"CONFIG_USERFAULTFD=y and allow userfaultfd in the seccomp profile")
	}
	if !c.Full() && c.SyscallUserModeOnly.OK {
		why := "no CAP_SYS_PTRACE"
		if c.UnprivilegedUserfaultfd != nil {
			why = fmt.Sprintf("vm.unprivileged_userfaultfd=%d and %s", *c.UnprivilegedUserfaultfd, why)
		}
		if c.Device.Exists {
			why += ", " + uffd.DevicePath + " not accessible"
			if c.Device.Open.Errno != "" {
				why += " (" + c.Device.Open.Errno + ")"
			}
		}
		add("only user-mode-only fds (%s): faults raised inside the kernel (syscalls, KVM) fail with EFAULT "+
			"instead of being reported, so VMM guest memory cannot be served; set sysctl "+
			"vm.unprivileged_userfaultfd=1, or grant access to %s (chmod/ACL/udev rule), or run with CAP_SYS_PTRACE",
			why, uffd.DevicePath)
	}
	if !c.Device.Exists {
		if c.Device.MiscMinor >= 0 {
			add("%s is missing but the kernel has the device (misc 10:%d): mknod -m 0600 %s c 10 %d "+
				"(in a container, pass the device through)", uffd.DevicePath, c.Device.MiscMinor, uffd.DevicePath, c.Device.MiscMinor)
		} else {
			add("%s does not exist: the kernel (%s) is older than 6.1 or built without it (CONFIG_USERFAULTFD); "+
				"create fds with userfaultfd(2) instead", uffd.DevicePath, s.Kernel.Release)
		}
	} else if c.Device.Open.OK && !c.Device.New.OK {
		add("USERFAULTFD_IOC_NEW on %s failed (%s): the node may not be the userfaultfd misc device", uffd.DevicePath, c.Device.New.Error)
	}

	f := s.Features
	switch {
	case !f.Handshake.OK && c.Any():
		add("the UFFDIO_API handshake failed (%s): report this kernel (%s)", f.Handshake.Error, s.Kernel.Release)
	case f.Handshake.OK:
		missing := uffd.KnownFeatures &^ f.Supported.Feature
		for _, fc := range featureConfigs {
			if m := missing & fc.features; m != 0 {
				add("features %v missing, so no %s: the kernel needs %s (and Linux %s or later)",
					m, fc.what, fc.config, sinceLinux[bits.Len64(uint64(m))-1])
				missing &^= fc.features
			}
		}
		if missing != 0 {
			newest := sinceLinux[bits.Len64(uint64(missing))-1]
			add("features %v missing: the kernel (%s) is older than Linux %s", missing, s.Kernel.Release, newest)
		}
		if f.Supported.Has(uffd.FeatureEventFork) && !f.EventFork.OK {
			add("EVENT_FORK cannot be enabled (%s): it needs CAP_SYS_PTRACE at handshake; without it the "+
				"fork() children of registered memory are not followed", f.EventFork.Errno)
		}
	}

	unmappable := map[string]bool{}
	for _, r := range s.Register {
		if !r.OK && strings.HasPrefix(r.Error, "map ") && !unmappable[r.Kind] {
			unmappable[r.Kind] = true
			add("%s memory cannot be mapped (%s)", r.Kind, r.Error)
		}
	}

	h := s.HugePages
	switch {
	case h.Error != "":
		add("hugepage pool unreadable (%s): hugetlb memory is probably unsupported (CONFIG_HUGETLBFS)", h.Error)
	case h.Free == 0:
		add("no free huge pages (total %d, free %d): hugetlb memory cannot be filled (UFFDIO_COPY fails "+
			"with EEXIST); reserve some: echo N > /proc/sys/vm/nr_hugepages (N pages of %d KiB)",
			h.Total, h.Free, h.Size>>10)
	}

	if !s.PagemapScan.Supported && s.PagemapScan.Error == "" {
		add("PAGEMAP_SCAN is missing (%s): reading the dirty set of WP_ASYNC memory needs Linux 6.7", s.PagemapScan.Errno)
	}
	return adv
}
