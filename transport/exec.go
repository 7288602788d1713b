package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Output kept from an exec: command for error messages.
const (
	tailBytes = 4096 // bytes of output kept
	tailLines = 5    // lines quoted in a CommandError
)

// waitDelay bounds how long Wait keeps copying the command's output after it
// exited, for a background child that inherited the pipe.
const waitDelay = time.Second

// stdinClosedGrace is how long an outgoing command that closed its stdin
// before the stream ended may run on before it is killed: long enough for a
// command that failed (and closed its stdin by exiting) to be reaped with
// its exit status and output, short enough that a command that closed its
// stdin and kept running cannot hold a migration.
const stdinClosedGrace = time.Second

// tailBuffer keeps the last tailBytes bytes written to it. exec's copying
// goroutine writes; CommandError construction reads. mu guards buf.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(p) >= tailBytes {
		t.buf = append(t.buf[:0], p[len(p)-tailBytes:]...)
		return len(p), nil
	}
	if over := len(t.buf) + len(p) - tailBytes; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	t.buf = append(t.buf, p...)
	return len(p), nil
}

// lines returns the last n non-empty lines, oldest first.
func (t *tailBuffer) lines(n int) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for _, l := range bytes.Split(t.buf, []byte("\n")) {
		if s := strings.TrimSpace(string(l)); s != "" {
			out = append(out, s)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return out
}

// process is a running exec: command. The waiter goroutine started by
// startProcess is the only writer of err; it closes done after writing, and
// readers read err only after done is closed.
type process struct {
	cmd  *exec.Cmd
	args []string
	out  *tailBuffer
	done chan struct{}
	err  error

	killMu sync.Mutex // serialises kill, guards killed
	killed string     // why we killed the command, "" if we did not
}

// startProcess starts args in its own process group with stdin and stdout as
// given (nil: /dev/null for stdin, the captured output for stdout). Its
// stderr, and its stdout when not given, go to a tail buffer.
func startProcess(args []string, stdin, stdout *os.File) (*process, error) {
	p := &process{args: args, out: &tailBuffer{}, done: make(chan struct{})}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = waitDelay
	if stdin != nil {
		cmd.Stdin = stdin
	}
	cmd.Stderr = p.out
	if stdout != nil {
		cmd.Stdout = stdout
	} else {
		cmd.Stdout = p.out
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p.cmd = cmd
	go func() {
		err := cmd.Wait()
		if errors.Is(err, exec.ErrWaitDelay) {
			// The command succeeded; a background child kept its output
			// pipe open. Not a failure of the stream.
			err = nil
		}
		p.err = err
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the command has been waited for.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL to the command's process group, recording why, unless it
// already exited.
func (p *process) kill(why string) {
	p.killMu.Lock()
	defer p.killMu.Unlock()
	if p.exited() {
		return
	}
	// The leader not yet reaped means its group still exists, so the pgid
	// below cannot have been reused. Process.Signal is safe alongside Wait.
	if err := p.cmd.Process.Signal(syscall.Signal(0)); errors.Is(err, os.ErrProcessDone) {
		return
	}
	if p.killed == "" {
		p.killed = why
	}
	// A negative pid signals the whole group: /bin/sh and what it started.
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
}

// stop kills the command's process group at once unless it already exited,
// waits for it to be reaped, and returns its error.
func (p *process) stop(why string) error {
	p.kill(why)
	<-p.done
	return p.result()
}

// result converts the command's exit into a *CommandError, or nil if it
// exited with status 0. Call only after done is closed.
func (p *process) result() error {
	if p.err == nil {
		return nil
	}
	ce := &CommandError{Args: p.args, ExitCode: -1, Output: p.out.lines(tailLines), Err: p.err}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		ce.ExitCode = ee.ExitCode()
		ce.State = ee.ProcessState.String()
	}
	p.killMu.Lock()
	if p.killed != "" {
		ce.State += " (" + p.killed + ")"
	}
	p.killMu.Unlock()
	return ce
}

// execConn is an exec: channel: the pipe to the command's stdin (outgoing)
// or from its stdout (incoming), and the command itself, which the execConn
// owns. closing is closed by Close so that a Read, Write or Commit waiting
// for the command's exit status gives up.
type execConn struct {
	f        *os.File
	p        *process
	addr     Addr
	outgoing bool

	closing   chan struct{}
	closeOnce sync.Once
	closeErr  error
	cwOnce    sync.Once
	cwErr     error
	committed atomic.Bool // Commit saw the command exit 0: Close does nothing
}

// dialExec starts the command with its stdin connected to the returned Conn.
func dialExec(a Addr) (*execConn, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	p, err := startProcess(a.Args, pr, nil)
	pr.Close() // the child has its copy
	if err != nil {
		pw.Close()
		return nil, err
	}
	return &execConn{f: pw, p: p, addr: a, outgoing: true, closing: make(chan struct{})}, nil
}

// listenExec starts the command with its stdout connected to the returned
// Conn.
func listenExec(a Addr) (*execConn, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	p, err := startProcess(a.Args, nil, pw)
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, err
	}
	return &execConn{f: pr, p: p, addr: a, closing: make(chan struct{})}, nil
}

// awaitExit waits for the command to exit after its pipe reported EOF or a
// broken pipe, and returns the error the caller should see: the command's
// failure, fallback if it succeeded, or net.ErrClosed if the Conn was closed
// meanwhile. With grace > 0, a command still running after grace is killed
// (its error then says why: killed).
func (c *execConn) awaitExit(grace time.Duration, killed string, fallback error) error {
	var expired <-chan time.Time
	if grace > 0 {
		t := time.NewTimer(grace)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-c.p.done:
	case <-c.closing:
		return fmt.Errorf("%s: %w", c.addr, net.ErrClosed)
	case <-expired:
		c.p.kill(killed)
		<-c.p.done
	}
	if err := c.p.result(); err != nil {
		return err
	}
	return fallback
}

// Read reads the command's stdout. At EOF it waits for the command to exit:
// a command that failed yields its *CommandError instead of io.EOF, so a
// truncated stream is never mistaken for a complete one. A deadline does not
// cut that wait short; Close does.
func (c *execConn) Read(b []byte) (int, error) {
	if c.outgoing {
		return 0, fmt.Errorf("read %s: the channel is write-only", c.addr)
	}
	n, err := c.f.Read(b)
	if err == io.EOF {
		return n, c.awaitExit(0, "", io.EOF)
	}
	return n, err
}

// Write writes to the command's stdin. If the command closed its stdin
// (EPIPE), Write waits for it to exit and returns its *CommandError; a
// command still running a second later is killed, so that it cannot hold the
// migration.
func (c *execConn) Write(b []byte) (int, error) {
	if !c.outgoing {
		return 0, fmt.Errorf("write %s: the channel is read-only", c.addr)
	}
	n, err := c.f.Write(b)
	return n, c.writeErr(err)
}

// ReadFrom copies into the command's stdin, letting the kernel splice from a
// socket or file into the pipe.
func (c *execConn) ReadFrom(r io.Reader) (int64, error) {
	if !c.outgoing {
		return 0, fmt.Errorf("write %s: the channel is read-only", c.addr)
	}
	n, err := copyRaw(c.f, r)
	return n, c.writeErr(err)
}

func (c *execConn) writeErr(err error) error {
	if err != nil && errors.Is(err, syscall.EPIPE) {
		return c.awaitExit(stdinClosedGrace,
			fmt.Sprintf("killed: it closed its standard input before the stream ended and was still running %v later", stdinClosedGrace),
			fmt.Errorf("%s: the command closed its standard input before the stream ended: %w", c.addr, err))
	}
	return err
}

// rawReader is false: reading the pipe directly would skip the exit status.
func (c *execConn) rawReader() (io.Reader, bool) { return nil, false }

// rawWriter exposes the stdin pipe; ReadFrom maps EPIPE afterwards.
func (c *execConn) rawWriter() (io.Writer, bool) { return c.f, c.outgoing }

// CloseWrite closes the command's stdin (outgoing side) so it sees EOF; on
// the incoming side it does nothing.
func (c *execConn) CloseWrite() error {
	if !c.outgoing {
		return nil
	}
	c.cwOnce.Do(func() { c.cwErr = c.f.Close() })
	return c.cwErr
}

// Commit closes the command's stdin and waits for it to exit: exit status 0
// is the commit point of an exec: migration. A command still running when
// ctx ends is killed, and the error says so. See Committer.
func (c *execConn) Commit(ctx context.Context) error {
	if !c.outgoing {
		return &CommitError{Addr: c.addr, Op: "commit", Err: errors.New("an incoming exec: channel has nothing to commit; close it")}
	}
	if ctx.Err() != nil {
		return &CommitError{Addr: c.addr, Op: "commit", Err: context.Cause(ctx)}
	}
	if err := ignoreClosed(c.CloseWrite()); err != nil {
		return &CommitError{Addr: c.addr, Op: "close the command's stdin", Err: err}
	}
	start := time.Now()
	select {
	case <-c.p.done:
	case <-c.closing:
		return &CommitError{Addr: c.addr, Op: "wait for the command", Err: fmt.Errorf("the channel was closed (the migration was aborted): %w", net.ErrClosed)}
	case <-ctx.Done():
		cause := context.Cause(ctx)
		err := c.p.stop(fmt.Sprintf("killed: still running %v after its stdin was closed", time.Since(start).Round(time.Millisecond)))
		if err == nil { // it exited 0 just before the kill
			break
		}
		return &CommitError{Addr: c.addr, Op: "wait for the command", Err: fmt.Errorf("%w; the wait for its exit ended: %w", err, cause)}
	}
	if err := c.p.result(); err != nil {
		return &CommitError{Addr: c.addr, Op: "wait for the command", Err: err}
	}
	c.committed.Store(true)
	return nil
}

// Close closes the pipe and kills the command's process group at once,
// unless it already exited; on the outgoing side after a successful Commit
// it does nothing. It returns the command's *CommandError if the command
// failed or was killed.
func (c *execConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.closing)
		var ferr error
		if c.outgoing {
			ferr = c.CloseWrite()
		} else {
			ferr = c.f.Close()
		}
		err := c.p.stop(fmt.Sprintf("killed: its %s was closed before it exited", c.pipeName()))
		if c.committed.Load() {
			return
		}
		c.closeErr = errors.Join(err, ignoreClosed(ferr))
	})
	return c.closeErr
}

// abort kills the command at once and releases everything; for listeners
// closed before their channel was accepted.
func (c *execConn) abort() {
	c.closeOnce.Do(func() {
		close(c.closing)
		c.f.Close()
		c.p.stop("killed: listener closed before the channel was accepted")
	})
}

func (c *execConn) pipeName() string {
	if c.outgoing {
		return "stdin"
	}
	return "stdout"
}

func (c *execConn) SetDeadline(t time.Time) error { return c.f.SetDeadline(t) }
func (c *execConn) ReturnPath() bool              { return false }
func (c *execConn) Addr() Addr                    { return c.addr }
func (c *execConn) Unwrap() any                   { return c.f }

// ignoreClosed drops os.ErrClosed, the result of closing a pipe CloseWrite
// already closed.
func ignoreClosed(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return nil
	}
	return err
}
