package transport

import (
	"errors"
	"fmt"
	"net"
	"strings"
)

// ErrUnsupported is returned (wrapped) by Dial and Listen for an address this
// build cannot open: vsock:, and rdma: when package rdma is not linked. It
// wraps errors.ErrUnsupported, so either sentinel matches with errors.Is.
var ErrUnsupported = fmt.Errorf("transport: %w", errors.ErrUnsupported)

// ErrSingleChannel is returned (wrapped) by Accept on a listener whose
// transport carries exactly one channel (fd:, exec:) once that channel has
// been handed out. Multi-channel features (multifd, postcopy-preempt) need a
// socket transport (tcp:, unix:).
var ErrSingleChannel = errors.New("transport carries a single channel and it was already accepted")

// OpError reports a failed Dial, Listen or Accept and names the migration
// address involved. Err is the cause; errors.Is sees through it, so
// errors.Is(err, syscall.ECONNREFUSED) works on a refused tcp: dial.
type OpError struct {
	Op   string // "dial", "listen" or "accept"
	Addr Addr   // the migration address
	Err  error  // the cause
}

// Error formats as "dial tcp:127.0.0.1:4446: connect: connection refused".
// When the cause is a *net.OpError, whose own text repeats the address in
// Go's form, only its reason is printed.
func (e *OpError) Error() string {
	cause := e.Err
	var nop *net.OpError
	if errors.As(cause, &nop) && nop.Err != nil {
		cause = nop.Err
	}
	return e.Op + " " + e.Addr.String() + ": " + cause.Error()
}

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

// CommandError reports that the command behind an exec: channel failed: it
// exited with a non-zero status, was killed by a signal, or could not be
// waited for. Output holds the last lines it wrote to stderr (for an outgoing
// channel also stdout, which is where a command's complaints sometimes go).
type CommandError struct {
	Args     []string // the argv that was run
	ExitCode int      // the exit status, or -1 if the command was killed by a signal
	State    string   // the process state as Go prints it: "exit status 3", "signal: killed"
	Output   []string // the last lines of the command's error output, oldest first
	Err      error    // the underlying error (*exec.ExitError, or an I/O error)
}

// Error formats as `exec "cat > /x": exit status 1; stderr: cat: /x: Permission denied`.
func (e *CommandError) Error() string {
	var b strings.Builder
	b.WriteString("exec ")
	b.WriteString(describeArgs(e.Args))
	b.WriteString(": ")
	if e.State != "" {
		b.WriteString(e.State)
	} else {
		b.WriteString(e.Err.Error())
	}
	if len(e.Output) > 0 {
		b.WriteString("; stderr: ")
		b.WriteString(strings.Join(e.Output, " | "))
	}
	return b.String()
}

// Unwrap returns the underlying error.
func (e *CommandError) Unwrap() error { return e.Err }

// describeArgs prints an argv the way a user wrote it: the command line for
// the /bin/sh -c form, the shell-quoted argv otherwise.
func describeArgs(args []string) string {
	if cmd, ok := shellCommand(args); ok {
		return fmt.Sprintf("%q", cmd)
	}
	return fmt.Sprintf("%q", shellQuote(args))
}
