// Package daemon serves the guest memory of Firecracker microVMs restored from a snapshot with
// the UFFD memory backend: it listens on a Unix socket, takes each VM's handshake, and runs a
// fault-serving engine per userfaultfd, every VM sharing one read-only mapping of the memory
// file.
//
// A VM's lifetime is known without the orchestrator: SO_PEERPIDFD gives a pidfd of the process
// that connected (SO_PEERCRED its pid and uid), which says when it exits, and (Firecracker
// v1.12+) the stream's EOF says so too. Then everything of the VM is released. If the daemon
// cannot serve a VM — a source read fails, the handshake is malformed, the hugetlb pool is
// exhausted — it kills the VMM with SIGKILL, the only signal a vCPU stuck in a kernel-mode fault
// obeys, rather than leave the guest hung or serve a wrong byte (Config.OnFailure). Drain stops
// accepting and serves live VMs until they exit.
package daemon
