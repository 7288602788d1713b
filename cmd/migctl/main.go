// Command migctl drives live migrations whose state graph and rules are
// data (transitions.yaml): it validates and draws the spec, explains which
// rules a configuration breaks, and runs migrations.
//
// Exit status (README "Exit status"): 0 success; 1 refused or failed (the
// reason is printed); 2 usage error (unknown command or flag, bad flag
// value); 130 interrupted by SIGINT or SIGTERM. serve and events run until
// a signal by design and exit 0 on one.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/migctl/migctl/guest/proc"
)

// Exit statuses, as documented in the README.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitInterrupted = 130 // 128 + SIGINT, what shells report for Ctrl-C
)

// exitError carries a process exit status through cobra without printing
// anything more (the command printed what the user needs already).
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// usageError is a mistake in how the command was called: an unknown
// command or flag, a missing argument or a flag value out of range. It
// exits with status 2.
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

// usagef returns a usageError with a formatted message.
func usagef(format string, args ...any) error {
	return &usageError{err: fmt.Errorf(format, args...)}
}

// errInterrupted is returned by a command that stopped because of SIGINT
// or SIGTERM; it exits with status 130.
var errInterrupted = errors.New("interrupted")

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "migctl",
		Short:         "Live migration engine and controller whose states and rules are data",
		Version:       versionLine(),
		SilenceUsage:  true,
		SilenceErrors: true,
		// With Args set, cobra no longer fails an unknown subcommand by
		// itself: rootArgs does, as a usage error.
		Args: rootArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.PersistentFlags().String("spec", "", "state graph and rules to use: a transitions.yaml `FILE` (default: the built-in one)")
	root.PersistentFlags().BoolP("quiet", "q", false, "print no progress (the result and errors still print)")
	root.AddCommand(newValidate(), newDiagram(), newExplain(), newVersion(), newDemo(), newDemoDestination(), newMan())
	addQMPCommands(root)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err: err} })
	wrapArgs(root)
	return root
}

// rootArgs refuses an unknown subcommand, suggesting near names.
func rootArgs(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
	if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
		msg += fmt.Sprintf("; did you mean %q?", s[0])
	}
	return &usageError{err: errors.New(msg)}
}

// wrapArgs makes every command's positional-argument errors usage errors.
func wrapArgs(cmd *cobra.Command) {
	if check := cmd.Args; check != nil {
		cmd.Args = func(c *cobra.Command, args []string) error {
			if err := check(c, args); err != nil {
				var ue *usageError
				if errors.As(err, &ue) {
					return err
				}
				return &usageError{err: err}
			}
			return nil
		}
	}
	for _, sub := range cmd.Commands() {
		wrapArgs(sub)
	}
}

func main() {
	// The guest process of `serve --guest …,postcopy=on` is this binary
	// re-executed: it never returns from here.
	proc.Main()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal the command winds down; a second one
		// ends the process the default way.
		<-ctx.Done()
		stop()
	}()
	code := execute(ctx, newRoot(), os.Args[1:], os.Stderr)
	stop()
	os.Exit(code)
}

// execute runs the command line and returns the process's exit status.
func execute(ctx context.Context, root *cobra.Command, args []string, stderr io.Writer) int {
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	var ee *exitError
	var ue *usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errInterrupted) || ctx.Err() != nil:
		fmt.Fprintln(stderr, "migctl: interrupted")
		return exitInterrupted
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "migctl:", err)
		c, _, ferr := root.Find(args)
		if ferr != nil || c == nil {
			c = root
		}
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", c.CommandPath())
		return exitUsage
	}
	fmt.Fprintln(stderr, "migctl:", err)
	return exitFailed
}

// quiet reports whether --quiet was given.
func quiet(cmd *cobra.Command) bool {
	q, _ := cmd.Flags().GetBool("quiet")
	return q
}
