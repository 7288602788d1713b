// Package guards holds the guards that decide whether a migration's state
// machine may take an edge, and the evaluator of the compatibility rules
// declared in transitions.yaml.
//
// A guard sees only data: the spec, the side and state, the candidate
// configuration, the transport's name and URI, what the peer announced, and
// which host features exist. It never touches sockets or files, so every
// guard can be tested by handing it an Input. The machine runs guards under
// its lock; they must be quick and free of side effects (stateless may
// evaluate a guard more than once per trigger).
package guards

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/migctl/migctl/internal/safe"
	"github.com/migctl/migctl/spec"
)

// Config is the migration configuration: every capability's state and every
// parameter's value in canonical textual form (see spec.Parameter.Normalize).
type Config struct {
	Caps   map[string]bool
	Params map[string]string
}

// DefaultConfig returns the configuration a fresh controller starts with:
// every capability off, every parameter at its declared default.
func DefaultConfig(s *spec.Spec) Config {
	c := Config{Caps: map[string]bool{}, Params: map[string]string{}}
	for _, cp := range s.Capabilities {
		c.Caps[cp.Name] = false
	}
	for i := range s.Parameters {
		p := &s.Parameters[i]
		v, err := p.Normalize(p.Default)
		if err != nil {
			v = p.Default // spec lint reports bad defaults; keep the text
		}
		c.Params[p.Name] = v
	}
	return c
}

// Clone returns a deep copy.
func (c Config) Clone() Config {
	return Config{Caps: maps.Clone(c.Caps), Params: maps.Clone(c.Params)}
}

// Change is one configuration request: the capabilities and parameters it
// sets (parameters already normalised).
type Change struct {
	Caps   map[string]bool
	Params map[string]string
}

// Apply returns c with the change applied; c is not modified.
func (c Config) Apply(ch *Change) Config {
	out := c.Clone()
	if ch == nil {
		return out
	}
	maps.Copy(out.Caps, ch.Caps)
	maps.Copy(out.Params, ch.Params)
	return out
}

// Endpoint is the transport a side listens on or migrates to.
type Endpoint struct {
	// Transport is the spec's transport name (the URI scheme): tcp, rdma, ...
	Transport string
	// URI is what the user gave (or the bound address), for messages.
	URI string
	// Channels lists the channel types the migration was given (QMP's
	// channels argument, e.g. main and cpr); empty for a plain uri.
	Channels []string
	// Props, when not nil, are this endpoint's own transport properties,
	// keyed by the spec's property names (spec.PropSeekable, ...) and found
	// by probing it (transport.Probe: fstat of an fd: descriptor). They
	// replace the properties the spec declares for Transport in every rule:
	// an fd: on a regular file is seekable and takes extra descriptors, as
	// file: does; on a socket it is neither. A name missing from Props is a
	// property the endpoint lacks. Nil: the spec's declaration applies.
	Props map[string]bool
}

// has reports whether the endpoint, of spec transport t, has property
// prop: its probed Props when it has them, else t's declaration.
func (e *Endpoint) has(t *spec.Transport, prop string) bool {
	if e.Props != nil {
		return e.Props[prop]
	}
	return t.Has(prop)
}

// Peer is what the other side announced in its handshake.
type Peer struct {
	// Caps holds the peer's value of every must-match capability it knows.
	Caps map[string]bool
	// Params holds the peer's value of every must-match parameter.
	Params map[string]string
	// Facts holds the peer's facts (page-size, guest).
	Facts map[string]string
}

// Input is everything a guard may look at.
type Input struct {
	Spec    *spec.Spec
	Side    string // spec.Incoming or spec.Outgoing
	State   string // the side's current state
	Trigger string
	// Config is the configuration being judged: for a configuration change,
	// the candidate (current with the change applied); otherwise the
	// current one.
	Config Config
	// Previous is the configuration before the change (equal to Config when
	// the trigger is not a configuration change).
	Previous Config
	// Change is the configuration change under judgement, or nil.
	Change *Change
	// Transport is the side's transport, or nil when none is known yet.
	Transport *Endpoint
	// Peer is the peer's announcement (only at connect), or nil.
	Peer *Peer
	// Facts are this side's own facts (page-size, guest).
	Facts map[string]string
	// Features are the host features present.
	Features map[string]bool
	// GuestState is the guest graph's current state ("" when the spec has
	// no guest graph).
	GuestState string
	// Sides holds every graph's current state by graph name (incoming,
	// outgoing, guest), for guards that judge one graph's edge by
	// another's state (outcome-known); nil outside a controller.
	Sides map[string]string
	// Objects are the named objects the process holds (QMP object-add:
	// TLS credentials, authorization lists), by id, as they are at this
	// Fire; nil when the process keeps no object registry. The
	// tls-objects guard checks that tls-creds and tls-authz name objects
	// that exist and fit this side.
	Objects map[string]Object
}

// Object is one named object of the process, as a guard sees it: its
// type and, for TLS credentials, which end of a TLS connection they are
// for.
type Object struct {
	// Type is the object's qom-type (tls-creds-x509, authz-list,
	// authz-simple).
	Type string
	// Endpoint is a tls-creds-x509's endpoint: client (a migration source)
	// or server (a destination); "" for other types.
	Endpoint string
	// VerifyPeer is a tls-creds-x509's verify-peer.
	VerifyPeer bool
}

// Refusal is one reason a guard refused.
type Refusal struct {
	Guard  string // the guard's name
	Rule   string // the rule that failed, if any
	Reason string // what to tell the user
}

func (r Refusal) String() string {
	if r.Rule != "" {
		return fmt.Sprintf("%s: rule %s: %s", r.Guard, r.Rule, r.Reason)
	}
	return r.Guard + ": " + r.Reason
}

// RefusedError is returned by a guard that refuses; it lists every reason.
type RefusedError struct {
	Refusals []Refusal
}

func (e *RefusedError) Error() string {
	parts := make([]string, len(e.Refusals))
	for i, r := range e.Refusals {
		parts[i] = r.String()
	}
	return strings.Join(parts, "; ")
}

// Guard decides one edge: nil allows it, a *RefusedError refuses it with
// reasons.
type Guard func(in *Input) error

// Registry maps guard names (as transitions.yaml spells them) to guards.
type Registry map[string]Guard

// Names returns the registered names, sorted.
func (r Registry) Names() []string {
	return slices.Sorted(maps.Keys(r))
}

// Guard names the default registry implements.
const (
	TransportCompatible   = "transport-compatible"
	ConfigMutable         = "config-mutable"
	PauseBeforeSwitchover = "pause-before-switchover"
	TLSObjects            = "tls-objects"
	OutcomeKnown          = "outcome-known"
)

// Default returns the registry of every guard migctl implements.
func Default() Registry {
	return Registry{
		TransportCompatible:   transportCompatible,
		ConfigMutable:         configMutable,
		PauseBeforeSwitchover: pauseBeforeSwitchover,
		TLSObjects:            tlsObjects,
		OutcomeKnown:          outcomeKnown,
	}
}

// ErrUnknownGuard is returned by Run for a name the registry lacks.
var ErrUnknownGuard = errors.New("unknown guard")

// Run runs the named guard.
func (r Registry) Run(name string, in *Input) error {
	g, ok := r[name]
	if !ok {
		return fmt.Errorf("%w %q", ErrUnknownGuard, name)
	}
	return g(in)
}

func refuse(guard string, rs ...Refusal) error {
	for i := range rs {
		rs[i].Guard = guard
	}
	return &RefusedError{Refusals: rs}
}

// transportCompatible re-runs every declared rule against the candidate
// configuration, the transport and, at connect, the peer's announcement.
func transportCompatible(in *Input) error {
	var rs []Refusal
	rs = append(rs, peerMismatches(in)...)
	for _, v := range Evaluate(in) {
		if v.Applies && !v.OK {
			rs = append(rs, Refusal{Rule: v.Rule.Name, Reason: v.Reason})
		}
	}
	if len(rs) > 0 {
		return refuse(TransportCompatible, rs...)
	}
	return nil
}

// peerMismatches compares the peer's announcement with this side's
// configuration and facts.
func peerMismatches(in *Input) []Refusal {
	if in.Peer == nil {
		return nil
	}
	me, them := sideWords(in.Side)
	var rs []Refusal
	for _, c := range in.Spec.Capabilities {
		if !c.MustMatchPeer {
			continue
		}
		theirs, ok := in.Peer.Caps[c.Name]
		if !ok {
			continue
		}
		if mine := in.Config.Caps[c.Name]; mine != theirs {
			rs = append(rs, Refusal{Rule: c.Name + "/must-match-peer", Reason: fmt.Sprintf(
				"capability %s must be the same on both sides: %s has it %s, %s has it %s",
				c.Name, them, onOff(theirs), me, onOff(mine))})
		}
	}
	for _, p := range in.Spec.Parameters {
		if !p.MustMatchPeer {
			continue
		}
		theirs, ok := in.Peer.Params[p.Name]
		if !ok {
			continue
		}
		if mine := in.Config.Params[p.Name]; mine != theirs {
			rs = append(rs, Refusal{Rule: p.Name + "/must-match-peer", Reason: fmt.Sprintf(
				"parameter %s must be the same on both sides: %s has %s, %s has %s",
				p.Name, them, peerText(theirs), me, peerText(mine))})
		}
	}
	for _, f := range in.Spec.Facts {
		theirs, ok := in.Peer.Facts[f.Name]
		if !ok {
			continue
		}
		if mine, ok := in.Facts[f.Name]; ok && mine != theirs {
			reason := fmt.Sprintf("%s differs: %s has %s, %s has %s", f.Name, them, peerText(theirs), me, peerText(mine))
			if f.Message != "" {
				reason = strings.NewReplacer("{peer}", peerText(theirs), "{local}", peerText(mine)).Replace(f.Message)
			}
			rs = append(rs, Refusal{Rule: "fact/" + f.Name, Reason: reason})
		}
	}
	return rs
}

// MaxPeerText bounds each value a peer announced (a parameter, a fact
// such as its guest ID) when a refusal quotes it: the peer chose those
// bytes, and a refusal becomes the side's error-desc, a history entry and
// a log line. Values are also made printable (internal/safe).
const MaxPeerText = 256

func peerText(s string) string { return safe.Printable(s, MaxPeerText) }

func sideWords(side string) (me, them string) {
	if side == spec.Outgoing {
		return "the source", "the destination"
	}
	return "the destination", "the source"
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// configMutable refuses capability changes and changes to non-live
// parameters in states the spec marks frozen.
func configMutable(in *Input) error {
	if in.Change == nil {
		return nil
	}
	sd := in.Spec.Side(in.Side)
	if sd == nil || sd.Mutable(in.State) {
		return nil
	}
	var rs []Refusal
	for _, name := range slices.Sorted(maps.Keys(in.Change.Caps)) {
		rs = append(rs, Refusal{Reason: fmt.Sprintf(
			"capability %s cannot change while the %s side is in state %s (configuration is frozen there; capabilities may change only in %s)",
			name, in.Side, in.State, strings.Join(mutableStates(sd), ", "))})
	}
	for _, name := range slices.Sorted(maps.Keys(in.Change.Params)) {
		p := in.Spec.Parameter(name)
		if p != nil && p.Live {
			continue
		}
		rs = append(rs, Refusal{Reason: fmt.Sprintf(
			"parameter %s cannot change while the %s side is in state %s (it is not live; it may change only in %s)",
			name, in.Side, in.State, strings.Join(mutableStates(sd), ", "))})
	}
	if len(rs) > 0 {
		return refuse(ConfigMutable, rs...)
	}
	return nil
}

func mutableStates(sd *spec.Side) []string {
	var out []string
	for _, st := range sd.States {
		if st.Config == spec.ConfigMutable {
			out = append(out, st.Name)
		}
	}
	return out
}

// outcomeKnown refuses while any migration side is in a state whose
// outcome is unknown (spec State.Outcome): the guest may neither start nor
// resume on its own there, whatever an operator's plain cont says.
func outcomeKnown(in *Input) error {
	var rs []Refusal
	for _, name := range spec.SideNames {
		sd := in.Spec.Side(name)
		if sd == nil {
			continue
		}
		st := sd.State(in.Sides[name])
		if st == nil || st.Outcome != spec.OutcomeUnknown {
			continue
		}
		rs = append(rs, Refusal{Reason: fmt.Sprintf("the %s migration is in %s: whether the guest runs on the other side is unknown; "+
			"say what happened with x-migctl-resolve-switchover first", name, st.QMPStatus())})
	}
	if len(rs) > 0 {
		return refuse(OutcomeKnown, rs...)
	}
	return nil
}

// pauseBeforeSwitchover allows its edge when the capability of the same
// name is on.
func pauseBeforeSwitchover(in *Input) error {
	if in.Config.Caps[PauseBeforeSwitchover] {
		return nil
	}
	return refuse(PauseBeforeSwitchover, Refusal{Reason: "capability pause-before-switchover is off"})
}
