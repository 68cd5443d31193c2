// Package fleet serves many VMs from many snapshots in one process: the fleet daemon behind
// faultline serve --control. Each VM binding is a UFFD socket, made by the control API (HTTP
// and JSON over a Unix socket, package [github.com/faultline-go/faultline/fleet/client]) and
// served by its own [daemon.Daemon]; the snapshots are opened once per reference and shared by
// every binding that uses them.
//
// # Bindings
//
// PUT /vms/{id} names a snapshot (a packed snapshot directory, a raw memory file, or a URL
// whose scheme has an [Opener] in Config.Openers) and an absolute socket path. The snapshot is
// opened, or the one open already is shared; the socket is bound as the daemon binds its own
// (0600, or 0660 for Config.Daemon.SocketGroup; a stale socket file is replaced, a path another
// process listens on is refused); when the call returns it listens. Firecracker connects to it
// during PUT /snapshot/load; every VM that connects is served from the binding's snapshot, with
// the daemon's lifecycle, failure policy and working-set prefetch, and counted in the
// binding's stats.
//
// DELETE /vms/{id} stops listening and removes the socket file before it returns. VMs served
// from the binding keep being served until they exit — a restored guest is not killed because
// its orchestrator let go of the socket — and the binding is listed as draining until then, its
// id still taken; DELETE /vms/{id}?force=true ends them now by the failure policy (SIGKILL by
// default). When the last VM of a deleted binding is gone, the binding goes and its snapshot
// reference is released.
//
// # Bounds
//
// At most Config.MaxVMs bindings exist at once, draining ones included (a PUT beyond it is 429).
// The memory of decompressed frames is bounded once per daemon, Config.CacheSize, shared by
// every packed snapshot open: each gets an equal share, resized as snapshots open and close
// (snapshot.Snapshot.SetCacheSize), and a snapshot that would leave each share below
// Config.MinCacheSize is refused (503) until another closes. A raw memory file costs no share:
// its pages are the kernel's page cache. A snapshot is closed when the last binding using it
// is gone.
//
// # State directory: crashes and upgrades
//
// With Config.StateDir the server keeps its bindings in StateDir/fleet.json (a format name and
// version, the bindings, a SHA-256 of them; written to a temporary file, fsynced and renamed on
// every PUT and DELETE; a corrupt file or one of another version fails ListenControl with
// daemon.ErrStateCorrupt or daemon.ErrStateVersion), holds the flock StateDir/fleet.lock, and
// gives each binding's daemon the state directory StateDir/bindings/<id> (removed when a
// deleted binding is gone). ListenControl on a state directory whose fleet died makes every
// binding of fleet.json again — their daemons recover their VMs — and then listens on the
// control socket. With Config.Takeover it connects to the running fleet's
// StateDir/control-handoff.sock instead: the old fleet refuses PUT and DELETE (503), stops
// accepting on the control socket without closing it and passes it over (SCM_RIGHTS) with its
// lock; the new one starts every binding's daemon with daemon.Config.Takeover, each taking its
// VMs over from the old binding's daemon, serves the control API on the socket received, and
// says done; the old fleet's Done is closed once each of its bindings' daemons has returned
// (bindings a DELETE was draining stay with it until their VMs exit). A takeover that finds no
// live fleet recovers as after a crash; one that fails before done leaves the old fleet serving
// the control API again.
//
// # File descriptors
//
// The Server owns the control socket and the opened snapshots (their files, mappings and
// caches); each binding's Daemon owns its UFFD socket and everything of the VMs it serves, and
// never closes the shared snapshot, which the Server closes after the last Daemon using it has
// returned from Serve.
package fleet
