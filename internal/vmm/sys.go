//go:build linux

package vmm

import "golang.org/x/sys/unix"

const madvDontneed = unix.MADV_DONTNEED

func closeFD(fd int) { unix.Close(fd) }
