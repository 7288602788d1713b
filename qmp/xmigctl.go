package qmp

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// migctl's extensions for operators and for its fault matrix
// (reliability/): extension events and commands, never changed shapes of
// QEMU's.
//
//   - X_MIGCTL_MACHINE, on every move of a side (incoming, outgoing, or
//     the guest graph): {"side", "from", "to", "trigger"}, the spec's names.
//     Sent whatever the events capability says (it is not QEMU's MIGRATION).
//   - X_MIGCTL_HOLD, when a goroutine is held entering a state (serve
//     --x-hold, test-only): {"side", "state", "trigger", "timeout-ms"}.
//   - x-migctl-release {"side", "state"} lets a held goroutine go on.
//   - x-migctl-verify-guest checks every page of the (stopped) guest.

// Extension events.
const (
	// EventMachine is sent on every move of a side.
	EventMachine = "X_MIGCTL_MACHINE"
	// EventHold is sent when a goroutine is held entering a state.
	EventHold = "X_MIGCTL_HOLD"
)

var _ = addCommands(map[string]command{
	"x-migctl-release":      {run: cmdRelease},
	"x-migctl-verify-guest": {run: cmdVerifyGuest},
})

// MachineEvent is X_MIGCTL_MACHINE's data.
type MachineEvent struct {
	Side    string `json:"side"`
	From    string `json:"from"`
	To      string `json:"to"`
	Trigger string `json:"trigger"`
}

// HoldEvent is X_MIGCTL_HOLD's data.
type HoldEvent struct {
	Side    string `json:"side"`
	State   string `json:"state"`
	Trigger string `json:"trigger"`
	// TimeoutMS is how long the goroutine stays held without
	// x-migctl-release.
	TimeoutMS int64 `json:"timeout-ms"`
}

// Holds are test-only hold points (migctl serve --x-hold SIDE:STATE): the
// first time a side enters a listed state, the goroutine that fired the
// trigger is held there, right after the move and outside the controller
// lock (machine.Options.OnEnter), until x-migctl-release names the point
// or a timeout passes. The server announces each hold with X_MIGCTL_HOLD.
// A test thereby applies a fault at the moment a side enters a state,
// whatever the byte count. Each point holds once. Holds is safe for
// concurrent use.
type Holds struct {
	timeout time.Duration

	// mu guards the fields below.
	mu     sync.Mutex
	points map[string]*holdPoint // by "side:state"
	notify func(HoldEvent)       // the server's broadcast; nil until attached
	closed bool
}

// holdPoint is one SIDE:STATE; its fields are guarded by Holds.mu.
type holdPoint struct {
	used    bool          // it held once already
	release chan struct{} // non-nil while a goroutine is held
	event   HoldEvent
}

// NewHolds checks each SIDE:STATE against the spec (a migration side or
// the guest graph, and one of its states) and returns the hold points; a
// goroutine is held at most timeout.
func NewHolds(s *spec.Spec, points []string, timeout time.Duration) (*Holds, error) {
	if timeout <= 0 {
		return nil, fmt.Errorf("hold timeout %v: want a positive duration", timeout)
	}
	h := &Holds{timeout: timeout, points: map[string]*holdPoint{}}
	for _, pt := range points {
		side, state, ok := strings.Cut(pt, ":")
		g := s.Side(side)
		if !ok || g == nil {
			return nil, fmt.Errorf("hold %q: want SIDE:STATE with SIDE one of %s", pt, strings.Join(spec.GraphNames, ", "))
		}
		if g.State(state) == nil {
			var names []string
			for _, st := range g.States {
				names = append(names, st.Name)
			}
			return nil, fmt.Errorf("hold %q: the %s side has no state %q (its states: %s)", pt, side, state, strings.Join(names, ", "))
		}
		h.points[pt] = &holdPoint{}
	}
	return h, nil
}

// Enter is the machine.Options.OnEnter hook: it holds the calling
// goroutine when o enters a hold point for the first time.
func (h *Holds) Enter(t machine.Trigger, o machine.Outcome) {
	key := o.Side + ":" + string(o.To)
	h.mu.Lock()
	p := h.points[key]
	if p == nil || p.used || h.closed {
		h.mu.Unlock()
		return
	}
	p.used = true
	p.release = make(chan struct{})
	p.event = HoldEvent{Side: o.Side, State: string(o.To), Trigger: string(t), TimeoutMS: h.timeout.Milliseconds()}
	release, notify, ev := p.release, h.notify, p.event
	h.mu.Unlock()
	if notify != nil {
		notify(ev)
	}
	timer := time.NewTimer(h.timeout)
	defer timer.Stop()
	select {
	case <-release:
	case <-timer.C:
	}
	h.mu.Lock()
	if p.release == release {
		p.release = nil
	}
	h.mu.Unlock()
}

// Release lets the goroutine held at side:state go on; it fails when none
// is held there.
func (h *Holds) Release(side, state string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.points[side+":"+state]
	if p == nil || p.release == nil {
		var held []string
		for k, q := range h.points {
			if q.release != nil {
				held = append(held, k)
			}
		}
		slices.Sort(held)
		if len(held) == 0 {
			return fmt.Errorf("nothing is held at %s:%s (no goroutine is held now)", side, state)
		}
		return fmt.Errorf("nothing is held at %s:%s (held now: %s)", side, state, strings.Join(held, ", "))
	}
	close(p.release)
	p.release = nil
	return nil
}

// Close releases every held goroutine and disables the hold points (the
// process is shutting down).
func (h *Holds) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for _, p := range h.points {
		if p.release != nil {
			close(p.release)
			p.release = nil
		}
	}
}

// attach sets the server's broadcast and announces the goroutines held
// before it was set.
func (h *Holds) attach(notify func(HoldEvent)) {
	h.mu.Lock()
	h.notify = notify
	var held []HoldEvent
	for _, p := range h.points {
		if p.release != nil {
			held = append(held, p.event)
		}
	}
	h.mu.Unlock()
	for _, ev := range held {
		notify(ev)
	}
}

func cmdRelease(s *Server, _ *client, a *args) (any, func(), error) {
	side, _ := a.str("side", true)
	state, _ := a.str("state", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if s.opts.Holds == nil {
		return nil, nil, genericf("x-migctl-release: this server has no hold points (serve --x-hold SIDE:STATE is a test option)")
	}
	if err := s.opts.Holds.Release(side, state); err != nil {
		return nil, nil, genericf("x-migctl-release: %s", err)
	}
	return struct{}{}, nil, nil
}

// GuestVerifier is implemented by a Host whose guest can check its own
// memory (x-migctl-verify-guest): every page against what it must hold.
type GuestVerifier interface {
	// VerifyGuest checks every page of the stopped guest; it fails for a
	// running guest (stop it first) and names the first damaged page.
	VerifyGuest(ctx context.Context) error
}

func cmdVerifyGuest(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	v, ok := s.h.(GuestVerifier)
	if !ok {
		return nil, nil, genericf("x-migctl-verify-guest: this guest cannot verify its memory")
	}
	if err := v.VerifyGuest(s.ctx); err != nil {
		return nil, nil, genericf("x-migctl-verify-guest: %s", err)
	}
	return struct{}{}, nil, nil
}
