// Package firecracker speaks Firecracker's UFFD snapshot-restore handshake, both halves.
//
// When Firecracker loads a snapshot with "mem_backend": {"backend_type": "Uffd", "backend_path":
// SOCKET}, it maps guest memory, creates a userfaultfd (EVENT_REMOVE requested, not
// user-mode-only), registers every region in MISSING mode, connects to SOCKET and sends one
// message: a JSON array of GuestRegionUffdMapping objects with the userfaultfd attached as
// SCM_RIGHTS. No reply is expected. The fields per version:
//
//	v1.1–v1.6   base_host_virt_addr, size, offset; the socket is closed right after sending
//	v1.7–v1.11  + page_size_kib (which, despite its name, holds bytes)
//	v1.12+      + page_size (bytes, equal to page_size_kib); the socket stays open until
//	            Firecracker exits, so EOF means the VM is gone
//
// [Decode] validates a message against the memory file; [Conn] reads handshakes off an accepted
// stream — more than one per stream is allowed, the data may come before its fd, and nothing
// from the peer is trusted unvalidated; [Send] is the VMM's half, used by tests and the demo.
package firecracker
