// Package e2e holds the end-to-end tests against a real Firecracker: one microVM booted per test
// run and snapshotted once, then restored many times, each restore by a fresh Firecracker
// process whose memory is served by `faultline serve` run as a separate process, as an operator
// runs it.
//
// FAULTLINE_FIRECRACKER_DIR names a directory holding `firecracker`, `vmlinux` and
// `initrd.cpio` (a guest whose /init runs a memory pattern checker printing `VERIFY-OK pass=N`
// on the serial console). Without it the tests skip, or fail under FAULTLINE_REQUIRE_KERNEL=1.
package e2e
