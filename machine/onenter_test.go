package machine_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// entered is one OnEnter call.
type entered struct {
	trigger machine.Trigger
	out     machine.Outcome
}

// TestOnEnter: the hook sees every move (the guest graph's too) with its
// trigger and outcome, and nothing else: not a refusal, not an ignored
// trigger, not a trigger the state lacks, not a configuration change.
func TestOnEnter(t *testing.T) {
	var mu sync.Mutex
	var got []entered
	c, err := machine.New(defaultSpec(t), machine.Options{
		Facts: map[string]string{"page-size": "4096", "guest": "builtin-64M"},
		OnEnter: func(tr machine.Trigger, o machine.Outcome) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, entered{tr, o})
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	fire := func(side string, tr machine.Trigger) {
		t.Helper()
		_, _ = c.Fire(ctx, side, tr, argsFor(tr))
	}
	fire(spec.Outgoing, "cancel")   // none ignores cancel
	fire(spec.Outgoing, "complete") // none has no complete
	if err := c.SetCapabilities(ctx, map[string]bool{"events": true}); err != nil {
		t.Fatal(err)
	}
	fire(spec.Outgoing, "migrate")
	fire(spec.Outgoing, "start")
	fire(spec.Outgoing, "cancel")
	fire(spec.Outgoing, "cancel") // cancelling ignores it
	fire(spec.Outgoing, "cleanup")
	// Written by hand: New's boot, then the three moves of the outgoing side.
	want := []struct {
		side     string
		from, to machine.State
		trigger  machine.Trigger
	}{
		{spec.Guest, "prelaunch", "running", "boot"},
		{spec.Outgoing, "none", "setup", "migrate"},
		{spec.Outgoing, "setup", "active", "start"},
		{spec.Outgoing, "active", "cancelling", "cancel"},
		{spec.Outgoing, "cancelling", "cancelled", "cleanup"},
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Fatalf("OnEnter calls: %+v; want %d", got, len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.out.Side != w.side || g.out.From != w.from || g.out.To != w.to || g.trigger != w.trigger || !g.out.Moved {
			t.Errorf("call %d: %s %+v; want %s: %s --%s--> %s", i, g.trigger, g.out, w.side, w.from, w.trigger, w.to)
		}
	}
}

// TestOnEnterOutsideLock: the hook runs on the firing goroutine after the
// lock is released: while it blocks, the controller answers and shows the
// new state, and Fire has not returned yet.
func TestOnEnterOutsideLock(t *testing.T) {
	inHook := make(chan struct{})
	release := make(chan struct{})
	c, err := machine.New(defaultSpec(t), machine.Options{
		Facts: map[string]string{"page-size": "4096", "guest": "builtin-64M"},
		OnEnter: func(tr machine.Trigger, o machine.Outcome) {
			if o.Side != spec.Outgoing {
				return
			}
			close(inHook)
			<-release
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		_, _ = c.Fire(context.Background(), spec.Outgoing, "migrate", argsFor("migrate"))
	}()
	select {
	case <-inHook:
	case <-time.After(10 * time.Second):
		t.Fatal("OnEnter was not called")
	}
	// Status takes the controller lock: it would block for ever if the
	// hook ran under it.
	answered := make(chan machine.State, 1)
	go func() {
		st, _ := c.State(spec.Outgoing)
		answered <- st
	}()
	select {
	case st := <-answered:
		if st != "setup" {
			t.Errorf("state while the hook runs: %s, want setup", st)
		}
	case <-time.After(10 * time.Second):
		close(release)
		<-returned
		t.Fatal("the controller did not answer while OnEnter ran: the hook runs under the lock")
	}
	select {
	case <-returned:
		t.Fatal("Fire returned before its OnEnter hook did")
	default:
	}
	close(release)
	<-returned
}
