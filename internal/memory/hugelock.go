//go:build linux

package memory

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// hugeLockPath is shared by every process of the project's tests.
const hugeLockPath = "/tmp/faultline-hugepages.lock"

var hugeLock struct {
	sync.Mutex
	f     *os.File
	count int
}

// LockHugePages takes the machine-wide huge page lock, which a test holds while it uses huge
// pages. go test runs packages in parallel, and hugetlb memory mapped MAP_NORESERVE (as
// Firecracker maps it) reserves nothing: two packages' tests would drain the pool under each
// other, and a test that empties the pool on purpose would break everyone else's. So huge page
// users are serialized across processes. Within a process the lock is reentrant: a test may
// take it several times (its tests run one at a time). Call the returned function to release.
func LockHugePages() (unlock func(), err error) {
	hugeLock.Lock()
	defer hugeLock.Unlock()
	if hugeLock.count == 0 {
		f, err := os.OpenFile(hugeLockPath, os.O_CREATE|os.O_RDWR, 0o666)
		if err != nil {
			return nil, fmt.Errorf("huge page lock: %w", err)
		}
		for {
			err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
			if err != unix.EINTR {
				break
			}
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("huge page lock: %w", err)
		}
		hugeLock.f = f
	}
	hugeLock.count++
	var once sync.Once
	return func() {
		once.Do(func() {
			hugeLock.Lock()
			defer hugeLock.Unlock()
			if hugeLock.count--; hugeLock.count == 0 {
				hugeLock.f.Close()
				hugeLock.f = nil
			}
		})
	}, nil
}
