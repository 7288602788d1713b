package proc_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
)

// Run the built-in guest in a process of its own and drive it from this
// one. (The test binary's TestMain calls proc.Main, as migctl's main must.)
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := guest.Config{Size: 4 << 20, Seed: 1}
	p, c, err := proc.Start(ctx, proc.SpawnOptions{Config: proc.Config{Guest: cfg, Role: proc.RoleSource}}, proc.AttachOptions{})
	if err != nil {
		log.Fatal(err)
	}
	var g guest.Guest = c // the Client is a guest.Guest: the engine migrates it as any other
	fmt.Println("blocks:", len(g.Blocks()), g.Blocks()[0].Name, len(g.Blocks()[0].Mem)>>20, "MiB")

	local, _ := guest.New(cfg) // the same Config in this process: the same pattern
	defer local.Close()
	a, _ := c.Checksum(ctx)
	b, _ := local.Checksum()
	fmt.Println("same memory as an in-process guest:", a == b)

	if err := c.Quit(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("exit:", p.Wait(ctx))
	// Output:
	// blocks: 2 pc.ram 4 MiB
	// same memory as an in-process guest: true
	// exit: <nil>
}
