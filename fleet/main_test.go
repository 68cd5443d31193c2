//go:build linux

package fleet_test

import (
	"encoding/json"
	"os"
	"testing"

	"github.com/faultline-go/faultline/internal/cli"
	"github.com/faultline-go/faultline/internal/puppet"
)

func TestMain(m *testing.M) {
	puppet.Main()
	// A fleet as a process of its own (state_test.go): faultline serve with these arguments.
	if js := os.Getenv(envTestServe); js != "" {
		var args []string
		if err := json.Unmarshal([]byte(js), &args); err != nil {
			os.Exit(2)
		}
		os.Exit(cli.Run(args, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}
