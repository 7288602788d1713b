package qmp

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
)

// nextEvent returns the next event named name, within testTimeout.
func nextEvent(t testing.TB, cl *Client, name string) Event {
	t.Helper()
	timer := time.NewTimer(testTimeout)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-cl.Events():
			if !ok {
				t.Fatalf("connection closed while waiting for %s", name)
			}
			if ev.Event == name {
				return ev
			}
		case <-timer.C:
			t.Fatalf("no %s event within %s", name, testTimeout)
		}
	}
}

// machineEvents reads X_MIGCTL_MACHINE events until one has to == last on
// side, and returns them.
func machineEvents(t testing.TB, cl *Client, side, last string) []MachineEvent {
	t.Helper()
	var out []MachineEvent
	for {
		var m MachineEvent
		if err := json.Unmarshal(nextEvent(t, cl, EventMachine).Data, &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
		if m.Side == side && m.To == last {
			return out
		}
	}
}

// TestMachineEvent: every move of every side is an X_MIGCTL_MACHINE
// event with the spec's names, whatever the events capability says.
func TestMachineEvent(t *testing.T) {
	dst := newNode(t, nodeOpts{dest: true})
	cl := dst.client(t)
	run(t, cl, "stop", nil)
	listen(t, cl, nil)
	got := machineEvents(t, cl, "incoming", "listening")
	// Written by hand from QEMU's behaviour as the spec models it: stop
	// while waiting for an incoming migration, then migrate-incoming.
	want := []MachineEvent{
		{Side: "guest", From: "inmigrate", To: "inmigrate-paused", Trigger: "stop"},
		{Side: "incoming", From: "none", To: "setup", Trigger: "incoming"},
		{Side: "incoming", From: "setup", To: "listening", Trigger: "listen"},
	}
	if len(got) != len(want) {
		t.Fatalf("events %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("event %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

// TestHold: a source held as it enters active has connected but sent
// nothing (the destination still listens, whatever time passes); the hold
// is announced, released by x-migctl-release, holds once, and the
// migration then completes.
func TestHold(t *testing.T) {
	holds, err := NewHolds(testSpec(t), []string{"outgoing:active"}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	src := newNode(t, nodeOpts{holds: holds})
	dst := newNode(t, nodeOpts{dest: true})
	cs, ctl, cd := src.client(t), src.client(t), dst.client(t)
	uri := listen(t, cd, nil)
	run(t, cs, "migrate", map[string]any{"uri": uri})
	var h HoldEvent
	if err := json.Unmarshal(nextEvent(t, cs, EventHold).Data, &h); err != nil {
		t.Fatal(err)
	}
	if h != (HoldEvent{Side: "outgoing", State: "active", Trigger: "start", TimeoutMS: 60000}) {
		t.Fatalf("X_MIGCTL_HOLD %+v", h)
	}
	if st, _ := src.c.State("outgoing"); st != "active" {
		t.Fatalf("source held in %s, want active", st)
	}
	// Held before the stream's header: the destination cannot have
	// connected past listening.
	if st, _ := dst.c.State("incoming"); st != "listening" {
		t.Fatalf("destination %s while the source is held before sending anything, want listening", st)
	}
	e := fails(t, ctl, "x-migctl-release", map[string]any{"side": "outgoing", "state": "device"})
	if !strings.Contains(e.Desc, "nothing is held at outgoing:device") || !strings.Contains(e.Desc, "outgoing:active") {
		t.Fatalf("release of a point not held: %q", e.Desc)
	}
	run(t, ctl, "x-migctl-release", map[string]any{"side": "outgoing", "state": "active"})
	machineEvents(t, cd, "incoming", "completed")
	e = fails(t, ctl, "x-migctl-release", map[string]any{"side": "outgoing", "state": "active"})
	if !strings.Contains(e.Desc, "nothing is held") {
		t.Fatalf("second release: %q", e.Desc)
	}
	// A point holds once: the next migration enters active unheld.
	machineEvents(t, cs, "guest", "postmigrate")
	run(t, ctl, "cont", nil)
	dst2 := newNode(t, nodeOpts{dest: true})
	cd2 := dst2.client(t)
	run(t, cs, "migrate", map[string]any{"uri": listen(t, cd2, nil)})
	machineEvents(t, cd2, "incoming", "completed")
}

// TestHoldTimeout: without x-migctl-release a hold ends by itself.
func TestHoldTimeout(t *testing.T) {
	holds, err := NewHolds(testSpec(t), []string{"incoming:listening"}, 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	dst := newNode(t, nodeOpts{dest: true, holds: holds})
	cl := dst.client(t)
	listen(t, cl, nil) // returns only once the hold let migrate-incoming go on
	nextEvent(t, cl, EventHold)
}

// TestHoldsRefuseUnknownPoints: a point must name a side and one of its
// states; the refusal lists the states.
func TestHoldsRefuseUnknownPoints(t *testing.T) {
	for _, c := range []struct{ point, want string }{
		{"outgoing", "want SIDE:STATE"},
		{"sideways:active", "want SIDE:STATE"},
		{"outgoing:loading", `no state "loading"`},
	} {
		_, err := NewHolds(testSpec(t), []string{c.point}, time.Second)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.point, err, c.want)
		}
	}
	if _, err := NewHolds(testSpec(t), []string{"outgoing:active"}, 0); err == nil {
		t.Error("a zero timeout was accepted")
	}
	n := newNode(t, nodeOpts{})
	e := fails(t, n.client(t), "x-migctl-release", map[string]any{"side": "outgoing", "state": "active"})
	if !strings.Contains(e.Desc, "no hold points") {
		t.Errorf("release on a server without holds: %q", e.Desc)
	}
}

// TestVerifyGuest: every page is checked; a running guest is refused, a
// damaged page is named.
func TestVerifyGuest(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)
	if e := fails(t, cl, "x-migctl-verify-guest", nil); !strings.Contains(e.Desc, guest.ErrRunning.Error()) {
		t.Fatalf("verify while running: %q", e.Desc)
	}
	run(t, cl, "stop", nil)
	run(t, cl, "x-migctl-verify-guest", nil)
	// Damage one byte of the last page of pc.ram (the verifier reads every
	// page, the last one too).
	b := n.g.Blocks()[0]
	last := len(b.Mem) - 1
	b.Mem[last] ^= 0x5a
	e := fails(t, cl, "x-migctl-verify-guest", nil)
	want := "pc.ram page 4095"
	if !strings.Contains(e.Desc, want) {
		t.Fatalf("verify of a damaged guest: %q, want it to name %q", e.Desc, want)
	}
	b.Mem[last] ^= 0x5a
	run(t, cl, "x-migctl-verify-guest", nil)
}
