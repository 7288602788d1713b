// Package machine is migctl's controller: it builds one state machine per
// side (incoming and outgoing) from a spec.Spec on github.com/qmuntal/stateless,
// owns the live configuration, the transition history and the latest
// statistics, and fans events out to subscribers.
//
// # The controller lock
//
// A Controller has one mutex (our big lock). It guards each side's state,
// the configuration, each side's transport, statistics, history and the
// subscriber list. Every trigger is fired under it, so stateless never sees
// two Fire calls at once and guards read a consistent configuration. Nothing
// under the lock does I/O or blocks: guards are pure functions of an
// Input, events are delivered with non-blocking sends, and the data plane
// (the outgoing engine, the destination's loader) runs outside the lock and
// only takes it to fire a trigger or publish statistics.
//
// # Configuration
//
// There is no way to change configuration except through the guards: a
// capability or parameter change is an internal transition (trigger
// set-capabilities or set-parameters) fired on both sides' machines, guarded
// by each side's configure guards from the spec (config-mutable,
// transport-compatible). It is applied only when both sides allow it, all at
// once or not at all.
//
// # The guest graph
//
// Besides the two migration sides, the spec's guest graph tracks the
// guest's run state as QEMU's RunState does (running, paused, inmigrate,
// finish-migrate, postmigrate, ...). Whoever starts or stops the guest
// fires the matching trigger, and rules can look at the run state
// (Cond.GuestStates): "Guest is waiting for an incoming migration" is a
// rule of the spec, not a check in Go.
//
// # The contract with the spec
//
// Go code names states and triggers only through this package's State and
// Trigger constants; Contract lists them, and New refuses a spec that does
// not declare one (with the spec's file:line:col and the name).
package machine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/qmuntal/stateless"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/spec"
)

// Options tune a Controller. The zero value is usable.
type Options struct {
	// Guards implements the guard names the spec uses; nil means
	// guards.Default().
	Guards guards.Registry
	// Features lists the host features present (see spec features).
	Features map[string]bool
	// Facts are this end's facts (page-size, guest) the connect guard
	// compares with the peer's.
	Facts map[string]string
	// Objects, when set, returns the process's named objects (QMP
	// object-add) for the guards (guards.Input.Objects): the tls-objects
	// guard checks that tls-creds and tls-authz name objects that exist
	// and fit the side. It is called under the controller lock, once per
	// Fire or Judge: it must be quick and must not call the controller.
	Objects func() map[string]guards.Object
	// Incoming: this process waits for an incoming migration (QEMU's
	// -incoming): New fires await-incoming on the guest graph. Otherwise
	// it fires boot: the caller runs the guest.
	Incoming bool
	// Paused is QEMU's -S: the guest does not run on its own. Without
	// Incoming the guest graph stays in prelaunch (the caller does not
	// start the guest; cont does); with Incoming New also fires stop, so
	// the guest stays paused when its migration arrives, until cont.
	Paused bool
	// HistoryLimit bounds the transition history kept per side (default 512).
	HistoryLimit int
	// Now returns the current time (default time.Now).
	Now func() time.Time
	// Logger receives one line per transition (default: discard).
	Logger *slog.Logger
	// OnEnter, when set, is called after every Fire that moved a side (a
	// migration side or the guest graph), with the trigger and the
	// Fire's Outcome (Side, From, To). It runs on the goroutine that
	// fired, after the controller lock is released and before Fire
	// returns, so it may call the controller and may block: whatever that
	// goroutine does next in the new state waits for it. migctl serve's
	// test-only holds (--x-hold) use it to stop a side right as it enters
	// a state; most embedders leave it nil.
	OnEnter func(t Trigger, o Outcome)
}

// Controller is the migration controller of one process.
type Controller struct {
	spec *spec.Spec
	reg  guards.Registry
	opts Options

	mu     sync.Mutex // the controller lock; see the package doc
	config guards.Config
	sides  map[string]*side // every graph of the spec, by name
	subs   map[*Subscription]struct{}
	closed bool
}

// side is one state machine (a migration side or the guest graph) and
// what belongs to it. All fields are guarded by Controller.mu.
type side struct {
	name      string
	graph     *spec.Side
	migration bool // a migration side (not the guest graph)
	sm        *stateless.StateMachine
	state     string
	// endpoint is the transport of the migration in progress: set by the
	// trigger that starts one (incoming, migrate, recover, resume) in the
	// same step as the guards judged it, cleared when the side reaches a
	// terminal state (the next migration is judged against its own).
	endpoint *guards.Endpoint
	frozen   *guards.Config // configuration snapshot taken when it froze
	errDesc  string
	history  []Record
	stats    Stats
	started  time.Time // when the current migration left the initial/terminal state
	// stalled is since when the peer has been silent, as the data plane's
	// watchdog reported it (PublishStalled); zero when it is not.
	stalled time.Time
}

// Record is one entry of a side's history: a transition, a refusal that
// moved the side, or an accepted configuration change (From == To).
type Record struct {
	Time    time.Time
	Side    string
	From    State
	To      State
	Trigger Trigger
	// Detail says what changed or why (a configuration change, a reason).
	Detail string
}

// New builds a controller from a validated spec. It checks that the spec
// meets the contract (Check), that every guard the spec names is in the
// registry, and that the spec does not use the configuration triggers for
// its own edges; then it starts the guest graph (boot, or await-incoming
// with Options.Incoming).
func New(s *spec.Spec, opts Options) (*Controller, error) {
	if err := Check(s); err != nil {
		return nil, fmt.Errorf("machine: the spec does not declare what the Go code uses:\n%w", err)
	}
	if opts.Guards == nil {
		opts.Guards = guards.Default()
	}
	if opts.HistoryLimit <= 0 {
		opts.HistoryLimit = 512
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Controller{
		spec:   s,
		reg:    opts.Guards,
		opts:   opts,
		config: guards.DefaultConfig(s),
		sides:  map[string]*side{},
		subs:   map[*Subscription]struct{}{},
	}
	for _, name := range spec.GraphNames {
		g := s.Side(name)
		if g == nil {
			continue // Check made sure the contract's graphs exist
		}
		sd, err := c.build(name, g)
		if err != nil {
			return nil, err
		}
		c.sides[name] = sd
	}
	var first []Trigger
	switch {
	case opts.Incoming && opts.Paused:
		first = []Trigger{TriggerAwaitIncoming, TriggerStop}
	case opts.Incoming:
		first = []Trigger{TriggerAwaitIncoming}
	case !opts.Paused:
		first = []Trigger{TriggerBoot}
	}
	for _, tr := range first {
		if _, err := c.Fire(context.Background(), spec.Guest, tr, nil); err != nil {
			return nil, fmt.Errorf("machine: start the guest graph: %w", err)
		}
	}
	return c, nil
}

// Spec returns the spec the controller was built from.
func (c *Controller) Spec() *spec.Spec { return c.spec }

// fireCtx carries one Fire's input and collects guard verdicts, so a guard
// runs once per edge per Fire even though stateless evaluates it for the
// edge and for its else alternative.
type fireCtx struct {
	in       *guards.Input
	verdicts map[int]error
	refused  []int // edges whose guards refused, in evaluation order
	elseTo   string
	detail   string
	moved    bool // the side changed state
	ignored  bool // a kind: ignore edge accepted the trigger
}

type fireKey struct{}

func fctx(ctx context.Context) *fireCtx {
	f, _ := ctx.Value(fireKey{}).(*fireCtx)
	return f
}

func (c *Controller) build(name string, g *spec.Side) (*side, error) {
	sd := &side{name: name, graph: g, state: g.Initial, migration: name != spec.Guest}
	sd.sm = stateless.NewStateMachineWithExternalStorage(
		func(context.Context) (stateless.State, error) { return sd.state, nil },
		func(_ context.Context, st stateless.State) error { sd.state = st.(string); return nil },
		stateless.FiringImmediate)
	for _, n := range spec.ConfigTriggers {
		if slices.Contains(g.Triggers(), n) {
			return nil, fmt.Errorf("machine: %s side: trigger %q is reserved for configuration changes", name, n)
		}
	}
	for i := range g.Transitions {
		t := &g.Transitions[i]
		for _, gn := range t.Guards {
			if _, ok := c.reg[gn]; !ok {
				return nil, fmt.Errorf("machine: %s side: edge %s --%s--> %s uses guard %q, which the registry lacks", name, t.From, t.On, t.To, gn)
			}
		}
		cfg := sd.sm.Configure(t.From)
		idx := i
		guard := func(ctx context.Context, _ ...any) bool { return c.edgeAllows(ctx, sd, idx) }
		switch {
		case t.Kind == spec.KindIgnore:
			// Ignored when its guards (if any) allow; refused with their
			// reasons otherwise (OnUnhandledTrigger below).
			var guards []stateless.GuardFunc
			if len(t.Guards) > 0 {
				guards = append(guards, guard)
			}
			cfg.InternalTransition(t.On, func(ctx context.Context, _ ...any) error {
				if f := fctx(ctx); f != nil {
					f.ignored = true
				}
				return nil
			}, guards...)
		case t.Kind == spec.KindRefuse:
			// Fire answers these before stateless sees them.
		case len(t.Guards) == 0:
			cfg.Permit(t.On, t.To)
		default:
			cfg.Permit(t.On, t.To, guard)
			if t.Else != "" {
				elseTo := t.Else
				cfg.Permit(t.On, elseTo, func(ctx context.Context, args ...any) bool {
					if guard(ctx, args...) {
						return false
					}
					if f := fctx(ctx); f != nil {
						f.elseTo = elseTo
						if re, ok := f.verdicts[idx].(*guards.RefusedError); ok {
							f.detail = re.Error()
						}
					}
					return true
				})
			}
		}
	}
	for _, gn := range g.Configure {
		if _, ok := c.reg[gn]; !ok {
			return nil, fmt.Errorf("machine: %s side: configure guard %q is not in the registry", name, gn)
		}
	}
	confGuard := func(ctx context.Context, _ ...any) bool { return c.edgeAllows(ctx, sd, -1) }
	apply := func(ctx context.Context, _ ...any) error { return nil } // applied by configure once both sides allow
	if sd.migration {
		for _, st := range g.States {
			cfg := sd.sm.Configure(st.Name)
			cfg.InternalTransition(spec.TriggerSetCapabilities, apply, confGuard)
			cfg.InternalTransition(spec.TriggerSetParameters, apply, confGuard)
		}
	}
	sd.sm.OnUnhandledTrigger(func(ctx context.Context, st stateless.State, tr stateless.Trigger, _ []string) error {
		f := fctx(ctx)
		if f != nil && len(f.refused) > 0 {
			return c.guardError(sd, f, "")
		}
		return &NotPermittedError{Side: name, State: State(st.(string)), Trigger: Trigger(tr.(string)), Permitted: permitted(g, st.(string))}
	})
	sd.sm.OnTransitioned(func(ctx context.Context, tr stateless.Transition) {
		c.transitioned(ctx, sd, tr.Source.(string), tr.Destination.(string), tr.Trigger.(string))
	})
	return sd, nil
}

// edgeAllows runs the guards of edge idx (-1: the side's configure guards)
// once per Fire and caches the verdict.
func (c *Controller) edgeAllows(ctx context.Context, sd *side, idx int) bool {
	f := fctx(ctx)
	if f == nil {
		return false // a Fire that did not come through the controller
	}
	if err, done := f.verdicts[idx]; done {
		return err == nil
	}
	names := sd.graph.Configure
	if idx >= 0 {
		names = sd.graph.Transitions[idx].Guards
	}
	var all []guards.Refusal
	for _, gn := range names {
		if err := c.reg.Run(gn, f.in); err != nil {
			var re *guards.RefusedError
			if errors.As(err, &re) {
				all = append(all, re.Refusals...)
			} else {
				all = append(all, guards.Refusal{Guard: gn, Reason: err.Error()})
			}
		}
	}
	var err error
	if len(all) > 0 {
		err = &guards.RefusedError{Refusals: all}
		f.refused = append(f.refused, idx)
	}
	f.verdicts[idx] = err
	return err == nil
}

func (c *Controller) guardError(sd *side, f *fireCtx, to string) *GuardError {
	e := &GuardError{Side: sd.name, State: State(f.in.State), Trigger: Trigger(f.in.Trigger), To: State(to)}
	for _, idx := range f.refused {
		re := f.verdicts[idx].(*guards.RefusedError)
		for _, r := range re.Refusals {
			if !slices.Contains(e.Guards, r.Guard) {
				e.Guards = append(e.Guards, r.Guard)
			}
			e.Refusals = append(e.Refusals, r)
		}
	}
	return e
}

// permitted lists the triggers with an edge from state that moves the
// side, sorted (the configuration triggers are always accepted and not
// listed; ignored and refused triggers are not listed).
func permitted(g *spec.Side, state string) []Trigger {
	var out []Trigger
	for _, t := range g.Transitions {
		if t.From == state && (t.Kind == "" || t.Kind == spec.KindPermit) && !slices.Contains(out, Trigger(t.On)) {
			out = append(out, Trigger(t.On))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// transitioned runs inside Fire, under the lock, after the state changed.
func (c *Controller) transitioned(ctx context.Context, sd *side, from, to, trigger string) {
	now := c.opts.Now()
	f := fctx(ctx)
	detail := ""
	if f != nil {
		detail = f.detail
		f.moved = true
	}
	if sd.migration {
		if sd.graph.Mutable(from) && !sd.graph.Mutable(to) {
			snap := c.config.Clone()
			sd.frozen = &snap
		}
		if sd.graph.Mutable(to) {
			sd.frozen = nil
		}
		if st := sd.graph.State(from); st != nil && (st.Terminal || from == sd.graph.Initial) {
			sd.started = now
			sd.errDesc = ""
			sd.stats = Stats{}
		}
		if sd.graph.Terminal(to) || to == sd.graph.Initial {
			sd.stalled = time.Time{}
		}
		if (sd.graph.Terminal(to) || to == sd.graph.Initial) && !mutant.KeepEndpoint {
			// The migration ended: the next one is judged against its own
			// transport, never this one's.
			sd.endpoint = nil
		}
	}
	r := Record{Time: now, Side: sd.name, From: State(from), To: State(to), Trigger: Trigger(trigger), Detail: detail}
	c.record(sd, r)
	c.opts.Logger.Info("transition", "side", sd.name, "from", from, "to", to, "trigger", trigger, "detail", detail)
	c.publish(Event{Kind: EventState, Time: now, Side: sd.name, From: r.From, To: r.To, Trigger: r.Trigger, Detail: detail})
}

func (c *Controller) record(sd *side, r Record) {
	sd.history = append(sd.history, r)
	if over := len(sd.history) - c.opts.HistoryLimit; over > 0 {
		sd.history = slices.Delete(sd.history, 0, over)
	}
}

// Args carries what a trigger brings with it.
type Args struct {
	// Endpoint is the transport a side starts to use (incoming, migrate,
	// recover, resume). The guards judge it, and Fire commits it to the
	// side in the same step when the side moves.
	Endpoint *guards.Endpoint
	// Peer is the peer's announcement (connect).
	Peer *guards.Peer
	// Reason explains a failure; when the trigger moves the side it becomes
	// the side's error description (query-migrate's error-desc) and the
	// history's detail.
	Reason string
}

// Outcome is what a Fire did. Callers act on it rather than reading the
// state again: between two calls another goroutine may move the side.
type Outcome struct {
	// Side is the graph the trigger was fired on.
	Side string
	// From is the state the side was in; To the state it is in after the
	// Fire (equal to From unless Moved).
	From, To State
	// Moved: the side took an edge (to To).
	Moved bool
	// Ignored: the state accepted the trigger and stayed (kind: ignore).
	Ignored bool
	// Refused: the edge's guards refused and the side took the edge's else
	// target instead (To). Into a terminal state Fire also returns a
	// *GuardError; otherwise it is the alternative route.
	Refused bool
}

// Fire fires a trigger on a side (a migration side or the guest graph). It
// reports what happened in the Outcome, and returns nil when the side took
// an edge or ignored the trigger, *NotPermittedError when the state has no
// edge for it (or refuses it with a message: kind refuse), and *GuardError
// when a guard refused (when the refused edge has an else target the side
// has moved there: see Outcome.Refused). The endpoint in a is committed to
// the side in the same step, only when the side moves.
func (c *Controller) Fire(ctx context.Context, sideName string, trigger Trigger, a *Args) (Outcome, error) {
	out, err := c.fireLocked(ctx, sideName, trigger, a)
	if out.Moved && c.opts.OnEnter != nil {
		c.opts.OnEnter(trigger, out) // outside the lock (Options.OnEnter)
	}
	return out, err
}

// fireLocked is Fire under the controller lock, without the OnEnter hook.
func (c *Controller) fireLocked(ctx context.Context, sideName string, trigger Trigger, a *Args) (Outcome, error) {
	out := Outcome{Side: sideName}
	if err := ctx.Err(); err != nil {
		return out, fmt.Errorf("machine: %s %s: %w", sideName, trigger, err)
	}
	if a == nil {
		a = &Args{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return out, err
	}
	out.From = State(sd.state)
	out.To = out.From
	if t := sd.graph.Edge(sd.state, string(trigger)); t != nil && t.Kind == spec.KindRefuse {
		return out, &NotPermittedError{Side: sideName, State: out.From, Trigger: trigger, Permitted: permitted(sd.graph, sd.state), Reason: t.Message}
	}
	in := c.input(sd, string(trigger))
	if a.Endpoint != nil {
		ep := cloneEndpoint(a.Endpoint)
		in.Transport = ep
	}
	in.Peer = a.Peer
	f := &fireCtx{in: in, verdicts: map[int]error{}, detail: a.Reason}
	if a.Endpoint != nil && f.detail == "" {
		f.detail = a.Endpoint.URI
	}
	prevEndpoint := sd.endpoint
	if a.Endpoint != nil {
		sd.endpoint = cloneEndpoint(a.Endpoint) // visible to the transition hook; restored below unless the side moved
	}
	err = c.fire(ctx, sd, f, string(trigger))
	if a.Endpoint != nil && !f.moved {
		sd.endpoint = prevEndpoint
	}
	out.To, out.Moved, out.Ignored = State(sd.state), f.moved, f.ignored
	if err == nil && f.elseTo != "" {
		// The guards refused and the edge's else target was taken. Into a
		// terminal state that is a failure the caller must see; otherwise
		// it is the alternative route (e.g. switchover without a pause),
		// recorded in the history with its reason.
		out.Refused = true
		ge := c.guardError(sd, f, f.elseTo)
		if sd.graph.Terminal(f.elseTo) {
			sd.errDesc = ge.Reason()
			err = ge
		}
	} else if err == nil && a.Reason != "" && f.moved {
		sd.errDesc = a.Reason
	}
	return out, err
}

func cloneEndpoint(e *guards.Endpoint) *guards.Endpoint {
	ep := *e
	ep.Channels = slices.Clone(e.Channels)
	ep.Props = maps.Clone(e.Props)
	return &ep
}

func (c *Controller) fire(ctx context.Context, sd *side, f *fireCtx, trigger string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("machine: %s side: trigger %q in state %s: state machine panicked: %v", sd.name, trigger, sd.state, r)
		}
	}()
	return sd.sm.FireCtx(context.WithValue(ctx, fireKey{}, f), trigger)
}

func (c *Controller) side(name string) (*side, error) {
	if c.closed {
		return nil, ErrClosed
	}
	sd, ok := c.sides[name]
	if !ok {
		return nil, fmt.Errorf("machine: side %q: %w (want incoming, outgoing or guest)", name, ErrUnknownName)
	}
	return sd, nil
}

func (c *Controller) input(sd *side, trigger string) *guards.Input {
	in := &guards.Input{
		Spec:      c.spec,
		Side:      sd.name,
		State:     sd.state,
		Trigger:   trigger,
		Config:    c.config,
		Previous:  c.config,
		Transport: sd.endpoint,
		Facts:     c.opts.Facts,
		Features:  c.opts.Features,
	}
	if g := c.sides[spec.Guest]; g != nil {
		in.GuestState = g.state
	}
	in.Sides = make(map[string]string, len(c.sides))
	for name, o := range c.sides {
		in.Sides[name] = o.state
	}
	if c.opts.Objects != nil {
		in.Objects = c.opts.Objects()
	}
	return in
}

// Judge returns every rule's verdict on firing trigger on a side in its
// current state with the configuration cfg and the arguments a — the same
// input Fire would hand the guards, with cfg in place of the live
// configuration. It changes nothing. It returns *NotPermittedError when
// the state has no edge for the trigger (a refusal no rule makes). migctl
// explain is built on it, so that its verdict is the machine's own.
func (c *Controller) Judge(sideName string, trigger Trigger, a *Args, cfg guards.Config) ([]guards.Verdict, error) {
	if a == nil {
		a = &Args{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return nil, err
	}
	t := sd.graph.Edge(sd.state, string(trigger))
	switch {
	case t == nil && !slices.Contains(spec.ConfigTriggers, string(trigger)):
		return nil, &NotPermittedError{Side: sideName, State: State(sd.state), Trigger: trigger, Permitted: permitted(sd.graph, sd.state)}
	case t != nil && t.Kind == spec.KindRefuse:
		return nil, &NotPermittedError{Side: sideName, State: State(sd.state), Trigger: trigger, Permitted: permitted(sd.graph, sd.state), Reason: t.Message}
	}
	in := c.input(sd, string(trigger))
	in.Config, in.Previous = cfg.Clone(), cfg.Clone()
	if a.Endpoint != nil {
		in.Transport = cloneEndpoint(a.Endpoint)
	}
	in.Peer = a.Peer
	return guards.Evaluate(in), nil
}

// SetCapabilities switches capabilities on or off, all or nothing: the
// change is judged by both sides' configure guards and applied only if
// every guard allows it.
func (c *Controller) SetCapabilities(ctx context.Context, caps map[string]bool) error {
	for name := range caps {
		if c.spec.Capability(name) == nil {
			return fmt.Errorf("machine: capability %q: %w", name, ErrUnknownName)
		}
	}
	return c.configure(ctx, spec.TriggerSetCapabilities, &guards.Change{Caps: maps.Clone(caps)})
}

// SetParameters sets parameters, all or nothing. Values may be strings,
// booleans, JSON numbers or Go integers; each is normalised with its
// parameter's type and range first (*InvalidValueError otherwise).
func (c *Controller) SetParameters(ctx context.Context, params map[string]any) error {
	ch := &guards.Change{Params: map[string]string{}}
	for _, name := range slices.Sorted(maps.Keys(params)) {
		p := c.spec.Parameter(name)
		if p == nil {
			return fmt.Errorf("machine: parameter %q: %w", name, ErrUnknownName)
		}
		v, err := p.Normalize(params[name])
		if err != nil {
			return &InvalidValueError{Param: name, Value: params[name], Range: p.Range(), Err: err}
		}
		ch.Params[name] = v
	}
	return c.configure(ctx, spec.TriggerSetParameters, ch)
}

func (c *Controller) configure(ctx context.Context, trigger string, ch *guards.Change) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("machine: %s: %w", trigger, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	candidate := c.config.Apply(ch)
	for _, name := range spec.SideNames {
		sd := c.sides[name]
		in := c.input(sd, trigger)
		in.Config, in.Change = candidate, ch
		f := &fireCtx{in: in, verdicts: map[int]error{}}
		if err := c.fire(ctx, sd, f, trigger); err != nil {
			return err
		}
	}
	c.config = candidate
	now := c.opts.Now()
	detail := describeChange(ch)
	for _, name := range spec.SideNames {
		sd := c.sides[name]
		c.record(sd, Record{Time: now, Side: name, From: State(sd.state), To: State(sd.state), Trigger: Trigger(trigger), Detail: detail})
	}
	c.publish(Event{Kind: EventConfig, Time: now, Trigger: Trigger(trigger), Detail: detail})
	return nil
}

func describeChange(ch *guards.Change) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(ch.Caps)) {
		v := "off"
		if ch.Caps[k] {
			v = "on"
		}
		parts = append(parts, k+"="+v)
	}
	for _, k := range slices.Sorted(maps.Keys(ch.Params)) {
		parts = append(parts, k+"="+ch.Params[k])
	}
	return fmt.Sprint(parts)
}

// State returns a side's current state. Use it to show the state; to act
// on what a trigger did, use the Outcome of its Fire.
func (c *Controller) State(sideName string) (State, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return "", err
	}
	return State(sd.state), nil
}

// Config returns a copy of the live configuration.
func (c *Controller) Config() guards.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.config.Clone()
}

// Param returns one parameter's live value in canonical text form (for the
// data plane's live parameters such as max-bandwidth).
func (c *Controller) Param(name string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.config.Params[name]
}

// Frozen returns the configuration snapshot a side took when it entered
// its first frozen state, the one its data plane must use; ok is false
// while the side's configuration is still mutable.
func (c *Controller) Frozen(sideName string) (cfg guards.Config, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil || sd.frozen == nil {
		return guards.Config{}, false
	}
	return sd.frozen.Clone(), true
}

// Status is a snapshot of one side (or of the guest graph).
type Status struct {
	Side  string
	State State
	// QMPStatus is the state's QMP name (spec: status), e.g. setup for the
	// destination's listening; Report is what query-migrate shows of it
	// (spec: report).
	QMPStatus, Report string
	// Mutable: capabilities may change in this state.
	Mutable bool
	// Terminal: the state ends a migration.
	Terminal bool
	// Initial: the side's initial state (no migration ever ran).
	Initial bool
	// Permitted lists the triggers the state accepts (besides the
	// configuration triggers), sorted.
	Permitted []Trigger
	// Endpoint is the transport of the migration in progress, if any
	// (none in the initial and terminal states).
	Endpoint *guards.Endpoint
	// Error describes why the side failed, if it did.
	Error string
	// Started is when the current migration began (zero if never).
	Started time.Time
	// Stalled is how long the peer has been silent, once the data plane's
	// watchdog saw it miss two keepalives (zero otherwise): QMP shows it as
	// x-migctl-stalled-ms before x-migctl-io-timeout ends the migration.
	Stalled time.Duration
	Stats   Stats
	History []Record
}

// Status returns a snapshot of a side; history holds at most the last
// `history` records (0: none, negative: all kept).
func (c *Controller) Status(sideName string, history int) (Status, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return Status{}, err
	}
	st := Status{
		Side:      sd.name,
		State:     State(sd.state),
		Mutable:   sd.graph.Mutable(sd.state),
		Initial:   sd.state == sd.graph.Initial,
		Permitted: permitted(sd.graph, sd.state),
		Error:     sd.errDesc,
		Started:   sd.started,
		Stats:     sd.stats,
	}
	if !sd.stalled.IsZero() {
		st.Stalled = max(c.opts.Now().Sub(sd.stalled), time.Millisecond)
	}
	if s := sd.graph.State(sd.state); s != nil {
		st.Terminal = s.Terminal
		st.QMPStatus, st.Report = s.QMPStatus(), s.Reports()
	}
	if sd.endpoint != nil {
		st.Endpoint = cloneEndpoint(sd.endpoint)
	}
	h := sd.history
	if history >= 0 && len(h) > history {
		h = h[len(h)-history:]
	}
	st.History = slices.Clone(h)
	return st, nil
}

// SetEndpoint records the address a side really uses once known (e.g. the
// port a tcp:…:0 listener bound). It does not change the transport kind.
func (c *Controller) SetEndpoint(sideName, uri string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return err
	}
	if sd.endpoint == nil {
		return fmt.Errorf("machine: %s side has no transport yet", sideName)
	}
	sd.endpoint.URI = uri
	return nil
}

// Close ends every subscription; later calls fail with ErrClosed.
func (c *Controller) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	for s := range c.subs {
		s.closeLocked()
	}
	clear(c.subs)
}
