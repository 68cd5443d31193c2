package daemon_test

import (
	"fmt"

	"github.com/faultline-go/faultline/internal/kerneltest"
)

var fmtSprintf = fmt.Sprintf

// waitUntil polls real state (counters, logs, files) for up to 10 s.
var waitUntil = kerneltest.WaitUntil
