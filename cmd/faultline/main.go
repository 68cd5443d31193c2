// Command faultline is the userfaultfd toolkit's command line: probe the kernel, and more (run
// "faultline help"). Everything lives in internal/cli.
package main

import (
	"os"

	"github.com/faultline-go/faultline/internal/cli"
	"github.com/faultline-go/faultline/internal/puppet"
)

func main() {
	puppet.Main() // the child side when a command starts this binary as a puppet; returns otherwise
	os.Exit(cli.Run(os.Args[1:], os.Stdout, os.Stderr))
}
