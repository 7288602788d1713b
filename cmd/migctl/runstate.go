package main

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/qmp"
)

// runStateCmds are the client commands that act on the guest's run state
// and on a paused migration: stop, cont and migrate-continue, QEMU's QMP
// commands of the same names.
func runStateCmds() []*cobra.Command {
	stop := qmpClientCmd("stop", "Pause the guest (QMP stop)",
		"stop pauses a serve's guest, as QEMU's stop does. On a destination still waiting for its migration it\n"+
			"means: stay paused when the guest arrives (run it later with `migctl cont`). Harmless when paused.\n"+
			"It prints the guest's run state afterwards.",
		cobra.NoArgs,
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, _ []string) error {
			if _, err := cl.Execute(ctx, "stop", nil); err != nil {
				return err
			}
			return printRunState(cmd, ctx, cl)
		})
	cont := qmpClientCmd("cont", "Resume the guest (QMP cont)",
		"cont runs a serve's guest again, as QEMU's cont does: a guest paused by stop, a source whose guest\n"+
			"migrated away (postmigrate: after a save to file:, cont is how the source runs on), or a destination\n"+
			"told to stay paused. Refused while the source is stopped for a switchover. It prints the guest's run\n"+
			"state afterwards.",
		cobra.NoArgs,
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, _ []string) error {
			if _, err := cl.Execute(ctx, "cont", nil); err != nil {
				return err
			}
			return printRunState(cmd, ctx, cl)
		})
	cont.Aliases = []string{"c"}
	migrateContinue := qmpClientCmd("migrate-continue [STATE]", "Continue a migration paused in STATE, default pre-switchover (QMP migrate-continue)",
		"migrate-continue releases a source paused in pre-switchover (capability pause-before-switchover): it\n"+
			"saves the devices and switches over. STATE must be the state it is paused in, as in QEMU.",
		cobra.MaximumNArgs(1),
		func(cmd *cobra.Command, ctx context.Context, cl *qmp.Client, args []string) error {
			state := "pre-switchover"
			if len(args) > 0 {
				state = args[0]
			}
			if _, err := cl.Execute(ctx, "migrate-continue", map[string]any{"state": state}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "continued from %s\n", state)
			return nil
		})
	return []*cobra.Command{stop, cont, migrateContinue}
}

// printRunState prints query-status as "guest STATUS (running|paused)".
func printRunState(cmd *cobra.Command, ctx context.Context, cl *qmp.Client) error {
	raw, err := cl.Execute(ctx, "query-status", nil)
	if err != nil {
		return err
	}
	var rs qmp.RunState
	if err := json.Unmarshal(raw, &rs); err != nil {
		return fmt.Errorf("query-status: %w", err)
	}
	word := "paused"
	if rs.Running {
		word = "running"
	}
	fmt.Fprintf(cmd.OutOrStdout(), "guest %s (%s)\n", rs.Status, word)
	return nil
}
