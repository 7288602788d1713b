package qmp

import (
	"fmt"

	"github.com/migctl/migctl/spec"
)

// This file adds x-migctl-query-settings, the query `migctl info` builds
// its tables from: every capability and parameter with what the spec says
// of it (effect, unit, live) and whether it may change now. The x- prefix
// marks it unstable, as QEMU's x- commands are.

func init() {
	register("x-migctl-query-settings", command{run: cmdQuerySettings})
}

// register adds a command defined outside commands.go's table. It runs
// from init in files named after commands.go, which the go tool
// initialises later (files in lexical order); it panics, so every test
// fails, if the table is not there yet or the name is taken.
func register(name string, c command) {
	if commands == nil {
		panic("qmp: register " + name + ": the command table is not initialised yet")
	}
	if _, dup := commands[name]; dup {
		panic("qmp: command " + name + " registered twice")
	}
	commands[name] = c
}

// SettingsInfo is x-migctl-query-settings' result.
type SettingsInfo struct {
	Capabilities []CapabilityInfo `json:"capabilities"`
	Parameters   []ParameterInfo  `json:"parameters"`
}

// CapabilityInfo is one capability: its state and what migctl does with it.
type CapabilityInfo struct {
	Name  string `json:"name"`
	State bool   `json:"state"`
	// Effect is what migctl does with it on: honoured, refused or vacuous
	// (spec: effect); Why says why.
	Effect string `json:"effect"`
	Why    string `json:"why,omitempty"`
	// Mutable: migrate-set-capabilities may change it now (both sides'
	// machines are in a state whose configuration is mutable). Rules may
	// still refuse a given change.
	Mutable bool `json:"mutable"`
}

// ParameterInfo is one parameter: its value and what the spec says of it.
type ParameterInfo struct {
	Name string `json:"name"`
	// Value and Default are in the spec's canonical text form.
	Value   string `json:"value"`
	Default string `json:"default"`
	Type    string `json:"type"`
	Unit    string `json:"unit,omitempty"`
	// Live parameters may change while a migration runs.
	Live   bool   `json:"live"`
	Effect string `json:"effect,omitempty"`
	Why    string `json:"why,omitempty"`
	// Mutable: migrate-set-parameters may change it now (it is live, or
	// both sides' configuration is mutable).
	Mutable bool `json:"mutable"`
}

func cmdQuerySettings(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	mutable := true
	for _, side := range spec.SideNames {
		st, err := s.c.Status(side, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("x-migctl-query-settings: %w", err)
		}
		mutable = mutable && st.Mutable
	}
	sp := s.c.Spec()
	cfg := s.c.Config()
	out := SettingsInfo{Capabilities: []CapabilityInfo{}, Parameters: []ParameterInfo{}}
	for _, c := range sp.Capabilities {
		out.Capabilities = append(out.Capabilities, CapabilityInfo{
			Name: c.Name, State: cfg.Caps[c.Name], Effect: c.Effect, Why: c.Why, Mutable: mutable,
		})
	}
	for i := range sp.Parameters {
		p := &sp.Parameters[i]
		out.Parameters = append(out.Parameters, ParameterInfo{
			Name: p.Name, Value: cfg.Params[p.Name], Default: p.Default, Type: p.Type, Unit: p.Unit,
			Live: p.Live, Effect: p.Effect, Why: p.Why, Mutable: mutable || p.Live,
		})
	}
	return out, nil, nil
}
