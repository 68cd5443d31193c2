package daemon

import "errors"

// ErrStateVersion says a state file was written by a faultline of another state format.
var ErrStateVersion = errors.New("daemon: state directory from another faultline version")

// ErrStateCorrupt says a state file is not one faultline wrote whole.
var ErrStateCorrupt = errors.New("daemon: state directory corrupt")

// ErrStateLocked says another daemon holds the state directory.
var ErrStateLocked = errors.New("daemon: state directory in use by another daemon")
