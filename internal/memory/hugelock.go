//go:build linux

package memory

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// hugeLockPath is shared by every process of the project's tests: go test runs packages in
// parallel, and a test that empties the hugetlb pool on purpose must not do so while another
// package's test is using huge pages.
const hugeLockPath = "/tmp/faultline-hugepages.lock"

// LockHugePages takes the machine-wide huge page lock: shared for tests that use huge pages,
// exclusive for a test that changes the pool under everyone (an empty pool). It blocks until
// granted; call the returned function to release it.
func LockHugePages(exclusive bool) (unlock func(), err error) {
	f, err := os.OpenFile(hugeLockPath, os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		return nil, fmt.Errorf("huge page lock: %w", err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("huge page lock: %w", err)
	}
	return func() { f.Close() }, nil
}
