//go:build linux

package daemon_test

import (
	"os"
	"testing"

	"github.com/faultline-go/faultline/internal/puppet"
)

func TestMain(m *testing.M) {
	puppet.Main()
	testDaemonMain() // a daemon of its own in a separate process, for the crash and hand-off tests
	os.Exit(m.Run())
}
