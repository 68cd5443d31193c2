//go:build !linux

package snapshot

import "os"

// Read-ahead advice is a Linux optimisation; elsewhere the defaults stand.
func adviseRandom(*os.File)     {}
func adviseSequential(*os.File) {}
