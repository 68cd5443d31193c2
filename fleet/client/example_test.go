package client_test

import (
	"context"
	"fmt"
	"log"

	"github.com/faultline-go/faultline/fleet/client"
)

// A fleet orchestrator binds a UFFD socket per VM to the snapshot it restores from, gives that
// socket to Firecracker's PUT /snapshot/load as the Uffd backend_path, and removes the binding
// when the VM is gone. (It needs a running faultline serve --control, so it is not run.)
func Example() {
	ctx := context.Background()
	c := client.New("/run/faultline/control.sock")
	vm, err := c.Create(ctx, "vm-42", client.Spec{
		Snapshot: "/var/lib/snapshots/python-3.13",
		Socket:   "/run/faultline/vm-42.uffd.sock",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(vm.State) // listening: Firecracker may connect now
	// ... restore the VM with mem_backend {"backend_type": "Uffd", "backend_path": vm.Socket} ...
	if vm, err = c.Get(ctx, "vm-42"); err == nil {
		fmt.Println(vm.Stats.Faults, vm.Stats.Pages, vm.Stats.Prefetched)
	}
	if _, err := c.Delete(ctx, "vm-42", false); err != nil {
		log.Fatal(err)
	}
}
