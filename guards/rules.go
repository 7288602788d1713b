package guards

import (
	"fmt"
	"slices"
	"strings"

	"github.com/migctl/migctl/spec"
)

// Verdict is one rule's judgement of an Input.
type Verdict struct {
	Rule *spec.Rule
	// Applies: the rule's When holds.
	Applies bool
	// OK: the rule does not refuse (it does not apply, or Require holds).
	OK bool
	// Reason is the refusal text with placeholders filled, when !OK.
	Reason string
}

// Evaluate judges every rule of the spec against the input's candidate
// configuration. At connect the configuration judged is the effective one:
// a must-match capability the peer announced as on counts as on, since the
// stream that arrives will use it (the mismatch itself is reported by
// transport-compatible separately).
//
// Transport facts (transports, not-transports, transport-has,
// transport-lacks) cannot be judged before a transport is known: in When
// they then do not hold (the rule does not apply yet), in Require they hold
// (the rule is judged again once the transport is known).
func Evaluate(in *Input) []Verdict {
	eff := effective(in)
	rules := in.Spec.Rules()
	out := make([]Verdict, 0, len(rules))
	for i := range rules {
		r := &rules[i]
		v := Verdict{Rule: r, OK: true}
		if holds(&r.When, in, eff, false) {
			v.Applies = true
			if r.Require == nil || !holds(r.Require, in, eff, true) {
				v.OK = false
				v.Reason = message(r, in, eff)
			}
		}
		out = append(out, v)
	}
	return out
}

// effective returns the configuration a rule is judged against.
func effective(in *Input) Config {
	if in.Peer == nil {
		return in.Config
	}
	c := in.Config.Clone()
	for name, on := range in.Peer.Caps {
		if on {
			if cp := in.Spec.Capability(name); cp != nil && cp.MustMatchPeer {
				c.Caps[name] = true
			}
		}
	}
	return c
}

// holds reports whether every part of c holds. unknownTransport is the
// value transport facts take when no transport is known.
func holds(c *spec.Cond, in *Input, cfg Config, unknownTransport bool) bool {
	for _, n := range c.Caps {
		if !cfg.Caps[n] {
			return false
		}
	}
	for _, n := range c.CapsOff {
		if cfg.Caps[n] {
			return false
		}
	}
	if len(c.AnyCaps) > 0 && !slices.ContainsFunc(c.AnyCaps, func(n string) bool { return cfg.Caps[n] }) {
		return false
	}
	for _, n := range c.Enabling {
		if in.Change == nil {
			return false
		}
		on, set := in.Change.Caps[n]
		if !set || !on || in.Previous.Caps[n] {
			return false
		}
	}
	for name, pc := range c.Params {
		if !paramHolds(in.Spec, name, pc, cfg) {
			return false
		}
	}
	if len(c.Transports)+len(c.NotTransports)+len(c.TransportHas)+len(c.TransportLacks) > 0 {
		var t *spec.Transport
		if in.Transport != nil {
			t = in.Spec.Transport(in.Transport.Transport)
		}
		if t == nil {
			if !unknownTransport {
				return false
			}
		} else {
			if len(c.Transports) > 0 && !slices.Contains(c.Transports, t.Name) {
				return false
			}
			if slices.Contains(c.NotTransports, t.Name) {
				return false
			}
			for _, p := range c.TransportHas {
				if !in.Transport.has(t, p) {
					return false
				}
			}
			for _, p := range c.TransportLacks {
				if in.Transport.has(t, p) {
					return false
				}
			}
		}
	}
	for _, f := range c.Features {
		if !in.Features[f] {
			return false
		}
	}
	if c.Side != "" && !sideInUse(c.Side, in) {
		return false
	}
	if len(c.Triggers) > 0 && !slices.Contains(c.Triggers, in.Trigger) {
		return false
	}
	if len(c.GuestStates) > 0 && !slices.Contains(c.GuestStates, in.GuestState) {
		return false
	}
	for _, ch := range c.Channels {
		if in.Transport == nil || !slices.Contains(in.Transport.Channels, ch) {
			return false
		}
	}
	if len(c.States) > 0 && !slices.Contains(c.States, in.State) {
		return false
	}
	return true
}

func paramHolds(s *spec.Spec, name string, pc spec.ParamCond, cfg Config) bool {
	p := s.Parameter(name)
	if p == nil {
		return false
	}
	cur := cfg.Params[name]
	norm := func(v string) string {
		if n, err := p.Normalize(v); err == nil {
			return n
		}
		return v
	}
	if pc.Eq != nil && cur != norm(*pc.Eq) {
		return false
	}
	if pc.Ne != nil && cur == norm(*pc.Ne) {
		return false
	}
	if len(pc.In) > 0 && !slices.ContainsFunc(pc.In, func(v string) bool { return cur == norm(v) }) {
		return false
	}
	cmp := func(other string) (int, bool) {
		q := s.Parameter(other)
		if q == nil {
			return 0, false
		}
		a, ok1 := p.Value(cur).(uint64)
		b, ok2 := q.Value(cfg.Params[other]).(uint64)
		if !ok1 || !ok2 {
			return 0, false
		}
		switch {
		case a < b:
			return -1, true
		case a > b:
			return 1, true
		}
		return 0, true
	}
	if pc.GeParam != "" {
		if r, ok := cmp(pc.GeParam); !ok || r < 0 {
			return false
		}
	}
	if pc.LeParam != "" {
		if r, ok := cmp(pc.LeParam); !ok || r > 0 {
			return false
		}
	}
	return true
}

// namedCaps lists the capabilities a rule's When names: its caps, and
// those of its any-caps that are on.
func namedCaps(r *spec.Rule, cfg Config) []string {
	out := slices.Clone(r.When.Caps)
	for _, c := range r.When.AnyCaps {
		if cfg.Caps[c] {
			out = append(out, c)
		}
	}
	return out
}

// message fills a rule's placeholders and, when a transport is known and
// the text does not name it, says where the migration runs.
func message(r *spec.Rule, in *Input, cfg Config) string {
	uri, tname := "no transport yet", "no transport"
	if in.Transport != nil {
		uri, tname = in.Transport.URI, in.Transport.Transport
	}
	msg := strings.NewReplacer(
		"{uri}", uri,
		"{transport}", tname,
		"{side}", in.Side,
		"{state}", in.State,
		"{caps}", strings.Join(namedCaps(r, cfg), ", "),
	).Replace(r.Message)
	if in.Transport != nil && !strings.Contains(msg, in.Transport.URI) {
		verb := "migrating to"
		if in.Side == spec.Incoming {
			verb = "listening on"
		}
		msg = fmt.Sprintf("%s; %s %s", msg, verb, in.Transport.URI)
	}
	return msg
}

// sideInUse reports whether the input is judged for side: the side judging
// is that side, and it is in use — the trigger is one of its own edges, or
// a migration of that side runs (it is neither in its initial state nor in
// a terminal one, where a migration has ended). Both sides judge every
// configuration change (there is one configuration per process), so
// without the second half a destination-only rule would refuse a change on
// a process that is only ever a source, or that was a destination once.
func sideInUse(side string, in *Input) bool {
	if in.Side != side {
		return false
	}
	if in.Change == nil {
		return true
	}
	sd := in.Spec.Side(side)
	return sd == nil || (in.State != sd.Initial && !sd.Terminal(in.State)) || in.Transport != nil
}
