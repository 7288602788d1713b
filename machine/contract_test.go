package machine_test

import (
	"context"
	"errors"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// renamed returns the default spec's text with one name of one graph
// renamed everywhere it is used (its states or edges, and the rules that
// would otherwise point at a name no graph has any more), so that the
// spec still loads and only the contract can notice.
func renamed(t *testing.T, need spec.Need, to string) []byte {
	t.Helper()
	var doc yaml.Node
	if err := yaml.Unmarshal(migctl.DefaultSpec, &doc); err != nil {
		t.Fatal(err)
	}
	root := doc.Content[0]
	get := func(m *yaml.Node, key string) *yaml.Node {
		for i := 0; i+1 < len(m.Content); i += 2 {
			if m.Content[i].Value == key {
				return m.Content[i+1]
			}
		}
		return nil
	}
	graph := get(root, need.Graph)
	stillUsed := false // another graph uses the same name: rules keep it
	for _, g := range spec.GraphNames {
		if g == need.Graph {
			continue
		}
		for _, tr := range get(get(root, g), "transitions").Content {
			if need.Kind == spec.NeedTrigger && get(tr, "on").Value == need.Name {
				stillUsed = true
			}
		}
		for _, st := range get(get(root, g), "states").Content {
			if need.Kind == spec.NeedState && get(st, "name").Value == need.Name {
				stillUsed = true
			}
		}
	}
	rename := func(n *yaml.Node) {
		if n != nil && n.Kind == yaml.ScalarNode && n.Value == need.Name {
			n.Value = to
		}
	}
	switch need.Kind {
	case spec.NeedTrigger:
		for _, tr := range get(graph, "transitions").Content {
			rename(get(tr, "on"))
		}
	case spec.NeedState:
		rename(get(graph, "initial"))
		for _, st := range get(graph, "states").Content {
			rename(get(st, "name"))
		}
		for _, tr := range get(graph, "transitions").Content {
			for _, k := range []string{"from", "to", "else"} {
				rename(get(tr, k))
			}
		}
	}
	for _, r := range get(root, "rules").Content {
		// A rule keeps a name another graph still uses, unless the rule
		// judges this graph alone (when.side).
		own := !stillUsed
		if w := get(r, "when"); w != nil {
			if sd := get(w, "side"); sd != nil && sd.Value == need.Graph {
				own = true
			}
		}
		if own {
			for _, part := range []string{"when", "require"} {
				cond := get(r, part)
				if cond == nil {
					continue
				}
				for _, k := range []string{"triggers", "states", "guest-states"} {
					if l := get(cond, k); l != nil {
						for _, n := range l.Content {
							rename(n)
						}
					}
				}
			}
		}
	}
	out, err := yaml.Marshal(&doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

var position = regexp.MustCompile(`renamed\.yaml:\d+:\d+: `)

// Renaming, in a copy of transitions.yaml, any state or trigger the Go code
// uses leaves a spec that loads and lints clean — and that the controller
// refuses to be built from, with file:line:col and the name.
func TestContractRefusesRenamedNames(t *testing.T) {
	needs := machine.Contract()
	if len(needs) < 20 {
		t.Fatalf("the contract lists only %d names", len(needs))
	}
	for _, need := range needs {
		t.Run(need.Graph+"/"+need.Kind+"/"+need.Name, func(t *testing.T) {
			text := renamed(t, need, need.Name+"-renamed")
			s, err := spec.Load("renamed.yaml", text, guards.Default().Names())
			if err != nil {
				t.Fatalf("the renamed spec does not load (the test's rename is incomplete):\n%v", err)
			}
			err = machine.Check(s)
			var errs *spec.Errors
			if !errors.As(err, &errs) {
				t.Fatalf("Check accepted a spec without %s %q: %v", need.Kind, need.Name, err)
			}
			msg := err.Error()
			if !strings.Contains(msg, `"`+need.Name+`"`) || !position.MatchString(msg) {
				t.Errorf("Check's error does not give file:line:col and the name %q:\n%s", need.Name, msg)
			}
			if _, err := machine.New(s, machine.Options{}); err == nil || !strings.Contains(err.Error(), need.Name) {
				t.Errorf("New built a controller from a spec without %s %q: %v", need.Kind, need.Name, err)
			}
		})
	}
}

// The endpoint a trigger brings is committed only when the side moves, and
// forgotten when the migration ends: a change after it is judged without
// it (QEMU checks the transport only at migrate).
func TestEndpointLifecycle(t *testing.T) {
	c := newController(t, false)
	ctx := context.Background()
	exec := &machine.Args{Endpoint: &guards.Endpoint{Transport: "exec", URI: "exec:cat"}}
	if err := c.SetCapabilities(ctx, map[string]bool{"return-path": true}); err != nil {
		t.Fatal(err)
	}
	// Refused by the guard: the side stays, and so does its (absent) endpoint.
	out, err := c.Fire(ctx, "outgoing", machine.TriggerMigrate, exec)
	var ge *machine.GuardError
	if !errors.As(err, &ge) || out.Moved || out.To != "none" {
		t.Fatalf("migrate exec with return-path: %+v %v", out, err)
	}
	if st, _ := c.Status("outgoing", 0); st.Endpoint != nil {
		t.Fatalf("a refused migrate left the endpoint %+v", st.Endpoint)
	}
	if err := c.SetCapabilities(ctx, map[string]bool{"return-path": false}); err != nil {
		t.Fatal(err)
	}
	out, err = c.Fire(ctx, "outgoing", machine.TriggerMigrate, exec)
	if err != nil || !out.Moved || out.From != "none" || out.To != "setup" {
		t.Fatalf("migrate exec: %+v %v", out, err)
	}
	if st, _ := c.Status("outgoing", 0); st.Endpoint == nil || st.Endpoint.URI != "exec:cat" {
		t.Fatalf("the migration's endpoint: %+v", st.Endpoint)
	}
	for _, tr := range []machine.Trigger{machine.TriggerFail, machine.TriggerCleanup} {
		if _, err := c.Fire(ctx, "outgoing", tr, nil); err != nil {
			t.Fatal(err)
		}
	}
	if st, _ := c.Status("outgoing", 0); st.Endpoint != nil {
		t.Fatalf("the ended migration kept its endpoint %+v", st.Endpoint)
	}
	if err := c.SetCapabilities(ctx, map[string]bool{"return-path": true}); err != nil {
		t.Fatalf("a change after the migration ended was judged against its transport: %v", err)
	}
}

// Fire reports what it did: moved, ignored, took the else edge, or was
// refused by a kind: refuse edge with the spec's message.
func TestFireOutcome(t *testing.T) {
	c := newController(t, false)
	ctx := context.Background()
	tcp := &machine.Args{Endpoint: &guards.Endpoint{Transport: "tcp", URI: "tcp:127.0.0.1:1"}}
	steps := []struct {
		trigger machine.Trigger
		a       *machine.Args
		want    machine.Outcome
	}{
		{machine.TriggerCancel, nil, machine.Outcome{Side: "outgoing", From: "none", To: "none", Ignored: true}},
		{machine.TriggerMigrate, tcp, machine.Outcome{Side: "outgoing", From: "none", To: "setup", Moved: true}},
		{machine.TriggerStart, nil, machine.Outcome{Side: "outgoing", From: "setup", To: "active", Moved: true}},
		{machine.TriggerSwitchover, nil, machine.Outcome{Side: "outgoing", From: "active", To: "device", Moved: true, Refused: true}},
	}
	for _, st := range steps {
		got, err := c.Fire(ctx, "outgoing", st.trigger, st.a)
		if err != nil || got != st.want {
			t.Fatalf("%s: got %+v (%v), want %+v", st.trigger, got, err, st.want)
		}
	}
	// A kind: refuse edge answers with the spec's message; nothing moves.
	c2 := newController(t, false)
	for _, tr := range []machine.Trigger{machine.TriggerMigrate, machine.TriggerStart, machine.TriggerSwitchover, machine.TriggerPostcopy, machine.TriggerRun} {
		if _, err := c2.Fire(ctx, "outgoing", tr, tcp); err != nil {
			t.Fatalf("%s: %v", tr, err)
		}
	}
	out, err := c2.Fire(ctx, "outgoing", machine.TriggerCancel, nil)
	var np *machine.NotPermittedError
	if !errors.As(err, &np) || np.Reason != "Postcopy migration in progress, cannot cancel." || out.Moved || out.To != "postcopy-active" {
		t.Fatalf("cancel in postcopy: %+v %v", out, err)
	}
	if !slices.Contains(np.Permitted, "complete") {
		t.Fatalf("the refusal lists permitted %v", np.Permitted)
	}
}
