//go:build !linux

package puppet

// Main returns at once off Linux: a puppet serves kernel tests, which need userfaultfd, so no
// command starts one there.
func Main() {}
