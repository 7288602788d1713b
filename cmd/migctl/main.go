// Command migctl drives live migrations whose state graph and rules are
// data (transitions.yaml): it validates and draws the spec, explains which
// rules a configuration breaks, and runs migrations.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// exitError carries a process exit status through cobra without printing
// anything more (the command printed what the user needs already).
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "migctl",
		Short:         "Live migration engine and controller whose states and rules are data",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().String("spec", "", "state graph and rules to use (default: the built-in transitions.yaml)")
	root.AddCommand(newValidate(), newDiagram(), newExplain(), newVersion(), newDemo(), newDemoDestination())
	addQMPCommands(root)
	return root
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRoot().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "migctl:", err)
		os.Exit(1)
	}
}

func newVersion() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print migctl's version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "migctl %s\n", version)
			return nil
		},
	}
}
