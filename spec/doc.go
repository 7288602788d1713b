// Package spec reads and checks transitions.yaml, the data that drives
// migctl: the state graph of each side of a migration (incoming and
// outgoing), the guards its edges name, and the capabilities, parameters,
// transports and compatibility rules those guards enforce.
//
// Load turns the bytes of a spec into a *Spec or into an *Errors that lists
// every problem at once, each at its file:line:col:
//
//	s, err := spec.LoadFile("transitions.yaml", guards.Default().Names())
//	var errs *spec.Errors
//	if errors.As(err, &errs) {
//		for _, e := range *errs {
//			fmt.Println(e) // transitions.yaml:41:11: to state "conected" is not declared in incoming.states (did you mean "connected"?)
//		}
//	}
//
// Load rejects YAML anchors and aliases, unknown and duplicate keys, values
// that break the struct tags of the types in this package (validator/v10,
// with the cross-reference tags capability, transport, feature, guard and
// parameter checked against the spec itself), and graphs that stateless
// would accept but that cannot work: undeclared states, unreachable states,
// states with no way to a terminal state, two edges for one trigger in one
// state, self-loops, guard names the registry does not implement.
//
// Mermaid and DOT draw a side's graph from the spec (guard names on edges,
// refusal edges and frozen states marked); StatesMarkdown and RulesMarkdown
// render the reference pages under docs/ (cmd/specdocs writes them).
//
// A *Spec returned by Load is read-only: share it between goroutines freely.
package spec
