package spec

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// marker marks, in a broken spec's text, the position an error must point
// at. It is removed before the text is loaded.
const marker = "»"

type pos struct{ line, col int }

// unmark removes the markers from text and returns their positions (1-based
// line and byte column), in text order.
func unmark(text string) (string, []pos) {
	var ps []pos
	lines := strings.Split(text, "\n")
	for i, ln := range lines {
		for {
			j := strings.Index(ln, marker)
			if j < 0 {
				break
			}
			ps = append(ps, pos{i + 1, j + 1})
			ln = ln[:j] + ln[j+len(marker):]
		}
		lines[i] = ln
	}
	return strings.Join(lines, "\n"), ps
}

func readSmall(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile("testdata/small.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// brokenCase is the small spec with edits; want holds one message
// substring per marker, in the order the markers appear.
type brokenCase struct {
	name     string
	edits    [][2]string // old → new, each applied once; new may hold markers
	text     *string     // the whole text instead of the small spec
	registry []string    // guard registry; nil means the small spec's two guards
	want     []string
}

func ptr(s string) *string { return &s }

var brokenCases = []brokenCase{
	{name: "unknown field", edits: [][2]string{{"  - name: turbo\n    doc: Go faster.", "  - »name: turbo\n    »dco: Go faster."}},
		want: []string{"capabilities[0].doc is required", `unknown field "dco" in capabilities[0]; did you mean "doc"?`}},
	{name: "unknown field in flow mapping", edits: [][2]string{{"doc: Nothing yet.", "»dock: Nothing yet."}},
		want: []string{`unknown field "dock" in incoming.states[0]; did you mean "doc"?`}},
	{name: "unknown field without a near name", edits: [][2]string{{"  initial: none", "  initial: none\n  »superstates: []"}},
		want: []string{`unknown field "superstates" in outgoing (known fields: initial, configure, states, transitions)`}},
	// yaml.v3 reports a line but no column for syntax errors: column 1.
	{name: "YAML syntax", edits: [][2]string{{"    doc: Check twice.", "»    doc: Check: twice: x"}},
		want: []string{"YAML syntax: mapping values are not allowed in this context"}},
	{name: "YAML syntax on a missing colon", edits: [][2]string{{"    doc: Check twice.", "    doc: Check twice.\n»  bad"}},
		want: []string{"YAML syntax: could not find expected ':'"}},
	{name: "duplicate key", edits: [][2]string{{"    doc: Check twice.", "    doc: Check twice.\n    »doc: Again."}},
		want: []string{`duplicate key "doc" in capabilities[1] (first at line 21)`}},
	{name: "anchor and alias", edits: [][2]string{
		{"    conflicts: [careful]", "    conflicts: »&c [careful]"},
		{"    doc: Check twice.", "    doc: Check twice.\n    conflicts: »*c"}},
		want: []string{"anchor &c: anchors and aliases are not allowed", "alias *c: anchors and aliases are not allowed"}},
	{name: "wrong kind", edits: [][2]string{{"version: 1", "version: »one"}},
		want: []string{"version: expected an integer, got a string (one)"}},
	{name: "list for a mapping", edits: [][2]string{{"  initial: idle", "  initial: »[idle]"}},
		want: []string{"incoming.initial: expected a string, got a list"}},
	{name: "wrong version", edits: [][2]string{{"version: 1", "version: »2"}},
		want: []string{"version must be 1, got 2"}},
	{name: "misspelt section", edits: [][2]string{{"version: 1", "»version: 1"}, {"outgoing:\n  initial: none\n", "»outgoin:\n  initial: none\n"}},
		want: []string{"outgoing is required", `unknown field "outgoin" in the top level; did you mean "outgoing"?`}},
	{name: "missing outgoing", edits: [][2]string{{"version: 1", "»version: 1"}, {strings.Join(strings.SplitAfter(smallOutgoing, "\n"), ""), ""}},
		want: []string{"outgoing is required"}},
	{name: "bad identifier", edits: [][2]string{{"  - name: page-size", "  - name: »Page_Size"}},
		want: []string{`facts[0].name: "Page_Size" is not a valid name`}},
	{name: "oneof", edits: [][2]string{{"{name: run-ning, config: frozen}", "{name: run-ning, config: »frozn}"}},
		want: []string{`incoming.states[2].config must be one of mutable, frozen, got "frozn"`}},
	{name: "duplicate name", edits: [][2]string{{"  - name: level", "  - name: »speed"}},
		want: []string{`parameters: a second entry named "speed" (the first is at line 23)`}},
	{name: "undeclared capability", edits: [][2]string{{"conflicts: [careful]", "conflicts: [»carefull]"}},
		want: []string{`capabilities[0].conflicts[0]: capability "carefull" is not declared under capabilities: (did you mean "careful"?)`}},
	{name: "capability conflicts with itself", edits: [][2]string{{"conflicts: [careful]", "conflicts: [careful, »turbo]"}},
		want: []string{`capability "turbo" lists itself in conflicts`}},
	{name: "needs-kernel-on without needs-kernel", edits: [][2]string{{"    doc: Check twice.", "    doc: Check twice.\n    needs-kernel-on: »incoming"}},
		want: []string{"capabilities[1].needs-kernel-on is set without needs-kernel"}},
	{name: "bad validator tag", edits: [][2]string{{"validate: min=1,max=100", "validate: »min=x"}},
		want: []string{`validate tag "min=x" of parameter speed does not compile for a uint32`}},
	{name: "unknown validator tag", edits: [][2]string{{"validate: min=1,max=100", "validate: »between=1-100"}},
		want: []string{`validate tag "between=1-100" of parameter speed does not compile`}},
	{name: "default out of range", edits: [][2]string{{`default: "10"`, `default: »"500"`}},
		want: []string{`default "500" of parameter speed is not a valid value: 500 is out of range (min=1,max=100)`}},
	{name: "default not in enum", edits: [][2]string{{"default: low", "default: »lowest"}},
		want: []string{`default "lowest" of parameter level is not a valid value: "lowest" is not one of low, high`}},
	{name: "enum without values", edits: [][2]string{{"  - name: level", "  - »name: level"}, {"    values: [low, high]\n", ""}},
		want: []string{"parameters[1].values is required when type is enum"}},
	{name: "values on a non-enum", edits: [][2]string{{"    validate: min=1,max=100", "    validate: min=1,max=100\n    values: »[a]"}},
		want: []string{"values are only for enum parameters, and this one is uint32"}},
	{name: "undeclared initial", edits: [][2]string{{"  initial: idle", "  initial: »idel"}},
		want: []string{`initial state "idel" is not declared in incoming.states (did you mean "idle"?)`}},
	{name: "undeclared from", edits: [][2]string{{"{from: failed, on: cancel, kind: ignore}", "{from: »faled, on: cancel, kind: ignore}"}},
		want: []string{`from state "faled" is not declared in incoming.states (did you mean "failed"?)`}},
	{name: "undeclared to", edits: [][2]string{{"{from: run-ning, on: fail, to: failed}", "{from: run-ning, on: fail, to: »faild}"}},
		want: []string{`to state "faild" is not declared in incoming.states (did you mean "failed"?)`}},
	{name: "undeclared else", edits: [][2]string{{"else: failed", "else: »fail"}},
		want: []string{`else state "fail" is not declared in incoming.states`}},
	{name: "undeclared guard on an edge", edits: [][2]string{{"guards: [ready], else", "guards: [»redy], else"}},
		want: []string{`incoming.transitions[1].guards[0]: guard "redy" is not declared under guards: (did you mean "ready"?)`}},
	{name: "undeclared guard in configure", edits: [][2]string{{"configure: [allowed]", "configure: [»alowed]"}},
		want: []string{`incoming.configure[0]: guard "alowed" is not declared under guards: (did you mean "allowed"?)`}},
	{name: "guard missing from the registry", registry: []string{"ready"}, edits: [][2]string{{"  - name: allowed", "  - name: »allowed"}},
		want: []string{`guard "allowed" has no implementation in the guard registry (it has: ready)`}},
	{name: "unreachable state", edits: [][2]string{{"    - {name: failed, config: frozen, terminal: true}", "    - {name: failed, config: frozen, terminal: true}\n    - {name: »lost, config: frozen, terminal: true}"}},
		want: []string{`state "lost" cannot be reached from the initial state "idle"`}},
	{name: "dead end", edits: [][2]string{
		{"    - {name: failed, config: frozen, terminal: true}", "    - {name: failed, config: frozen, terminal: true}\n    - {name: »stuck, config: frozen}"},
		{"    - {from: run-ning, on: fail, to: failed}", "    - {from: run-ning, on: fail, to: failed}\n    - {from: run-ning, on: hang, to: stuck}"}},
		want: []string{`state "stuck" has no path to a terminal state (done, failed); a migration could be stuck there`}},
	{name: "no terminal state", edits: [][2]string{{"  states:\n    - {name: none", "  »states:\n    - {name: none"}, {"{name: ended, config: mutable, terminal: true}", "{name: ended, config: mutable}"}},
		want: []string{"outgoing has no terminal state"}},
	{name: "two edges for one trigger", edits: [][2]string{{"    - {from: run-ning, on: finish, to: done}", "    - {from: run-ning, on: finish, to: done}\n    - {from: run-ning, on: »finish, to: failed}"}},
		want: []string{`a second edge for trigger "finish" in state "run-ning" (the first is at line 59); only one edge per state and trigger is allowed`}},
	{name: "edge without a target", edits: [][2]string{{"    - {from: run-ning, on: fail, to: failed}", "    - »{from: run-ning, on: fail}"}},
		want: []string{"incoming.transitions[3].to is required (only kind: ignore and kind: refuse edges have no target)"}},
	{name: "else without guards", edits: [][2]string{{"{from: run-ning, on: finish, to: done}", "{from: run-ning, on: finish, to: done, else: »failed}"}},
		want: []string{"incoming.transitions[2].else needs guards"}},
	{name: "self transition", edits: [][2]string{{"    - {from: run-ning, on: fail, to: failed}", "    - {from: run-ning, on: fail, to: failed}\n    - {from: run-ning, on: tick, to: »run-ning}"}},
		want: []string{"edge run-ning --tick--> run-ning returns to its own state; stateless cannot permit a self-transition"}},
	{name: "else to its own state", edits: [][2]string{{"else: failed", "else: »wait-ing"}},
		want: []string{"else: wait-ing is the edge's own state"}},
	{name: "ignore edge with a target", edits: [][2]string{{"{from: done, on: cancel, kind: ignore}", "{from: done, on: cancel, kind: ignore, to: »idle}"}},
		want: []string{"a kind: ignore edge stays in its state; drop to:"}},
	{name: "rule names an unknown state", edits: [][2]string{{"transport-lacks: [multi-channel]}", "transport-lacks: [multi-channel], side: incoming, states: [»runing]}"}},
		want: []string{`state "runing" is not declared in incoming (did you mean "run-ning"?)`}},
	{name: "rule names an unknown trigger", edits: [][2]string{{"transport-lacks: [multi-channel]}", "transport-lacks: [multi-channel], triggers: [»strat]}"}},
		want: []string{`trigger "strat" is on no edge of incoming or outgoing and is not a configuration trigger (did you mean "start"?)`}},
	{name: "rule compares with a bad value", edits: [][2]string{{"transport-lacks: [multi-channel]}", "transport-lacks: [multi-channel], params: {level: {eq: »medium}}}"}},
		want: []string{`"medium" is not a value of parameter level: "medium" is not one of low, high`}},
	{name: "rule compares a parameter with nothing", edits: [][2]string{{"transport-lacks: [multi-channel]}", "transport-lacks: [multi-channel], params: {level: »{}}}"}},
		want: []string{"rules[0].when.params.level compares nothing"}},
	{name: "rule names an unknown parameter", edits: [][2]string{{"transport-lacks: [multi-channel]}", "transport-lacks: [multi-channel], params: {»sped: {eq: 1}}}"}},
		want: []string{`rules[0].when.params.sped: parameter "sped" is not declared under parameters: (did you mean "speed"?)`}},
	{name: "rule condition never holds", edits: [][2]string{{"transport-lacks: [multi-channel]}", "transport-lacks: [multi-channel], caps-off: [»turbo]}"}},
		want: []string{`"turbo" is also required by this condition, so it can never hold`}},
	{name: "rule name taken by a shorthand", edits: [][2]string{{"  - name: turbo/channels", "  - name: »turbo/conflicts/careful"}},
		want: []string{`rule name "turbo/conflicts/careful" is taken by a shorthand`}},
	{name: "empty file", text: ptr("»"), want: []string{"the spec is empty"}},
	{name: "comment only", text: ptr("»# nothing\n"), want: []string{"the spec is empty"}},
	{name: "top level list", text: ptr("»- version: 1\n"), want: []string{"the top level of a spec must be a mapping"}},
	{name: "two documents", edits: [][2]string{{"version: 1", "version: 1\n---\n»version: 1"}},
		want: []string{"a second YAML document starts here"}},
	{name: "several errors at once", edits: [][2]string{
		{"validate: min=1,max=100", "validate: »min=x"},
		{"{name: run-ning, config: frozen}", "{name: run-ning, config: »frozn}"},
		{"guards: [ready], else", "guards: [»redy], else"},
		{"    - {name: failed, config: frozen, terminal: true}", "    - {name: failed, config: frozen, terminal: true}\n    - {name: »lost, config: frozen, terminal: true}"},
		{"  - name: turbo\n    doc: Go faster.", "  - name: turbo\n    doc: Go faster.\n    »colour: red"}},
		want: []string{`unknown field "colour"`, "does not compile", `config must be one of mutable, frozen`, `state "lost" cannot be reached`, `guard "redy" is not declared`}},
}

// smallOutgoing is the outgoing section of testdata/small.yaml.
const smallOutgoing = `outgoing:
  initial: none
  states:
    - {name: none, config: mutable}
    - {name: sending, config: frozen}
    - {name: ended, config: mutable, terminal: true}
  transitions:
    - {from: none, on: send, to: sending, guards: [ready, allowed]}
    - {from: sending, on: finish, to: ended}
    - {from: ended, on: send, to: sending, guards: [ready]}
`

func (c brokenCase) source(t *testing.T) string {
	if c.text != nil {
		return *c.text
	}
	text := readSmall(t)
	for _, e := range c.edits {
		if strings.Count(text, e[0]) != 1 {
			t.Fatalf("edit %q does not match exactly once", e[0])
		}
		text = strings.Replace(text, e[0], e[1], 1)
	}
	return text
}

func TestBrokenSpecs(t *testing.T) {
	for _, c := range brokenCases {
		t.Run(c.name, func(t *testing.T) {
			text, marks := unmark(c.source(t))
			if len(marks) != len(c.want) {
				t.Fatalf("test bug: %d markers for %d wanted errors", len(marks), len(c.want))
			}
			reg := c.registry
			if reg == nil {
				reg = []string{"ready", "allowed"}
			}
			s, err := Load("small.yaml", []byte(text), reg)
			if err == nil {
				t.Fatalf("loaded without error: %+v", s)
			}
			if s != nil {
				t.Error("Load returned a spec along with an error")
			}
			var errs *Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error is %T, not *Errors: %v", err, err)
			}
			got := *errs
			if len(got) != len(c.want) {
				t.Fatalf("got %d errors, want %d:\n%v", len(got), len(c.want), err)
			}
			for i, w := range c.want {
				prefix := fmt.Sprintf("small.yaml:%d:%d: ", marks[i].line, marks[i].col)
				if e := got[i].Error(); !strings.HasPrefix(e, prefix) || !strings.Contains(e, w) {
					t.Errorf("error %d:\n got  %s\n want %s...%s", i, e, prefix, w)
				}
			}
		})
	}
}
