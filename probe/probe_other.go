//go:build !linux

package probe

import (
	"fmt"

	"github.com/faultline-go/faultline/uffd"
)

// Run reports what userfaultfd can do here; userfaultfd exists only on Linux, so here it fails
// with [uffd.ErrUnsupported].
func Run() (*Support, error) {
	return nil, fmt.Errorf("probe: %w: userfaultfd exists only on Linux", uffd.ErrUnsupported)
}
