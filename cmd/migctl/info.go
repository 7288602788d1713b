package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	yaml "go.yaml.in/yaml/v3"

	"github.com/migctl/migctl/qmp"
)

// infoReport is what `migctl info` shows, gathered from a serve's QMP
// replies: query-status, query-migctl-machine and x-migctl-query-settings.
type infoReport struct {
	// Guest is the guest's run state (query-status).
	Guest qmp.RunState `json:"guest"`
	// Machine is each side's state machine (query-migctl-machine).
	Machine qmp.MachineInfo `json:"machine"`
	// Capabilities and Parameters with their values, what migctl does
	// with them and whether each may change now (x-migctl-query-settings).
	Capabilities []qmp.CapabilityInfo `json:"capabilities"`
	Parameters   []qmp.ParameterInfo  `json:"parameters"`
}

func qmpInfoCmd() *cobra.Command {
	var format string
	cmd := qmpClientCmd("info [-o table|json|yaml]", "Show the guest, both machines' states, capabilities and parameters",
		"info shows, from a migctl serve: the guest's run state; each side's machine state with QEMU's status\n"+
			"for it and the triggers it permits; every capability (on or off, what migctl does with it, and\n"+
			"whether it can change now: capabilities freeze while a migration runs and on a destination once its\n"+
			"source connected) and every parameter (value, unit, live or not, whether it can change now). -o json\n"+
			"and -o yaml print the same as data. QEMU's HMP equivalents: info status, info migrate_capabilities,\n"+
			"info migrate_parameters (`migctl qmp '{\"execute\":\"human-monitor-command\",…}'` or qmp-shell -H).",
		cobra.NoArgs,
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, _ []string) error {
			switch format {
			case "table", "json", "yaml":
			default:
				return usagef("-o %q: want table, json or yaml", format)
			}
			rep, err := gatherInfo(ctx, cl)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			switch format {
			case "json":
				b, _ := json.MarshalIndent(rep, "", "  ")
				fmt.Fprintln(out, string(b))
			case "yaml":
				// Through JSON, so YAML has the same member names.
				var v any
				b, _ := json.Marshal(rep)
				if err := json.Unmarshal(b, &v); err != nil {
					return err
				}
				y, err := yaml.Marshal(v)
				if err != nil {
					return err
				}
				out.Write(y)
			default:
				printInfo(out, rep)
			}
			return nil
		})
	cmd.Flags().StringVarP(&format, "output", "o", "table", "output `FORMAT`: table, json or yaml")
	return cmd
}

func gatherInfo(ctx context.Context, cl *qmp.Client) (infoReport, error) {
	var rep infoReport
	var settings qmp.SettingsInfo
	for _, q := range []struct {
		cmd  string
		args any // nil: no arguments member
		into any
	}{
		{"query-status", nil, &rep.Guest},
		{"query-migctl-machine", map[string]any{"history": 0}, &rep.Machine},
		{"x-migctl-query-settings", nil, &settings},
	} {
		raw, err := cl.Execute(ctx, q.cmd, q.args)
		if err != nil {
			return rep, err
		}
		if err := json.Unmarshal(raw, q.into); err != nil {
			return rep, fmt.Errorf("%s: %w", q.cmd, err)
		}
	}
	rep.Capabilities, rep.Parameters = settings.Capabilities, settings.Parameters
	return rep, nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func printInfo(w io.Writer, rep infoReport) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	running := "paused"
	if rep.Guest.Running {
		running = "running"
	}
	fmt.Fprintf(tw, "guest\t%s (%s)\n\n", rep.Guest.Status, running)
	fmt.Fprintln(tw, "SIDE\tSTATE\tQEMU STATUS\tCONFIG\tPERMITTED TRIGGERS")
	for _, sd := range []struct {
		name string
		si   qmp.SideInfo
	}{{"incoming", rep.Machine.Incoming}, {"outgoing", rep.Machine.Outgoing}} {
		cfg := "frozen"
		if sd.si.ConfigMutable {
			cfg = "mutable"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", sd.name, sd.si.State, sd.si.Status, cfg, strings.Join(sd.si.Permitted, ", "))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "CAPABILITY\tSTATE\tCAN CHANGE NOW\tIN MIGCTL")
	for _, c := range rep.Capabilities {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, onOffText(c.State), yesNo(c.Mutable), effectText(c.Effect, c.Why))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "PARAMETER\tVALUE\tUNIT\tLIVE\tCAN CHANGE NOW\tIN MIGCTL")
	for _, p := range rep.Parameters {
		v := p.Value
		if v == "" {
			v = "''"
		}
		unit := p.Unit
		if unit == "" {
			unit = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, v, unit, yesNo(p.Live), yesNo(p.Mutable), effectText(p.Effect, p.Why))
	}
	tw.Flush()
}

func onOffText(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
