package machine

import (
	"errors"
	"fmt"
	"strings"

	"github.com/migctl/migctl/guards"
)

// NotPermittedError: the trigger has no edge from the side's current state,
// or the state refuses it with a message (a kind: refuse edge).
type NotPermittedError struct {
	Side    string
	State   State
	Trigger Trigger
	// Permitted lists the triggers the state does accept, sorted.
	Permitted []Trigger
	// Reason is the spec's message when a kind: refuse edge refused the
	// trigger (QEMU's wording, e.g. "Postcopy migration in progress,
	// cannot cancel."); empty when the state has no edge for it.
	Reason string
}

func (e *NotPermittedError) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("%s: %s refused in state %s: %s", e.Side, e.Trigger, e.State, e.Reason)
	}
	p := "none"
	if len(e.Permitted) > 0 {
		ps := make([]string, len(e.Permitted))
		for i, t := range e.Permitted {
			ps[i] = string(t)
		}
		p = strings.Join(ps, ", ")
	}
	return fmt.Sprintf("%s: trigger %q is not permitted in state %s (permitted: %s)", e.Side, e.Trigger, e.State, p)
}

// GuardError: a guard refused the trigger. When the refused edge declares
// an else target, the side has moved there (To); otherwise the state is
// unchanged (To is empty).
type GuardError struct {
	Side    string
	State   State
	Trigger Trigger
	// Guards names the guards that refused, in spec order.
	Guards []string
	// Refusals holds every reason.
	Refusals []guards.Refusal
	// To is the state the refusal moved the side to, or "".
	To State
}

func (e *GuardError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s refused in state %s by %s: ", e.Side, e.Trigger, e.State, strings.Join(e.Guards, ", "))
	for i, r := range e.Refusals {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(r.Reason)
	}
	if e.To != "" {
		fmt.Fprintf(&b, " (now %s)", e.To)
	}
	return b.String()
}

// Reason returns the refusal reasons joined, without the framing.
func (e *GuardError) Reason() string {
	rs := make([]string, len(e.Refusals))
	for i, r := range e.Refusals {
		rs[i] = r.Reason
	}
	return strings.Join(rs, "; ")
}

// InvalidValueError: a parameter value does not fit the parameter.
type InvalidValueError struct {
	Param string
	Value any
	// Range describes what the parameter accepts.
	Range string
	Err   error
}

func (e *InvalidValueError) Error() string {
	return fmt.Sprintf("%v; %s expects %s", e.Err, e.Param, e.Range)
}

func (e *InvalidValueError) Unwrap() error { return e.Err }

// ErrUnknownName is wrapped when a capability, parameter or side name is
// not declared in the spec.
var ErrUnknownName = errors.New("unknown name")

// ErrClosed is returned after Close.
var ErrClosed = errors.New("machine: controller closed")
