package engine_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// Migrating a small built-in guest between two goroutines over a unix
// socket: what an embedder does on each side. The destination's controller
// is built with Incoming (QEMU's -incoming); loaders.Listen waits for the
// source on its own goroutine, outside the controller lock; engine.Start
// runs the source's precopy passes on another.
func Example() {
	s, err := migctl.Spec()
	if err != nil {
		panic(err)
	}
	cfg := guest.Config{Size: 8 << 20, DirtyRate: 4 << 20, Seed: 3}

	// Destination: an empty guest of the same layout, waiting.
	dg, err := guest.NewDestination(cfg)
	if err != nil {
		panic(err)
	}
	defer dg.Close()
	dc, err := machine.New(s, machine.Options{Incoming: true})
	if err != nil {
		panic(err)
	}
	defer dc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// QMP stop while it waits (QEMU's -S): the guest stays paused when it
	// arrives, so its memory can be compared with the source's below.
	if _, err := dc.Fire(ctx, spec.Guest, machine.TriggerStop, nil); err != nil {
		panic(err)
	}
	dir, err := os.MkdirTemp("", "migctl-example-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	in, err := loaders.Listen(ctx, dc, dg, "unix:"+filepath.Join(dir, "migration.sock"), loaders.Options{})
	if err != nil {
		panic(err)
	}

	// Source: a running guest that dirties memory while it migrates.
	sg, err := guest.New(cfg)
	if err != nil {
		panic(err)
	}
	defer sg.Close()
	if err := sg.Start(); err != nil {
		panic(err)
	}
	sc, err := machine.New(s, machine.Options{}) // its guest graph boots: the guest runs
	if err != nil {
		panic(err)
	}
	defer sc.Close()
	if err := sc.SetParameters(ctx, map[string]any{"max-bandwidth": 0}); err != nil { // QEMU's default is 128 MiB/s
		panic(err)
	}
	m, err := engine.Start(ctx, sc, sg, in.Addr().String(), engine.Options{Checksum: sg.Checksum})
	if err != nil {
		panic(err)
	}
	sr, _ := m.Wait(ctx)
	dr, _ := in.Wait(ctx)
	fmt.Println("source:", sr.State, sr.Err)
	fmt.Println("destination:", dr.State, dr.Err)
	sum, _ := dg.Checksum()
	fmt.Println("memory equal:", sum == sr.Stats.Checksum)

	// QMP cont: the guest graph decides, then the guest runs here.
	out, _ := dc.Fire(ctx, spec.Guest, machine.TriggerCont, nil)
	if out.To == machine.GuestRunning {
		dg.Start()
	}
	fmt.Println("destination guest running:", dg.Running(), "; source guest running:", sg.Running())
	// Output:
	// source: completed <nil>
	// destination: completed <nil>
	// memory equal: true
	// destination guest running: true ; source guest running: false
}
