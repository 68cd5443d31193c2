//go:build linux

package fleet_test

import (
	"os"
	"testing"

	"github.com/faultline-go/faultline/internal/puppet"
)

func TestMain(m *testing.M) {
	puppet.Main()
	os.Exit(m.Run())
}
