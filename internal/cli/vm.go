package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/faultline-go/faultline/fleet/client"
)

func init() {
	register(&Command{
		Name:    "vm",
		Summary: "create, list and remove the VM bindings of a fleet (faultline serve --control)",
		Run:     runVM,
	})
}

const vmUsage = `Usage: faultline vm <create|ls|show|rm> [flags]

  faultline vm create ID --control PATH (--snapshot REF | --mem-file PATH) --socket PATH [--record]
      bind a UFFD socket to a snapshot; when it returns the socket listens: give it to
      Firecracker's PUT /snapshot/load as the Uffd backend_path
  faultline vm ls --control PATH [--json]
      every binding with its stats, as a table
  faultline vm show ID --control PATH
      one binding with its stats, as JSON
  faultline vm rm ID --control PATH [--force]
      stop listening and remove the socket file; VMs served keep being served until they exit,
      or with --force are ended now by the daemon's failure policy
`

func runVM(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		w := stderr
		if len(args) > 0 {
			w = stdout
		}
		fmt.Fprint(w, vmUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("faultline vm "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), vmUsage)
		fmt.Fprintln(fs.Output(), "\nFlags:")
		fs.PrintDefaults()
	}
	control := fs.String("control", "", "the fleet daemon's control socket (serve --control; required)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long the call may take")
	var needID bool
	var run func(ctx context.Context, c *client.Client, id string) error
	switch sub {
	case "create":
		snap := fs.String("snapshot", "", "packed snapshot directory, or a URL the daemon can open (this or --mem-file)")
		mem := fs.String("mem-file", "", "raw memory snapshot file (this or --snapshot)")
		socket := fs.String("socket", "", "UFFD socket path to listen on (required)")
		record := fs.Bool("record", false, "record the working set of the VMs served into --snapshot")
		needID = true
		run = func(ctx context.Context, c *client.Client, id string) error {
			if *socket == "" || (*snap == "") == (*mem == "") {
				return usageError("--socket and one of --snapshot or --mem-file are required")
			}
			vm, err := c.Create(ctx, id, client.Spec{Snapshot: abs(*snap), MemFile: abs(*mem), Socket: abs(*socket), Record: *record})
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "%s %s on %s, serving %s\n", vm.ID, vm.State, vm.Socket, vmSnapshot(*vm))
			return nil
		}
	case "ls":
		asJSON := fs.Bool("json", false, "print the bindings as JSON")
		run = func(ctx context.Context, c *client.Client, _ string) error {
			vms, err := c.List(ctx)
			if err != nil {
				return err
			}
			if *asJSON {
				return printJSON(stdout, vms)
			}
			printVMs(stdout, vms)
			return nil
		}
	case "show":
		needID = true
		run = func(ctx context.Context, c *client.Client, id string) error {
			vm, err := c.Get(ctx, id)
			if err != nil {
				return err
			}
			return printJSON(stdout, vm)
		}
	case "rm":
		force := fs.Bool("force", false, "end the VMs served now, by the daemon's failure policy (default: let them finish)")
		needID = true
		run = func(ctx context.Context, c *client.Client, id string) error {
			vm, err := c.Delete(ctx, id, *force)
			if err != nil {
				return err
			}
			switch {
			case *force || vm.Stats.Live == 0:
				fmt.Fprintf(stdout, "%s removed\n", vm.ID)
			default:
				fmt.Fprintf(stdout, "%s removed: its socket is gone; %d VM(s) still served until they exit\n", vm.ID, vm.Stats.Live)
			}
			return nil
		}
	default:
		fmt.Fprintf(stderr, "faultline vm: unknown subcommand %q\n", sub)
		fmt.Fprint(stderr, vmUsage)
		return 2
	}
	// The id may come before the flags (vm create ID --control ...) or after them.
	var id string
	if needID && len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		id, args = args[0], args[1:]
	}
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if needID && id == "" && fs.NArg() > 0 {
		id = fs.Arg(0)
		if code, ok := parseFlags(fs, fs.Args()[1:]); !ok { // flags after the id
			return code
		}
	}
	switch {
	case *control == "":
		fmt.Fprintf(stderr, "faultline vm %s: --control is required\n", sub)
		return 2
	case needID && id == "":
		fmt.Fprintf(stderr, "faultline vm %s: the VM id is required\n", sub)
		return 2
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "faultline vm %s: unexpected arguments %q\n", sub, fs.Args())
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := run(ctx, client.New(*control), id); err != nil {
		fmt.Fprintf(stderr, "faultline vm %s: %v\n", sub, err)
		if _, ok := err.(usageError); ok {
			return 2
		}
		return 1
	}
	return 0
}

type usageError string

func (e usageError) Error() string { return string(e) }

func vmSnapshot(vm client.VM) string {
	if vm.MemFile != "" {
		return "mem_file " + vm.MemFile
	}
	return vm.Snapshot
}

func printVMs(w io.Writer, vms []client.VM) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tLIVE\tSERVED\tFAULTS\tPAGES\tPREFETCHED\tSOCKET\tSNAPSHOT")
	for _, vm := range vms {
		st := vm.Stats
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", vm.ID, vm.State, st.Live, st.Served, st.Faults, st.Pages, st.Prefetched, vm.Socket, vmSnapshot(vm))
	}
	tw.Flush()
}

func printJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// abs makes a local path absolute for the fleet, which takes no relative ones ("" and URLs
// stay as they are).
func abs(p string) string {
	if p == "" || filepath.IsAbs(p) || strings.Contains(p, "://") {
		return p
	}
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
