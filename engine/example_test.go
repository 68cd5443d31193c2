//go:build linux

package engine_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"time"

	"golang.org/x/sys/unix"

	"github.com/faultline-go/faultline/engine"
	"github.com/faultline-go/faultline/source"
	"github.com/faultline-go/faultline/uffd"
)

// An owner — the page-fault handler of a VMM — receives the userfaultfd the VMM created and
// registered, and serves the guest's memory from a snapshot file until the VMM exits. (The
// Firecracker handshake, which also sends the region list, is in package firecracker.)
func ExampleNew() {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: "/run/vm0-uffd.sock", Net: "unix"})
	if err != nil {
		log.Fatal(err)
	}
	conn, err := ln.AcceptUnix()
	if err != nil {
		log.Fatal(err)
	}
	// One message, the fd in SCM_RIGHTS.
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		log.Fatal(err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		log.Fatalf("no fd received: %v", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		log.Fatalf("no fd received: %v", err)
	}
	fd, err := uffd.NewFD(fds[0], false) // the VMM did the handshake; O_NONBLOCK for the netpoller
	if err != nil {
		log.Fatal(err)
	}

	snap, err := source.OpenFile("/var/lib/vm0/memory.snap")
	if err != nil {
		log.Fatal(err)
	}
	defer snap.Close() // after Run: the engine reads it until then

	// Where the VMM mapped guest memory, from the handshake.
	regions := []engine.Region{{
		Name: "guest", Base: 0x40000000, Size: 1 << 30, PageSize: 4096,
		Offset: 0, Source: snap,
	}}
	e, err := engine.New(fd, regions, engine.Options{
		Workers:     2,
		FaultAround: engine.FaultAround{Min: 1, Max: 16, Adaptive: true},
	})
	if err != nil {
		fd.Close() // New refused the regions; the fd is still ours
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	switch err := e.Run(ctx); {
	case err == nil:
		log.Print("stopped")
	case errors.Is(err, engine.ErrProcessGone):
		log.Print("the VM exited")
	default:
		// A fault that cannot be served: the vCPU waits on it forever. Kill the VM.
		log.Printf("cannot serve the VM: %v", err)
	}
	for _, st := range e.Stats() {
		log.Printf("%s: %d faults, %d pages installed ahead, p99 %v", st.Region, st.Faults, st.PagesAround, st.Latency.Quantile(0.99))
	}
}

// Latency is a histogram with power-of-two buckets; Quantile interpolates linearly within the
// bucket the quantile falls in, so its answer is an estimate, not a measured value.
func ExampleHistogram_Quantile() {
	h := engine.Histogram{Counts: make([]uint64, 28)}
	for i := 0; i < 27; i++ {
		h.Bounds = append(h.Bounds, time.Duration(256<<i)) // 256ns, 512ns, 1.024µs, ...
	}
	h.Counts[3] = 90 // 90 faults served in (1.024µs, 2.048µs]
	h.Counts[6] = 9  // 9 in (8.192µs, 16.384µs]
	h.Counts[12] = 1 // 1 in (524.288µs, 1.048576ms]
	h.Count = 100

	fmt.Println("p50 ", h.Quantile(0.5))
	fmt.Println("p90 ", h.Quantile(0.9))
	fmt.Println("p99 ", h.Quantile(0.99))
	fmt.Println("max ", h.Quantile(1))
	fmt.Println("none", engine.Histogram{}.Quantile(0.5))
	// Output:
	// p50  1.592µs
	// p90  2.048µs
	// p99  16.384µs
	// max  1.048576ms
	// none 0s
}
