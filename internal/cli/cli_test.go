package cli

import (
	"bytes"
	"strings"
	"testing"
)

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestHelpListsCommands(t *testing.T) {
	code, out, errs := run("help")
	if code != 0 || errs != "" {
		t.Fatalf("help: exit %d, stderr %q", code, errs)
	}
	for _, c := range commands {
		if !strings.Contains(out, "  "+c.Name+" ") || !strings.Contains(out, c.Summary) {
			t.Errorf("help does not list %q (%q):\n%s", c.Name, c.Summary, out)
		}
	}
	if !strings.Contains(out, "  probe ") {
		t.Errorf("help does not list probe:\n%s", out)
	}

	// No arguments: the same list, as a usage error.
	code, out, errs = run()
	if code != 2 || out != "" || !strings.Contains(errs, "  probe ") {
		t.Errorf("no args: exit %d, stdout %q, stderr:\n%s", code, out, errs)
	}
}

func TestUnknownCommand(t *testing.T) {
	code, _, errs := run("frobnicate")
	if code != 2 || !strings.Contains(errs, `unknown command "frobnicate"`) || !strings.Contains(errs, "  probe ") {
		t.Errorf("unknown command: exit %d, stderr:\n%s", code, errs)
	}
	code, _, errs = run("help", "frobnicate")
	if code != 2 || !strings.Contains(errs, `unknown command "frobnicate"`) {
		t.Errorf("help of unknown command: exit %d, stderr:\n%s", code, errs)
	}
}

func TestRegisterTwicePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("registering probe twice did not panic")
		}
	}()
	register(&Command{Name: "probe"})
}
