// Package cli implements the faultline command: a table of subcommands, each in its own file,
// run in-process so that tests call [Run] directly.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
)

// A Command is one faultline subcommand.
type Command struct {
	Name    string // the word after "faultline"
	Summary string // one line for `faultline help`
	// Run runs the command with the arguments after its name and returns the exit code: 0 on
	// success, 1 on failure, 2 on a usage error.
	Run func(args []string, stdout, stderr io.Writer) int
}

// commands is the table of subcommands. Each command's file adds itself with register from an
// init function.
var commands []*Command

func register(c *Command) {
	for _, o := range commands {
		if o.Name == c.Name {
			panic("cli: command " + c.Name + " registered twice")
		}
	}
	commands = append(commands, c)
	slices.SortFunc(commands, func(a, b *Command) int { return strings.Compare(a.Name, b.Name) })
}

func lookup(name string) *Command {
	for _, c := range commands {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// Run runs faultline with args (os.Args[1:]) and returns the process exit code.
func Run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch name := args[0]; name {
	case "help", "-h", "-help", "--help":
		if len(args) > 1 {
			c := lookup(args[1])
			if c == nil {
				fmt.Fprintf(stderr, "faultline help: unknown command %q\n", args[1])
				usage(stderr)
				return 2
			}
			return c.Run([]string{"-h"}, stdout, stdout)
		}
		usage(stdout)
		return 0
	default:
		c := lookup(name)
		if c == nil {
			fmt.Fprintf(stderr, "faultline: unknown command %q\n", name)
			usage(stderr)
			return 2
		}
		return c.Run(args[1:], stdout, stderr)
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "faultline serves page faults with userfaultfd.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: faultline <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	for _, c := range commands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.Name, c.Summary)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintln(w, `Run "faultline help <command>" for a command's flags.`)
}

// newFlagSet makes a flag set for a command whose usage text (printed on -h and on flag
// errors) is synopsis followed by the flags.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("faultline "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: faultline %s %s\n", name, synopsis)
		var any bool
		fs.VisitAll(func(*flag.Flag) { any = true })
		if any {
			fmt.Fprintln(fs.Output(), "\nFlags:")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parseFlags parses args; when it returns ok false the command must return code (0 after -h, 2
// after a usage error, whose message the flag set has printed).
func parseFlags(fs *flag.FlagSet, args []string) (code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	return 0, true
}
