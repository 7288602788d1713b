package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// loadSpec loads the spec named by the argument, else by --spec, else the
// built-in one, and checks that it declares every state and trigger the
// Go code uses (machine.Check).
func loadSpec(cmd *cobra.Command, args []string) (*spec.Spec, error) {
	path, _ := cmd.Flags().GetString("spec")
	if len(args) > 0 {
		path = args[0]
	}
	names := guards.Default().Names()
	var (
		s   *spec.Spec
		err error
	)
	if path == "" {
		s, err = spec.Load("transitions.yaml (built in)", migctl.DefaultSpec, names)
	} else {
		s, err = spec.LoadFile(path, names)
	}
	if err != nil {
		return nil, err
	}
	if err := machine.Check(s); err != nil {
		return nil, err
	}
	return s, nil
}

func newValidate() *cobra.Command {
	return &cobra.Command{
		Use:   "validate [FILE]",
		Short: "Check a spec: YAML, field rules, cross references and graph lint",
		Long: "validate loads a transitions.yaml (default: the built-in one) and reports every problem at once,\n" +
			"one per line as file:line:col: message. Exit status 0 when valid, 1 otherwise.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := loadSpec(cmd, args)
			if err != nil {
				printSpecErrors(cmd.ErrOrStderr(), err)
				return &exitError{code: 1}
			}
			in, out, gs := len(s.Incoming.States), len(s.Outgoing.States), len(s.Guest.States)
			fmt.Fprintf(cmd.OutOrStdout(), "%s: valid (%d capabilities, %d parameters, %d transports, %d rules; %d incoming, %d outgoing and %d guest states)\n",
				s.File, len(s.Capabilities), len(s.Parameters), len(s.Transports), len(s.Rules()), in, out, gs)
			return nil
		},
	}
}

func printSpecErrors(w io.Writer, err error) {
	var errs *spec.Errors
	if errors.As(err, &errs) {
		for _, e := range *errs {
			fmt.Fprintln(w, e.Error())
		}
		return
	}
	fmt.Fprintln(w, err)
}
