package reliability

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/qmp"
	"github.com/migctl/migctl/spec"
)

// guestDesc is every process's guest: small, so a cell is quick, and
// dirtied while it runs, so a guest running twice would be caught writing.
const guestDesc = "size=4M,dirty-rate=8M,seed=7,zero=0.1"

// Bounds of the waits of a cell. None is a sleep: each is the most a
// wait may take before the cell fails.
const (
	startBound = 60 * time.Second // a serve process (race-built) starts and answers QMP
	holdBound  = 60 * time.Second // a hold point is reached
	cmdBound   = 30 * time.Second // one QMP command answers
)

// syncBuffer is a bytes.Buffer for a process's output, written by the
// copying goroutines and read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is one `migctl serve` process of a cell.
type proc struct {
	t       testing.TB
	role    string // source, destination, new destination
	qmpPath string
	runLog  string
	cmd     *exec.Cmd
	out     *syncBuffer
	reaped  chan struct{} // closed once the process was waited for
	ctl     *qmp.Client   // queries, releases; its events feed moves and holds
	blk     *qmp.Client   // commands a hold may block (migrate, migrate-incoming, migrate_cancel, migrate-continue)
	evDone  chan struct{} // closed when the event reader ended

	// mu guards the fields below; notify is closed and replaced on every
	// change.
	mu       sync.Mutex
	moves    []qmp.MachineEvent
	holds    []qmp.HoldEvent
	state    map[string]string // by side, from the events
	notify   chan struct{}
	killedAt int64 // CLOCK_MONOTONIC ns when a SIGKILL was reaped; 0 otherwise
	stopped  bool  // SIGSTOPped and not yet continued
}

// startProc starts a serve process in dir with the given hold points and
// connects its two QMP clients.
func startProc(t testing.TB, dir, role string, dest bool, holds []string) *proc {
	t.Helper()
	name := strings.ReplaceAll(role, " ", "-")
	p := &proc{
		t:       t,
		role:    role,
		qmpPath: filepath.Join(dir, name+".qmp"),
		runLog:  filepath.Join(dir, name+".run"),
		out:     &syncBuffer{},
		reaped:  make(chan struct{}),
		evDone:  make(chan struct{}),
		state:   map[string]string{},
		notify:  make(chan struct{}),
	}
	args := []string{"serve", "--qmp", "unix:" + p.qmpPath, "--guest", guestDesc + ",runlog=" + p.runLog, "--x-hold-timeout", "10m"}
	if dest {
		args = append(args, "--destination")
	}
	for _, h := range holds {
		args = append(args, "--x-hold", h)
	}
	p.cmd = exec.Command(binary, args...)
	// A race-built process sleeps 1 s at exit by default: every cell
	// quits three of them. Its race reports still go to its stderr
	// (teardown fails the cell on one).
	p.cmd.Env = append(os.Environ(), "GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p.cmd.Stderr = p.out
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		once := sync.OnceFunc(func() { close(ready) })
		for sc.Scan() {
			fmt.Fprintln(p.out, sc.Text())
			if strings.HasPrefix(sc.Text(), "serving QMP on") {
				once()
			}
		}
	}()
	go func() {
		_ = p.cmd.Wait()
		close(p.reaped)
	}()
	select {
	case <-ready:
	case <-p.reaped:
		t.Fatalf("%s exited at start: %s", role, p.out.String())
	case <-time.After(startBound):
		p.kill()
		t.Fatalf("%s did not serve QMP within %v: %s", role, startBound, p.out.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), cmdBound)
	defer cancel()
	if p.ctl, err = qmp.DialAddr(ctx, "unix:"+p.qmpPath); err != nil {
		p.kill()
		t.Fatal(err)
	}
	if p.blk, err = qmp.DialAddr(ctx, "unix:"+p.qmpPath); err != nil {
		p.kill()
		t.Fatal(err)
	}
	go p.readEvents()
	var mi qmp.MachineInfo
	if err := p.query("query-migctl-machine", nil, &mi); err != nil {
		p.kill()
		t.Fatal(err)
	}
	p.mu.Lock()
	p.state[spec.Incoming], p.state[spec.Outgoing] = mi.Incoming.State, mi.Outgoing.State
	p.mu.Unlock()
	return p
}

func (p *proc) readEvents() {
	defer close(p.evDone)
	for ev := range p.ctl.Events() {
		p.mu.Lock()
		switch ev.Event {
		case qmp.EventMachine:
			var m qmp.MachineEvent
			if json.Unmarshal(ev.Data, &m) == nil {
				p.moves = append(p.moves, m)
				p.state[m.Side] = m.To
			}
		case qmp.EventHold:
			var h qmp.HoldEvent
			if json.Unmarshal(ev.Data, &h) == nil {
				p.holds = append(p.holds, h)
			}
		}
		close(p.notify)
		p.notify = make(chan struct{})
		p.mu.Unlock()
	}
}

// alive reports whether the process has not been reaped.
func (p *proc) alive() bool {
	select {
	case <-p.reaped:
		return false
	default:
		return true
	}
}

// waitFor waits until cond (called with p.mu held) holds, for at most d;
// false when it did not.
func (p *proc) waitFor(d time.Duration, cond func() bool) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		p.mu.Lock()
		if cond() {
			p.mu.Unlock()
			return true
		}
		ch := p.notify
		p.mu.Unlock()
		select {
		case <-ch:
		case <-p.evDone:
			p.mu.Lock()
			ok := cond()
			p.mu.Unlock()
			return ok
		case <-timer.C:
			return false
		}
	}
}

// sideState is side's state as the events last said.
func (p *proc) sideState(side string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state[side]
}

// held reports whether a hold at side:state was announced.
func (p *proc) heldAt(side, state string) bool {
	for _, h := range p.holds {
		if h.Side == side && h.State == state {
			return true
		}
	}
	return false
}

// entered reports whether side ever moved into state (p.mu held).
func (p *proc) enteredLocked(side, state string) bool {
	for _, m := range p.moves {
		if m.Side == side && m.To == state {
			return true
		}
	}
	return false
}

// query runs a command on the control client and decodes its result.
func (p *proc) query(cmd string, args any, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), cmdBound)
	defer cancel()
	raw, err := p.ctl.Execute(ctx, cmd, args)
	if err != nil {
		return fmt.Errorf("%s %s: %w", p.role, cmd, err)
	}
	if out != nil {
		return json.Unmarshal(raw, out)
	}
	return nil
}

// async runs a command that a hold may block on the blocking client; the
// channel gets its error (nil on success) once it answers.
func (p *proc) async(bound time.Duration, cmd string, args any) <-chan error {
	ch := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		defer cancel()
		_, err := p.blk.Execute(ctx, cmd, args)
		if err != nil {
			err = fmt.Errorf("%s %s: %w", p.role, cmd, err)
		}
		ch <- err
	}()
	return ch
}

// release lets the goroutine held at side:state go on.
func (p *proc) release(side, state string) error {
	return p.query("x-migctl-release", map[string]any{"side": side, "state": state}, nil)
}

// kill sends SIGKILL and waits for the process to be reaped; killedAt is
// the monotonic time after that, when the guest certainly no longer runs.
func (p *proc) kill() {
	if !p.alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.reaped:
	case <-time.After(cmdBound):
		p.t.Errorf("%s was not reaped within %v of SIGKILL", p.role, cmdBound)
		return
	}
	p.mu.Lock()
	p.killedAt = guest.Monotonic()
	p.stopped = false
	p.mu.Unlock()
}

// stop sends SIGSTOP and returns once the process has stopped: the signal
// stops a multi-threaded process only as each thread next enters the
// kernel, and a request sent in between would still be served. The
// kernel tells the parent (waitid WSTOPPED, without reaping).
func (p *proc) stop() {
	if !p.alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGSTOP)
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	stopped := make(chan error, 1)
	go func() {
		var info unix.Siginfo
		stopped <- unix.Waitid(unix.P_PID, p.cmd.Process.Pid, &info, unix.WSTOPPED|unix.WEXITED|unix.WNOWAIT, nil)
	}()
	select {
	case err := <-stopped:
		if err != nil && p.alive() {
			p.t.Errorf("waiting for the %s to stop: %v", p.role, err)
		}
	case <-time.After(cmdBound):
		p.t.Errorf("the %s did not stop within %v of SIGSTOP", p.role, cmdBound)
	}
}

// cont sends SIGCONT.
func (p *proc) cont() {
	if p.alive() {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		p.mu.Lock()
		p.stopped = false
		p.mu.Unlock()
	}
}

// isStopped reports whether the process was stopped and not continued.
func (p *proc) isStopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopped
}

// shutdown ends the process: quit over QMP, SIGKILL if it does not exit.
// A process that quits logs its guest's stop; one that is killed has its
// open interval end at killedAt.
func (p *proc) shutdown() {
	if p.alive() {
		p.cont()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _ = p.ctl.Execute(ctx, "quit", nil)
		cancel()
		select {
		case <-p.reaped:
		case <-time.After(20 * time.Second):
			p.t.Logf("%s did not quit within 20s: killed", p.role)
			p.kill()
		}
	}
	p.ctl.Close()
	p.blk.Close()
	<-p.evDone
}

// spans reads the guest's run log; an interval still open ends at the
// kill time when the process was killed.
func (p *proc) spans() ([]guest.Span, error) {
	sp, err := guest.ReadRunLog(p.runLog)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	end := p.killedAt
	p.mu.Unlock()
	if n := len(sp); n > 0 && sp[n-1].Stop == 0 {
		if end == 0 {
			return nil, fmt.Errorf("%s's guest log has an open interval but the process was not killed", p.role)
		}
		sp[n-1].Stop = end
	}
	return sp, nil
}
