package main

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// startTriggers is the trigger each side's migrations start with: what
// explain judges by default.
var startTriggers = map[string]machine.Trigger{spec.Outgoing: machine.TriggerMigrate, spec.Incoming: machine.TriggerIncoming}

// guestPath finds the guest triggers that lead from state from to state to
// in the spec's guest graph (a breadth-first search over its permit
// edges); ok is false when to cannot be reached.
func guestPath(s *spec.Spec, from, to string) (path []machine.Trigger, ok bool) {
	type step struct {
		state string
		path  []machine.Trigger
	}
	seen := map[string]bool{from: true}
	queue := []step{{from, nil}}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		if cur.state == to {
			return cur.path, true
		}
		for _, t := range s.Guest.Transitions {
			if t.From != cur.state || (t.Kind != "" && t.Kind != spec.KindPermit) || seen[t.To] {
				continue
			}
			seen[t.To] = true
			queue = append(queue, step{t.To, append(slices.Clone(cur.path), machine.Trigger(t.On))})
		}
	}
	return nil, false
}

func newExplain() *cobra.Command {
	var uri, side, trigger, runState string
	var caps, params, features []string
	var all bool
	cmd := &cobra.Command{
		Use:   "explain --transport URI [--cap NAME[=on|off]]... [--param NAME=VALUE]...",
		Short: "Judge a configuration as the controller would and say why it is allowed or refused",
		Long: "explain builds the same controller `migctl serve` runs (this host's features, the spec) and asks it to\n" +
			"judge firing a trigger — by default the side's start trigger: migrate (outgoing) or incoming\n" +
			"(--side incoming) — with the given transport and configuration, the guest in --run-state (a source's\n" +
			"runs, a destination's waits for its migration). It prints the rules that refuse, then\n" +
			"the ones that apply and allow, and what migctl does with each setting given (honoured, refused or\n" +
			"vacuous). Exit status 0 when allowed, 1 when refused: the same answer the real migrate or\n" +
			"migrate-incoming would get.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := loadSpec(cmd, nil)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: 1}
			}
			if side != spec.Incoming && side != spec.Outgoing {
				return usagef("--side %q: want incoming or outgoing", side)
			}
			tr := startTriggers[side]
			if trigger != "" {
				tr = machine.Trigger(trigger)
			}
			cfg := guards.DefaultConfig(s)
			set := &guards.Change{Caps: map[string]bool{}, Params: map[string]string{}}
			for _, c := range caps {
				name, val, hasVal := strings.Cut(c, "=")
				if s.Capability(name) == nil {
					return usagef("--cap %s: unknown capability (docs/rules.md lists them)", name)
				}
				on, ok := parseOnOff(val, !hasVal)
				if !ok {
					return usagef("--cap %s: want %s, got %q", name, onOffWords, val)
				}
				cfg.Caps[name] = on
				set.Caps[name] = on
			}
			for _, p := range params {
				name, val, ok := strings.Cut(p, "=")
				par := s.Parameter(name)
				if !ok || par == nil {
					return usagef("--param %q: want NAME=VALUE with a declared parameter", p)
				}
				v, err := par.Normalize(val)
				if err != nil {
					return usagef("--param %s: %w (expects %s)", name, err, par.Range())
				}
				cfg.Params[name] = v
				set.Params[name] = v
			}
			feats := host.Features()
			for _, f := range features {
				feats[f] = true
			}
			// A source process's guest boots; a destination's waits for its
			// migration. --run-state drives the guest graph further, along
			// its own edges, from whichever of the two reaches it.
			incoming := side == spec.Incoming
			var path []machine.Trigger
			if runState != "" {
				if s.Guest.State(runState) == nil {
					return fmt.Errorf("--run-state %q: not a state of the guest graph (docs/states.md lists them)", runState)
				}
				found := false
				for _, inc := range []bool{incoming, !incoming} {
					probe, err := machine.New(s, machine.Options{Features: feats, Incoming: inc})
					if err != nil {
						return err
					}
					at, _ := probe.State(spec.Guest)
					probe.Close()
					if p, ok := guestPath(s, string(at), runState); ok {
						incoming, path, found = inc, p, true
						break
					}
				}
				if !found {
					return fmt.Errorf("--run-state %q: the guest graph never reaches it from a source's or a destination's start", runState)
				}
			}
			c, err := machine.New(s, machine.Options{Features: feats, Incoming: incoming})
			if err != nil {
				return err
			}
			defer c.Close()
			for _, tr := range path {
				if _, err := c.Fire(cmd.Context(), spec.Guest, tr, nil); err != nil {
					return fmt.Errorf("--run-state %s: %w", runState, err)
				}
			}
			a := &machine.Args{}
			if uri != "" {
				ad, err := transport.Parse(uri)
				if err != nil {
					return fmt.Errorf("--transport: %w", err)
				}
				if s.Transport(ad.Scheme) == nil {
					return fmt.Errorf("--transport %s: the spec declares no transport %q", uri, ad.Scheme)
				}
				a.Endpoint = &guards.Endpoint{Transport: ad.Scheme, URI: ad.String()}
				// The probe migrate and migrate-incoming use: an fd: is
				// judged by what its descriptor is (in this process).
				if props, ok, err := transport.Probe(ad); err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "migctl explain: %s: %v; judging it by the spec's declaration of %s\n", ad, err, ad.Scheme)
				} else if ok {
					a.Endpoint.Props = props.Map()
				}
			}
			verdicts, err := c.Judge(side, tr, a, cfg)
			out := cmd.OutOrStdout()
			var np *machine.NotPermittedError
			if errors.As(err, &np) {
				fmt.Fprintf(out, "REFUSED  %s\n", err)
				return &exitError{code: 1}
			}
			if err != nil {
				return err
			}
			refused := printVerdicts(out, verdicts, all)
			printEffects(out, s, set)
			if refused > 0 {
				fmt.Fprintf(out, "\n%s on the %s side: refused by %d rule(s)\n", tr, side, refused)
				return &exitError{code: 1}
			}
			fmt.Fprintf(out, "\n%s on the %s side: allowed\n", tr, side)
			return nil
		},
	}
	cmd.Flags().StringVar(&uri, "transport", "", "migration `URI` (tcp:HOST:PORT, unix:PATH, fd:N, file:PATH, exec:CMD, rdma:HOST:PORT)")
	cmd.Flags().StringArrayVar(&caps, "cap", nil, "capability to set, `NAME[=on|off]` (repeatable; also yes|no, true|false)")
	cmd.Flags().StringArrayVar(&params, "param", nil, "parameter to set, `NAME=VALUE` (repeatable)")
	cmd.Flags().StringArrayVar(&features, "feature", nil, "host `FEATURE` to assume present besides the ones this host has, e.g. kvm-dirty-ring (repeatable)")
	cmd.Flags().StringVar(&side, "side", spec.Outgoing, "`SIDE` to judge: incoming or outgoing")
	cmd.Flags().StringVar(&trigger, "trigger", "", "`TRIGGER` to judge (default: migrate for outgoing, incoming for incoming; also set-capabilities, set-parameters)")
	cmd.Flags().BoolVar(&all, "all", false, "also list the rules that do not apply")
	cmd.Flags().StringVar(&runState, "run-state", "", "the guest's run `STATE` to judge in (default: running for outgoing, inmigrate for incoming; also paused, postmigrate, inmigrate-paused, finish-migrate)")
	return cmd
}

// printVerdicts prints the refusing rules first, then the ones that apply
// and allow, then (with all) the rest; it returns how many refused.
func printVerdicts(w io.Writer, vs []guards.Verdict, all bool) int {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	refused, na := 0, 0
	for _, v := range vs {
		if !v.OK {
			refused++
			fmt.Fprintf(tw, "REFUSED\t%s\t%s\n", v.Rule.Name, v.Reason)
		}
	}
	for _, v := range vs {
		if v.Applies && v.OK {
			fmt.Fprintf(tw, "ok\t%s\t%s\n", v.Rule.Name, v.Rule.Doc)
		}
	}
	for _, v := range vs {
		if !v.Applies {
			na++
			if all {
				fmt.Fprintf(tw, "n/a\t%s\t%s\n", v.Rule.Name, v.Rule.Doc)
			}
		}
	}
	tw.Flush()
	if !all && na > 0 {
		fmt.Fprintf(w, "(%d more rules do not apply to this configuration; --all lists them)\n", na)
	}
	return refused
}

// printEffects says what migctl does with each setting given.
func printEffects(w io.Writer, s *spec.Spec, set *guards.Change) {
	if len(set.Caps)+len(set.Params) == 0 {
		return
	}
	fmt.Fprintln(w, "\nsettings:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, name := range slices.Sorted(maps.Keys(set.Caps)) {
		c := s.Capability(name)
		if !set.Caps[name] {
			fmt.Fprintf(tw, "  capability %s=off\t(off: nothing to do)\n", name)
			continue
		}
		fmt.Fprintf(tw, "  capability %s=on\t%s\n", name, effectText(c.Effect, c.Why))
	}
	for _, name := range slices.Sorted(maps.Keys(set.Params)) {
		p := s.Parameter(name)
		fmt.Fprintf(tw, "  parameter %s=%s\t%s\n", name, set.Params[name], effectText(p.Effect, p.Why))
	}
	tw.Flush()
}

func effectText(effect, why string) string {
	if effect == "" {
		effect = "(no effect declared)"
	}
	if why != "" {
		return effect + ": " + why
	}
	return effect
}
