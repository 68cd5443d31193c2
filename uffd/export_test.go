//go:build linux

package uffd

// Hooks for the external tests (package uffd_test). Add new ones at the end.

// APIRaw issues UFFDIO_API with an arbitrary api number and returns the struct as the kernel
// left it (api, features, ioctls) and the errno.
func APIRaw(f *FD, api uint64, features Feature) (uint64, uint64, uint64, error) {
	a, errno := f.apiRaw(api, features)
	if errno != 0 {
		return a.api, a.features, a.ioctls, errno
	}
	return a.api, a.features, a.ioctls, nil
}

// ResultUntouched is the sentinel preset in result fields.
const ResultUntouched = resultUntouched
