// Package puppet runs the faulting side of tests and benchmarks in a child process.
//
// A Go process must not serve its own page faults (see ARCHITECTURE.md): a goroutine blocked in
// a fault keeps its P, and the garbage collector waits for it. So the process that owns the
// registered memory — the role Firecracker plays in production — is a child: the current
// executable started again with FAULTLINE_PUPPET_FD set (the number of its end of the socket), which [Main] turns into a command loop before
// anything else runs. The parent drives it over a SOCK_SEQPACKET socket: map memory of a kind,
// create a userfaultfd and send it over (SCM_RIGHTS, as a VMM does), register ranges, touch
// pages with threads and verify every byte, madvise, mremap, munmap, fork, read pagemap bits.
// Commands run concurrently in the child, so a touch that blocks on faults does not stop the
// parent from asking for something else.
package puppet
