//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/uffd"
)

// forkState is what a forked child inherits: its parent's page state and span table as they are
// when the FORK event is read (the pages installed and removed until then).
type forkState struct {
	states []*pageState
	tab    table
}

// cloneStates copies the page state and the span table for a forked child. The caller holds
// e.mu exclusively.
func (e *Engine) cloneStates() forkState {
	fs := forkState{states: make([]*pageState, len(e.states))}
	byParent := make(map[*pageState]*pageState, len(e.states))
	for i, st := range e.states {
		fs.states[i] = st.clone(e.opts.FaultAround)
		byParent[st] = fs.states[i]
	}
	for _, s := range *e.tab.Load() {
		fs.tab = append(fs.tab, span{base: s.base, first: s.first, n: s.n, st: byParent[s.st]})
	}
	return fs
}

// startForks sets up and starts the engines of the batch's FORK events, outside the lock.
func (r *reader) startForks() {
	for i, fd := range r.forks {
		if err := r.e.fork(fd, r.clones[i]); err != nil {
			// The child's faults cannot be served: its memory is ours to serve and nobody else
			// will. Stop, so the owner applies its failure policy.
			r.e.fail(err)
		}
		r.clones[i] = forkState{}
	}
	r.forks, r.clones = r.forks[:0], r.clones[:0]
}

// dropForks closes the child uffds of a batch that failed: the engine stops, and a child's
// threads are woken once nobody holds its uffd.
func (r *reader) dropForks() {
	for _, fd := range r.forks {
		unix.Close(fd)
	}
	r.forks, r.clones = r.forks[:0], r.clones[:0]
}

// fork starts the engine serving a forked child's userfaultfd, with the page state cloned when
// its event was read.
func (e *Engine) fork(fd int, fs forkState) error {
	if e.stopping.Load() {
		unix.Close(fd)
		return nil
	}
	cfd, err := uffd.NewFD(fd, false)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("engine: fork event: %w", err)
	}
	opts := e.opts
	opts.Durable = nil // the parent's; a child keeps nothing durable
	c := newEngine(cfd, opts)
	c.states = fs.states
	c.tab.Store(&fs.tab)
	if err := c.init(); err != nil {
		cfd.Close()
		return err
	}
	e.childMu.Lock()
	e.children = append(e.children, c)
	e.childWG.Add(1)
	e.childMu.Unlock()
	go func() {
		defer e.childWG.Done()
		err := c.Run(context.Background())
		if err != nil && !errors.Is(err, ErrProcessGone) && !errors.Is(err, ErrRunOnce) {
			e.log.Error("engine: serving forked child failed", "err", err)
		}
	}()
	if e.stopping.Load() {
		c.Close() // the parent began stopping meanwhile: Run's closeChildren may have missed it
	}
	if e.opts.OnFork != nil {
		e.opts.OnFork(c)
	}
	return nil
}
