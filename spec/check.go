package spec

import (
	"fmt"
	"slices"
)

// Need is one name that code outside the spec depends on: a state a graph
// must declare, or a trigger some edge of a graph must use. Package machine
// lists every name the Go code uses as Needs (its contract with the spec)
// and refuses to build a controller from a spec that lacks one.
type Need struct {
	// Graph is Incoming, Outgoing or Guest.
	Graph string
	// Kind is NeedState or NeedTrigger.
	Kind string
	// Name is the state or trigger.
	Name string
	// By names what depends on it, for the message (e.g. "machine.Connect").
	By string
}

// Kinds of Need.
const (
	NeedState   = "state"
	NeedTrigger = "trigger"
)

// Check reports every need the spec does not meet, as *Errors, each at the
// position of the graph's states: or transitions: list (file:line:col) and
// naming the missing name and what needs it. It returns nil when every
// need is met.
func (s *Spec) Check(needs []Need) error {
	var errs []Error
	at := func(path, format string, args ...any) {
		e := Error{File: s.File, Msg: fmt.Sprintf(format, args...)}
		if s.ix != nil {
			e.Line, e.Col = s.ix.keyPos(path)
		}
		errs = append(errs, e)
	}
	for _, n := range needs {
		sd := s.Side(n.Graph)
		if !slices.Contains(GraphNames, n.Graph) {
			at("", "the Go code needs a graph %q, which specs do not have", n.Graph)
			continue
		}
		if sd == nil || len(sd.States) == 0 {
			at(n.Graph, "%s: the Go code needs the %s graph (%s %q for %s), which this spec does not declare", n.Graph, n.Graph, n.Kind, n.Name, n.By)
			continue
		}
		switch n.Kind {
		case NeedState:
			if sd.State(n.Name) == nil {
				names := make([]string, len(sd.States))
				for i, st := range sd.States {
					names[i] = st.Name
				}
				at(n.Graph+".states", "%s: the Go code uses state %q (%s), which %s.states does not declare%s; rename it back or change the contract in package machine",
					n.Graph, n.Name, n.By, n.Graph, didYouMean(n.Name, names))
			}
		case NeedTrigger:
			if !slices.Contains(sd.Triggers(), n.Name) {
				at(n.Graph+".transitions", "%s: the Go code fires trigger %q (%s), which no edge of %s uses%s; rename it back or change the contract in package machine",
					n.Graph, n.Name, n.By, n.Graph, didYouMean(n.Name, sd.Triggers()))
			}
		default:
			at("", "need %q of %s has unknown kind %q", n.Name, n.By, n.Kind)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	out := Errors(sortErrors(errs))
	return &out
}
