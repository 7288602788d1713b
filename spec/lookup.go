package spec

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"

	"github.com/go-playground/validator/v10"
)

// Graph names: the two sides of a migration and the guest's run state.
const (
	Incoming = "incoming"
	Outgoing = "outgoing"
	Guest    = "guest"
)

// SideNames lists the migration sides in display order.
var SideNames = []string{Incoming, Outgoing}

// GraphNames lists every graph: the migration sides, then the guest.
var GraphNames = []string{Incoming, Outgoing, Guest}

// The configuration triggers: every configuration change is one of these
// internal transitions, fired on both migration sides and judged by each
// side's configure guards. A spec may not use them for its own edges; a
// rule may name them in triggers:.
const (
	TriggerSetCapabilities = "set-capabilities"
	TriggerSetParameters   = "set-parameters"
)

// ConfigTriggers lists the configuration triggers.
var ConfigTriggers = []string{TriggerSetCapabilities, TriggerSetParameters}

// Side returns the named graph (Incoming, Outgoing or Guest), or nil.
func (s *Spec) Side(name string) *Side {
	switch name {
	case Incoming:
		return &s.Incoming
	case Outgoing:
		return &s.Outgoing
	case Guest:
		return s.Guest
	}
	return nil
}

// HasGuest reports whether the spec declares the guest graph.
func (s *Spec) HasGuest() bool { return s.Guest != nil }

// Capability returns the named capability, or nil.
func (s *Spec) Capability(name string) *Capability {
	for i := range s.Capabilities {
		if s.Capabilities[i].Name == name {
			return &s.Capabilities[i]
		}
	}
	return nil
}

// Parameter returns the named parameter, or nil.
func (s *Spec) Parameter(name string) *Parameter {
	for i := range s.Parameters {
		if s.Parameters[i].Name == name {
			return &s.Parameters[i]
		}
	}
	return nil
}

// Transport returns the named transport, or nil.
func (s *Spec) Transport(name string) *Transport {
	for i := range s.Transports {
		if s.Transports[i].Name == name {
			return &s.Transports[i]
		}
	}
	return nil
}

// Rules returns every compatibility rule: the declared ones followed by the
// ones expanded from capability shorthands, in a stable order.
//
// Load computes the list once, so Rules on a loaded Spec allocates nothing
// and is safe from any number of goroutines. On a Spec built by hand it
// builds a fresh list on every call (it never writes to the Spec); do not
// modify the returned slice.
func (s *Spec) Rules() []Rule {
	if s.rules != nil {
		return s.rules
	}
	return s.buildRules()
}

func (s *Spec) buildRules() []Rule {
	return append(append([]Rule{}, s.RuleList...), s.expandShorthands()...)
}

// expandShorthands turns each capability's conflicts/requires/transports/
// needs-* fields into ordinary rules named "<cap>/<kind>[/<other>]".
func (s *Spec) expandShorthands() []Rule {
	var out []Rule
	for _, c := range s.Capabilities {
		for _, o := range c.Conflicts {
			out = append(out, Rule{
				Name:    c.Name + "/conflicts/" + o,
				Doc:     "capability " + c.Name + ": conflicts",
				When:    Cond{Caps: []string{c.Name, o}},
				Message: fmt.Sprintf("capability %s conflicts with capability %s; switch one of them off", c.Name, o),
			})
		}
		for _, o := range c.Requires {
			out = append(out, Rule{
				Name:    c.Name + "/requires/" + o,
				Doc:     "capability " + c.Name + ": requires",
				When:    Cond{Caps: []string{c.Name}},
				Require: &Cond{Caps: []string{o}},
				Message: fmt.Sprintf("capability %s requires capability %s; switch %s on first", c.Name, o, o),
			})
		}
		if len(c.Transports) > 0 {
			out = append(out, Rule{
				Name:    c.Name + "/transports",
				Doc:     "capability " + c.Name + ": allowed transports",
				When:    Cond{Caps: []string{c.Name}, NotTransports: c.Transports},
				Message: fmt.Sprintf("capability %s only works over %s; {transport} cannot carry it ({uri})", c.Name, strings.Join(c.Transports, ", ")),
			})
		}
		for _, p := range c.NeedsTransport {
			out = append(out, Rule{
				Name:    c.Name + "/needs-transport/" + p,
				Doc:     "capability " + c.Name + ": needs a " + p + " transport",
				When:    Cond{Caps: []string{c.Name}, TransportLacks: []string{p}},
				Message: fmt.Sprintf("capability %s needs a %s transport; {transport} is not ({uri})", c.Name, p),
			})
		}
		if len(c.NeedsKernel) > 0 {
			out = append(out, Rule{
				Name:    c.Name + "/needs-kernel",
				Doc:     "capability " + c.Name + ": host features",
				When:    Cond{Caps: []string{c.Name}, Side: c.NeedsKernelOn},
				Require: &Cond{Features: c.NeedsKernel},
				Message: fmt.Sprintf("capability %s needs host support for %s, which this host lacks", c.Name, strings.Join(c.NeedsKernel, " and ")),
			})
		}
	}
	return out
}

// State returns the named state of the side, or nil.
func (sd *Side) State(name string) *State {
	for i := range sd.States {
		if sd.States[i].Name == name {
			return &sd.States[i]
		}
	}
	return nil
}

// Mutable reports whether configuration may change in the named state.
func (sd *Side) Mutable(state string) bool {
	st := sd.State(state)
	return st != nil && st.Config == ConfigMutable
}

// Terminal reports whether the named state ends a migration.
func (sd *Side) Terminal(state string) bool {
	st := sd.State(state)
	return st != nil && st.Terminal
}

// Edge returns the edge for trigger on in state from, or nil.
func (sd *Side) Edge(from, on string) *Transition {
	for i := range sd.Transitions {
		if t := &sd.Transitions[i]; t.From == from && t.On == on {
			return t
		}
	}
	return nil
}

// Triggers returns every trigger name the side's transitions use, sorted by
// first appearance.
func (sd *Side) Triggers() []string {
	seen := map[string]bool{}
	var out []string
	for _, t := range sd.Transitions {
		if !seen[t.On] {
			seen[t.On] = true
			out = append(out, t.On)
		}
	}
	return out
}

// ErrBadValue is wrapped by every parameter value error.
var ErrBadValue = errors.New("invalid parameter value")

// valueValidator checks parameter values against their Validate tags: the
// validator's built-in tags plus pow2.
var valueValidator = newValueValidator()

func newValueValidator() *validator.Validate {
	v := validator.New()
	// pow2: an unsigned integer that is a power of two (xbzrle-cache-size).
	if err := v.RegisterValidation("pow2", func(fl validator.FieldLevel) bool {
		f := fl.Field()
		switch f.Kind() {
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			n := f.Uint()
			return n != 0 && n&(n-1) == 0
		}
		return false
	}); err != nil {
		panic(err)
	}
	return v
}

// Normalize converts a value given by a user (a string, bool, JSON number or
// Go integer) into the parameter's canonical textual form, and checks it
// against the parameter's type, enum values and validator tag. The returned
// error wraps ErrBadValue and names the parameter and its range.
func (p *Parameter) Normalize(v any) (string, error) {
	text, err := p.canonical(v)
	if err != nil {
		return "", fmt.Errorf("%w: parameter %s: %v", ErrBadValue, p.Name, err)
	}
	if err := p.check(text); err != nil {
		return "", fmt.Errorf("%w: parameter %s: %v", ErrBadValue, p.Name, err)
	}
	return text, nil
}

// Range describes the values the parameter accepts, for error messages.
func (p *Parameter) Range() string {
	switch {
	case p.Type == TypeEnum:
		return "one of " + strings.Join(p.Values, ", ")
	case p.Validate != "":
		return p.Type + " with " + p.Validate
	}
	return "any " + p.Type
}

func (p *Parameter) canonical(v any) (string, error) {
	switch p.Type {
	case TypeBool:
		switch x := v.(type) {
		case bool:
			return strconv.FormatBool(x), nil
		case string:
			switch strings.ToLower(x) {
			case "true", "on", "yes", "1":
				return "true", nil
			case "false", "off", "no", "0":
				return "false", nil
			}
		}
		return "", fmt.Errorf("want a boolean, got %v", describe(v))
	case TypeString, TypeEnum:
		s, ok := v.(string)
		if !ok {
			return "", fmt.Errorf("want a string, got %v", describe(v))
		}
		return s, nil
	}
	// integer types
	var n uint64
	switch x := v.(type) {
	case string:
		u, err := parseSize(x, p.Type == TypeSize)
		if err != nil {
			return "", err
		}
		n = u
	case json.Number:
		u, err := strconv.ParseUint(string(x), 10, 64)
		if err != nil {
			return "", fmt.Errorf("want a non-negative integer, got %s", x)
		}
		n = u
	case float64:
		if x < 0 || x != math.Trunc(x) || x > math.MaxUint64 {
			return "", fmt.Errorf("want a non-negative integer, got %v", x)
		}
		n = uint64(x)
	case int:
		if x < 0 {
			return "", fmt.Errorf("want a non-negative integer, got %d", x)
		}
		n = uint64(x)
	case int64:
		if x < 0 {
			return "", fmt.Errorf("want a non-negative integer, got %d", x)
		}
		n = uint64(x)
	case uint64:
		n = x
	default:
		return "", fmt.Errorf("want an integer, got %v", describe(v))
	}
	var limit uint64 = math.MaxUint64
	switch p.Type {
	case TypeUint8:
		limit = math.MaxUint8
	case TypeUint32:
		limit = math.MaxUint32
	}
	if n > limit {
		return "", fmt.Errorf("%d does not fit a %s", n, p.Type)
	}
	return strconv.FormatUint(n, 10), nil
}

func describe(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return fmt.Sprintf("string %q", v)
	}
	return fmt.Sprintf("%T %v", v, v)
}

// ParseSize parses a byte count: a decimal or 0x-hex integer with an
// optional K, M, G or T suffix (powers of 1024, optionally followed by
// "iB" or "B"), e.g. 4096, 64M, 1GiB.
func ParseSize(s string) (uint64, error) { return parseSize(s, true) }

// parseSize parses a decimal or 0x-hex integer; with suffixes allowed, also
// K, M, G, T (powers of 1024, optional "iB"/"B").
func parseSize(s string, suffixes bool) (uint64, error) {
	t := strings.TrimSpace(s)
	mult := uint64(1)
	if suffixes {
		u := strings.ToUpper(t)
		u = strings.TrimSuffix(strings.TrimSuffix(u, "IB"), "B")
		if n := len(u); n > 0 {
			switch u[n-1] {
			case 'K':
				mult = 1 << 10
			case 'M':
				mult = 1 << 20
			case 'G':
				mult = 1 << 30
			case 'T':
				mult = 1 << 40
			}
			if mult > 1 {
				u = u[:n-1]
			}
		}
		t = u
	}
	n, err := strconv.ParseUint(t, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("want a non-negative integer, got %q", s)
	}
	if mult > 1 && n > math.MaxUint64/mult {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return n * mult, nil
}

// Value returns the typed form of a canonical textual value (bool, uint64 or
// string), for comparisons and for validator tags.
func (p *Parameter) Value(text string) any {
	switch p.Type {
	case TypeBool:
		return text == "true"
	case TypeUint8, TypeUint32, TypeUint64, TypeSize:
		n, _ := strconv.ParseUint(text, 10, 64)
		return n
	}
	return text
}

func (p *Parameter) check(text string) error {
	if p.Type == TypeEnum {
		for _, v := range p.Values {
			if v == text {
				goto tag
			}
		}
		return fmt.Errorf("%q is not one of %s", text, strings.Join(p.Values, ", "))
	}
tag:
	if p.Validate == "" {
		return nil
	}
	if err := checkTag(p.Value(text), p.Validate); err != nil {
		return fmt.Errorf("%s is out of range (%s)", text, p.Validate)
	}
	return nil
}

// checkTag runs one validator tag against a value, turning a panic from a
// tag that does not compile into an error.
func checkTag(v any, tag string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("validator tag %q does not compile: %v", tag, r)
		}
	}()
	return valueValidator.Var(v, tag)
}
