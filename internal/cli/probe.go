package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/faultline-go/faultline/probe"
	"github.com/faultline-go/faultline/uffd"
)

func init() {
	register(&Command{
		Name:    "probe",
		Summary: "report what userfaultfd can do on this machine, for this user",
		Run:     runProbe,
	})
}

func runProbe(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("probe", "[--json]\n\n"+
		"Probe tries every way of creating a userfaultfd, the handshake, and UFFDIO_REGISTER on\n"+
		"each kind of memory in each mode, and says what to change where something is missing.", stderr)
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "faultline probe: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	s, err := probe.Run()
	if err != nil {
		fmt.Fprintln(stderr, "faultline probe:", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(s); err != nil {
			fmt.Fprintln(stderr, "faultline probe:", err)
			return 1
		}
		return 0
	}
	printSupport(stdout, s)
	return 0
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "no"
}

// outcome prints an attempt as "yes" or "no (EPERM)".
func outcome(a probe.Attempt) string {
	switch {
	case a.OK:
		return "yes"
	case a.Errno != "":
		return "no (" + a.Errno + ")"
	case a.Error != "":
		return "no (" + a.Error + ")"
	}
	return "no"
}

func size(n int) string {
	switch {
	case n == 0:
		return "unknown"
	case n%(1<<30) == 0:
		return strconv.Itoa(n>>30) + " GiB"
	case n%(1<<20) == 0:
		return strconv.Itoa(n>>20) + " MiB"
	case n%(1<<10) == 0:
		return strconv.Itoa(n>>10) + " KiB"
	}
	return strconv.Itoa(n) + " B"
}

func owner(uid, gid int) string {
	u, g := strconv.Itoa(uid), strconv.Itoa(gid)
	if x, err := user.LookupId(u); err == nil {
		u = x.Username
	}
	if x, err := user.LookupGroupId(g); err == nil {
		g = x.Name
	}
	return u + ":" + g
}

// printSupport writes the report as tables, one section per aspect.
func printSupport(w io.Writer, s *probe.Support) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	section := func(title string) {
		tw.Flush()
		fmt.Fprintln(w, title)
	}
	row := func(cells ...string) { fmt.Fprintln(tw, "  "+strings.Join(cells, "\t")) }

	section("kernel")
	row("release", s.Kernel.Release+" ("+s.Kernel.Machine+")")
	row("page size", size(s.Kernel.PageSize))
	row("huge page size", size(s.Kernel.HugePageSize))

	c := s.Creation
	section("\ncreation")
	d := c.Device
	if d.Exists {
		desc := fmt.Sprintf("%s %s (%s)", d.Mode, owner(d.UID, d.GID), d.Perm)
		row(d.Path, desc)
		row("  open", outcome(d.Open))
		row("  USERFAULTFD_IOC_NEW", outcome(d.New))
	} else {
		row(d.Path, "missing")
	}
	row("userfaultfd(2)", outcome(c.Syscall))
	row("userfaultfd(2) user-mode-only", outcome(c.SyscallUserModeOnly))
	sysctl := "absent"
	if c.UnprivilegedUserfaultfd != nil {
		sysctl = strconv.Itoa(*c.UnprivilegedUserfaultfd)
	}
	row("vm.unprivileged_userfaultfd", sysctl)
	row("CAP_SYS_PTRACE", fmt.Sprintf("%s (euid %d)", yesNo(c.CapSysPtrace), c.EUID))

	f := s.Features
	if f.Handshake.OK {
		how := f.FD
		if f.UserModeOnly {
			how += ", user-mode-only"
		}
		section(fmt.Sprintf("\nfeatures (UFFDIO_API on a throwaway fd from %s: %#x)", how, uint64(f.Supported.Feature)))
	} else {
		section("\nfeatures (UFFDIO_API failed: " + f.Handshake.Error + ")")
	}
	row("FEATURE", "BIT", "SUPPORTED", "MUST BE REQUESTED")
	uffd.KnownFeatures.Each(func(ft uffd.Feature) {
		row(ft.Name(), fmt.Sprintf("%#x", uint64(ft)), yesNo(f.Supported.Has(ft)), yesNo(uffd.BehaviourFeatures.Has(ft)))
	})
	if extra := f.Supported.Feature &^ uffd.KnownFeatures; extra != 0 {
		row(fmt.Sprintf("%#x", uint64(extra)), "", "yes (unknown to faultline)", "?")
	}
	tw.Flush()
	fmt.Fprintln(w, "  EVENT_FORK can be enabled by this caller: "+outcome(f.EventFork))

	printRegister(w, tw, section, s)

	section("\nmemory")
	h := s.HugePages
	if h.Error != "" {
		row("hugepages", "unknown ("+h.Error+")")
	} else {
		row("hugepages", fmt.Sprintf("%d free of %d (%s pages)", h.Free, h.Total, size(h.Size)))
	}
	row("THP", "enabled "+orUnknown(s.THP.Enabled)+", shmem "+orUnknown(s.THP.ShmemEnabled))
	scan := yesNo(s.PagemapScan.Supported)
	switch {
	case s.PagemapScan.Error != "":
		scan = "unknown (" + s.PagemapScan.Error + ")"
	case !s.PagemapScan.Supported:
		scan += " (" + s.PagemapScan.Errno + ")"
	}
	row("PAGEMAP_SCAN", scan)

	section("\nadvice")
	tw.Flush()
	if len(s.Advice) == 0 {
		fmt.Fprintln(w, "  none: everything userfaultfd offers is available")
	}
	for _, a := range s.Advice {
		fmt.Fprintln(w, "  - "+a)
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// printRegister prints the registration matrix, kinds × modes, each cell the ioctls answered
// (hex) or the errno, then the names of each ioctl set that appeared.
func printRegister(w io.Writer, tw *tabwriter.Writer, section func(string), s *probe.Support) {
	section("\nregister (UFFDIO_REGISTER of an untouched area: ioctls answered, or the error)")
	var kinds []string
	var modes []uffd.RegisterMode
	for _, r := range s.Register {
		if !slices.Contains(kinds, r.Kind) {
			kinds = append(kinds, r.Kind)
		}
		if !slices.Contains(modes, r.ModeBits) {
			modes = append(modes, r.ModeBits)
		}
	}
	header := []string{"KIND"}
	for _, m := range modes {
		header = append(header, m.String())
	}
	fmt.Fprintln(tw, "  "+strings.Join(header, "\t"))
	var sets []uffd.Ioctls
	for _, k := range kinds {
		line := []string{k}
		for _, m := range modes {
			cell := "-"
			if r, ok := s.Registration(k, m); ok {
				switch {
				case r.OK:
					cell = fmt.Sprintf("%#x", uint64(r.Ioctls.Ioctls))
					if !slices.Contains(sets, r.Ioctls.Ioctls) {
						sets = append(sets, r.Ioctls.Ioctls)
					}
				case r.Errno != "":
					cell = r.Errno
				default:
					cell = "failed"
				}
			}
			line = append(line, cell)
		}
		fmt.Fprintln(tw, "  "+strings.Join(line, "\t"))
	}
	tw.Flush()
	if len(sets) == 0 {
		return
	}
	slices.Sort(sets)
	fmt.Fprintln(w)
	for _, io := range sets {
		fmt.Fprintf(tw, "  %#x\t%v\n", uint64(io), io)
	}
	tw.Flush()
}
