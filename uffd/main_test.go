//go:build linux

package uffd_test

import (
	"os"
	"testing"

	"github.com/faultline-go/faultline/internal/puppet"
)

func TestMain(m *testing.M) {
	puppet.Main() // the child side of cross-process tests; returns at once in the test process
	os.Exit(m.Run())
}
