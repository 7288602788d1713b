package machine_test

import (
	"context"
	"errors"
	"fmt"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// The seed scenario: a destination listens on rdma:, then a client switches
// mapped-ram on. QEMU accepts it and never checks again; the controller
// refuses it at once, naming the capability and the transport — and when a
// source connects announcing mapped-ram, the connect edge refuses it too
// and the side fails with the reason.
func Example() {
	s, err := migctl.Spec() // transitions.yaml, embedded
	if err != nil {
		panic(err)
	}
	c, err := machine.New(s, machine.Options{Incoming: true}) // a destination (QEMU's -incoming)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	ctx := context.Background()

	rdma := &machine.Args{Endpoint: &guards.Endpoint{Transport: "rdma", URI: "rdma:0.0.0.0:4444"}}
	out, _ := c.Fire(ctx, spec.Incoming, machine.TriggerIncoming, rdma)
	fmt.Println("migrate-incoming:", out.From, "→", out.To)
	out, _ = c.Fire(ctx, spec.Incoming, machine.TriggerListen, nil)
	fmt.Println("listener open:", out.From, "→", out.To)

	err = c.SetCapabilities(ctx, map[string]bool{"mapped-ram": true})
	var ge *machine.GuardError
	if errors.As(err, &ge) {
		fmt.Println("set mapped-ram refused by", ge.Guards, "rules:")
		for _, r := range ge.Refusals {
			fmt.Println(" ", r.Rule)
		}
	}

	// What only connect can know: the source announces mapped-ram on.
	peer := &guards.Peer{Caps: map[string]bool{"mapped-ram": true}}
	out, err = c.Fire(ctx, spec.Incoming, machine.TriggerConnect, &machine.Args{Peer: peer})
	fmt.Println("connect:", out.From, "→", out.To, "refused:", out.Refused, "error:", err != nil)
	// Output:
	// migrate-incoming: none → setup
	// listener open: setup → listening
	// set mapped-ram refused by [transport-compatible] rules:
	//   mapped-ram/transports
	//   mapped-ram/needs-transport/seekable
	// connect: listening → failed refused: true error: true
}
