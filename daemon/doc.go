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
//
// A daemon with a state directory (Config.StateDir) survives its own end: it keeps, per VM, a
// file of what a successor needs (the VMM's identity, the regions, and the engine's durable
// memory: removed pages and the last batch of messages read), so that a daemon started on the
// directory after a crash serves every VM still running again (the uffd taken back from the VMM
// with pidfd_getfd), and one started with Config.Takeover takes the listening socket and every
// VM over from a live predecessor, which then exits. Without one, the VMs of a daemon that dies
// hang until killed: the VMM's own copy of the uffd keeps their faults waiting.
package daemon
