//go:build !linux

package engine

import (
	"context"
	"errors"
	"fmt"

	"github.com/faultline-go/faultline/uffd"
)

// Engine serves the faults of one userfaultfd. userfaultfd exists only on Linux: elsewhere New
// fails with an error matching uffd.ErrUnsupported and errors.ErrUnsupported, so that a program
// importing the engine builds on every system.
type Engine struct{}

var errNotLinux = fmt.Errorf("engine: userfaultfd exists only on Linux: %w (%w)", uffd.ErrUnsupported, errors.ErrUnsupported)

// New fails with ErrUnsupported on this system.
func New(fd *uffd.FD, regions []Region, opts Options) (*Engine, error) {
	if err := validate(regions); err != nil {
		return nil, err
	}
	return nil, errNotLinux
}

// Run fails with ErrUnsupported on this system.
func (e *Engine) Run(ctx context.Context) error { return errNotLinux }

// Close does nothing.
func (e *Engine) Close() {}

// Done is closed: there is nothing to run.
func (e *Engine) Done() <-chan struct{} { c := make(chan struct{}); close(c); return c }

// Stats returns nothing.
func (e *Engine) Stats() []Stats { return nil }

// Dirty returns nothing.
func (e *Engine) Dirty(region string) []int { return nil }

// Installed returns nothing.
func (e *Engine) Installed() map[string]int { return map[string]int{} }

// Recorded returns nothing.
func (e *Engine) Recorded() []Touch { return nil }

// StopRecording does nothing.
func (e *Engine) StopRecording() {}

// Prefetch fails with ErrUnsupported on this system.
func (e *Engine) Prefetch(ctx context.Context, next func() (PageRun, error)) (PrefetchStats, error) {
	return PrefetchStats{}, errNotLinux
}

// PrefetchTotals returns nothing.
func (e *Engine) PrefetchTotals() PrefetchStats { return PrefetchStats{} }

// Resume fails with ErrUnsupported on this system.
func Resume(fd *uffd.FD, regions []Region, opts Options) (*Engine, error) {
	if err := validate(regions); err != nil {
		return nil, err
	}
	return nil, errNotLinux
}
