// Package client is a Go client of the fleet control API of faultline serve --control: HTTP
// and JSON over a Unix socket, as Firecracker's own API is. It creates, lists, describes and
// removes VM bindings, each a UFFD socket that serves the VMs connecting to it from one
// snapshot. The wire types are defined here, so the package has no dependency beyond the
// standard library and builds everywhere.
//
// # The API
//
//	PUT    /vms/{id}   body Spec: bind a UFFD socket to a snapshot; it listens when the call returns (201, a VM)
//	GET    /vms        every binding ({"vms": [VM, ...]})
//	GET    /vms/{id}   one binding with its stats (a VM)
//	DELETE /vms/{id}   stop listening and remove the socket file; VMs served keep being served
//	                   until they exit, unless ?force=true ends them by the failure policy (a VM)
//	GET    /snapshots  the snapshots open, each shared by the bindings that use it
//
// Errors are a JSON object {"error": "..."} with the status: 400 a malformed request (bad JSON,
// an unknown field, a relative socket path, a snapshot that does not open), 404 an unknown id, 409
// an id that exists or a socket path in use, 429 the daemon serves its most VMs (--max-vms), 503
// the cache memory bound admits no more snapshots or the daemon is draining. [Error] carries
// the status and the message.
package client
