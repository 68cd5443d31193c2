//go:build linux

package daemon

// SetTestHookTakeover makes a successor call f once it has received everything in a takeover,
// before it resumes any VM.
func SetTestHookTakeover(f func()) { testHookTakeover = f }
