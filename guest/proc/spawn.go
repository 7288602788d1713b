package proc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// EnvVar is the environment variable that makes a process started by
// [Spawn] run the guest process: [Main] looks for it. Its value is the JSON
// of the [Config]; the listening control socket is descriptor 3.
const EnvVar = "MIGCTL_GUEST_PROCESS"

// Exit statuses of a guest process.
const (
	ExitOK            = 0 // a client sent QUIT, or SIGTERM/SIGINT
	ExitError         = 1 // the guest could not be built or served
	ExitAttachTimeout = 3 // no client attached within Config.AttachTimeout
)

// Main is the hidden entry point of the guest process. In a process started
// by [Spawn] (EnvVar set) it runs the guest process and exits with one of
// the Exit* statuses; in any other process it returns at once and does
// nothing.
//
// Call it first thing in main of the binary that spawns guest processes
// (Spawn re-executes os.Executable()), before flags are parsed:
//
//	func main() {
//		proc.Main() // the guest process of `--guest ...,postcopy=on` never returns from here
//		...
//	}
//
// and in TestMain of every test package whose tests spawn one (go test
// re-executes the test binary):
//
//	func TestMain(m *testing.M) {
//		proc.Main()
//		goleak.VerifyTestMain(m)
//	}
func Main() {
	spec, ok := os.LookupEnv(EnvVar)
	if !ok {
		return
	}
	os.Unsetenv(EnvVar)
	os.Exit(childMain(spec))
}

func childMain(spec string) int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "guest process %d: %v\n", os.Getpid(), err)
		return ExitError
	}
	if len(spec) > maxJSON {
		return fail(fmt.Errorf("%s is %d bytes", EnvVar, len(spec)))
	}
	var cfg Config
	if err := decodeJSON([]byte(spec), &cfg); err != nil {
		return fail(fmt.Errorf("%s: %w", EnvVar, err))
	}
	f := os.NewFile(3, "guest-process-listener")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return fail(fmt.Errorf("descriptor 3 is not the listening socket: %w", err))
	}
	ul, ok := ln.(*net.UnixListener)
	if !ok {
		ln.Close()
		return fail(fmt.Errorf("descriptor 3 is a %T, not a unix socket", ln))
	}
	ul.SetUnlinkOnClose(true) // the socket file goes with the guest process
	// The guest process inherits migctl's stderr, often a pipe its reader
	// closes when migctl dies: a log line must then fail, not kill the
	// guest (a Go program dies of SIGPIPE on fd 2 unless it is ignored).
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = Serve(ctx, cfg, ul, os.Stderr)
	switch {
	case err == nil:
		return ExitOK
	case errors.Is(err, ErrAttachTimeout):
		return ExitAttachTimeout
	}
	return fail(err)
}

// SpawnOptions configure [Spawn].
type SpawnOptions struct {
	// Config of the guest process.
	Config Config
	// Socket is the path of the control socket; "" creates one in a new
	// temporary directory (removed once the process has exited and Wait
	// has seen it).
	Socket string
	// Path of the executable; "" means os.Executable(). It must call
	// [Main] first thing.
	Path string
	// Args after the program name. nil means none, except for a test binary
	// (name ending in ".test"), which gets -test.run=^$ so that a TestMain
	// without the Main hook runs no test (the attach then fails, saying so).
	Args []string
	// Stderr receives the guest process's log; nil means os.Stderr. It is
	// an *os.File so that no goroutine of this process copies it (the guest
	// process may outlive this one).
	Stderr *os.File
}

// Process is a spawned guest process.
type Process struct {
	// Socket is the control socket's path: Attach to it (again, after a
	// client died).
	Socket string
	// PID of the guest process.
	PID int

	cmd  *exec.Cmd
	dir  string
	done chan struct{}
	err  error // the exit, once done is closed
}

// Spawn starts a guest process: it binds the control socket itself (so
// that it exists and accepts connections before the child runs), then
// re-executes opts.Path with EnvVar set and the listening socket as
// descriptor 3, in a process group of its own (a ^C meant for migctl does
// not reach the guest). It does not wait for the guest to be built: Attach
// does, bounded by its context.
func Spawn(opts SpawnOptions) (*Process, error) {
	cfg := opts.Config.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	spec, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	path := opts.Path
	if path == "" {
		if path, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("guest process: finding this executable: %w", err)
		}
	}
	args := opts.Args
	if args == nil && strings.HasSuffix(path, ".test") {
		args = []string{"-test.run=^$"}
	}
	p := &Process{Socket: opts.Socket, done: make(chan struct{})}
	if p.Socket == "" {
		if p.dir, err = os.MkdirTemp("", "migctl-guest-"); err != nil {
			return nil, err
		}
		p.Socket = filepath.Join(p.dir, "guest.sock")
	}
	cleanup := func() {
		if p.dir != "" {
			os.RemoveAll(p.dir)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: p.Socket, Net: "unix"})
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("guest process: listen on %s: %w", p.Socket, err)
	}
	ln.SetUnlinkOnClose(false) // the child owns the socket file from now on
	lf, err := ln.File()
	ln.Close()
	if err != nil {
		os.Remove(p.Socket)
		cleanup()
		return nil, err
	}
	defer lf.Close()
	stderr := opts.Stderr
	if stderr == nil {
		stderr = os.Stderr
	}
	cmd := exec.Command(path, args...)
	cmd.Env = append(childEnv(os.Environ()), EnvVar+"="+string(spec))
	cmd.ExtraFiles = []*os.File{lf}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		os.Remove(p.Socket)
		cleanup()
		return nil, fmt.Errorf("guest process: start %s: %w", path, err)
	}
	p.cmd, p.PID = cmd, cmd.Process.Pid
	go func() {
		p.err = cmd.Wait()
		os.Remove(p.Socket) // in case the child died before it could
		cleanup()
		close(p.done)
	}()
	return p, nil
}

// childEnv drops GODEBUG=asyncpreemptoff=1 from env: the guest process's
// garbage collector must be able to preempt a vCPU goroutine blocked on a
// missing page, or with migctl dead the whole guest process (its control
// socket included) would stop at the next collection, and nobody could
// re-attach.
func childEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok {
			var keep []string
			for _, s := range strings.Split(v, ",") {
				if !strings.HasPrefix(s, "asyncpreemptoff=") {
					keep = append(keep, s)
				}
			}
			kv = "GODEBUG=" + strings.Join(keep, ",")
		}
		if strings.HasPrefix(kv, EnvVar+"=") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// Exited is closed when the guest process has exited.
func (p *Process) Exited() <-chan struct{} { return p.done }

// Wait waits for the guest process to exit (bounded by ctx) and returns its
// exit error (nil for status 0).
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Signal sends sig to the guest process (if it still runs).
func (p *Process) Signal(sig os.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	err := p.cmd.Process.Signal(sig)
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

// Kill sends SIGKILL.
func (p *Process) Kill() error { return p.Signal(os.Kill) }

// Start spawns a guest process and attaches to it. If the process exits
// before the attach completes, the error says how it exited.
func Start(ctx context.Context, opts SpawnOptions, aopts AttachOptions) (*Process, *Client, error) {
	p, err := Spawn(opts)
	if err != nil {
		return nil, nil, err
	}
	actx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-p.done:
			cancel()
		case <-actx.Done():
		}
	}()
	c, err := Attach(actx, p.Socket, aopts)
	cancel()
	if err != nil {
		// A guest process that dies makes the attach fail (connection
		// reset) a moment before its exit is reaped: give it that moment.
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-p.done:
			err = fmt.Errorf("%w; the guest process exited: %v (does its main, or TestMain, call proc.Main first?)", err, p.err)
		case <-t.C:
			p.Kill()
			<-p.done
		}
		return nil, nil, err
	}
	return p, c, nil
}
