package main

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

func newExplain() *cobra.Command {
	var uri, side, state string
	var caps, params, features []string
	cmd := &cobra.Command{
		Use:   "explain --transport URI [--cap NAME[=on|off]]... [--param NAME=VALUE]...",
		Short: "Judge a configuration against every rule and say why it is allowed or refused",
		Long: "explain runs the transport-compatible guard's rules against a configuration and prints every rule's\n" +
			"verdict. Exit status 0 when the combination is allowed, 1 when a rule refuses it.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := loadSpec(cmd, nil)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: 1}
			}
			sd := s.Side(side)
			if sd == nil {
				return fmt.Errorf("--side %q: want incoming or outgoing", side)
			}
			if state == "" {
				state = sd.Initial
			}
			if sd.State(state) == nil {
				return fmt.Errorf("--state %q: not a state of the %s side", state, side)
			}
			in := &guards.Input{Spec: s, Side: side, State: state, Trigger: "explain", Features: host.Features()}
			cfg := guards.DefaultConfig(s)
			for _, c := range caps {
				name, val, hasVal := strings.Cut(c, "=")
				if s.Capability(name) == nil {
					return fmt.Errorf("--cap %s: unknown capability (see `migctl diagram` or docs/rules.md)", name)
				}
				switch {
				case !hasVal || val == "on" || val == "true":
					cfg.Caps[name] = true
				case val == "off" || val == "false":
					cfg.Caps[name] = false
				default:
					return fmt.Errorf("--cap %s: want on or off, got %q", name, val)
				}
			}
			for _, p := range params {
				name, val, ok := strings.Cut(p, "=")
				par := s.Parameter(name)
				if !ok || par == nil {
					return fmt.Errorf("--param %q: want NAME=VALUE with a declared parameter", p)
				}
				v, err := par.Normalize(val)
				if err != nil {
					return fmt.Errorf("--param %s: %w (expects %s)", name, err, par.Range())
				}
				cfg.Params[name] = v
			}
			for _, f := range features {
				in.Features[f] = true
			}
			in.Config, in.Previous = cfg, cfg
			if uri != "" {
				a, err := transport.Parse(uri)
				if err != nil {
					return fmt.Errorf("--transport: %w", err)
				}
				if s.Transport(a.Scheme) == nil {
					return fmt.Errorf("--transport %s: the spec declares no transport %q", uri, a.Scheme)
				}
				in.Transport = &guards.Endpoint{Transport: a.Scheme, URI: uri}
			}
			out := cmd.OutOrStdout()
			tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			refused := 0
			for _, v := range guards.Evaluate(in) {
				verdict := "n/a"
				switch {
				case v.Applies && v.OK:
					verdict = "ok"
				case !v.OK:
					verdict = "REFUSED"
					refused++
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", verdict, v.Rule.Name, firstNonEmpty(v.Reason, v.Rule.Doc))
			}
			tw.Flush()
			if refused > 0 {
				fmt.Fprintf(out, "\nrefused by %d rule(s):\n", refused)
				for _, v := range guards.Evaluate(in) {
					if !v.OK {
						fmt.Fprintf(out, "  %s: %s\n", v.Rule.Name, v.Reason)
					}
				}
				return &exitError{code: 1}
			}
			fmt.Fprintln(out, "\nallowed")
			return nil
		},
	}
	cmd.Flags().StringVar(&uri, "transport", "", "migration URI (tcp:HOST:PORT, unix:PATH, fd:N, file:PATH, exec:CMD, rdma:HOST:PORT)")
	cmd.Flags().StringArrayVar(&caps, "cap", nil, "capability to set, NAME or NAME=on|off (repeatable)")
	cmd.Flags().StringArrayVar(&params, "param", nil, "parameter to set, NAME=VALUE (repeatable)")
	cmd.Flags().StringArrayVar(&features, "feature", nil, "host feature to assume present besides the ones this host has, e.g. kvm-dirty-ring (repeatable)")
	cmd.Flags().StringVar(&side, "side", spec.Outgoing, "side to judge: incoming or outgoing")
	cmd.Flags().StringVar(&state, "state", "", "state to judge in (default: the side's initial state)")
	return cmd
}

func firstNonEmpty(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
