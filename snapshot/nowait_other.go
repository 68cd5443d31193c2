//go:build !linux

package snapshot

// readNoWait is not available: every read may wait.
func (oc *openChunk) readNoWait([]byte, int64) bool { return false }
