package daemon_test

import "fmt"

var fmtSprintf = fmt.Sprintf
