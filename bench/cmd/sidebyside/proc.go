package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/migctl/migctl/qmp"
)

// proc is a child process the driver started that answers QMP on a unix
// socket: a QEMU or a `migctl serve`. It is stopped only through its own
// PID (QMP quit, then SIGKILL of that PID).
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{} // closed when the process has been waited for
	waitErr error         // set before exited is closed

	qmp *qmp.Client
	// Ready is the time from starting the process to its first answer to
	// query-status (QEMU answers only after machine init, which includes
	// -mem-prealloc; migctl serve listens only after its guest is
	// prepared, which includes prealloc=on).
	Ready  time.Duration
	events *eventLog
}

// readyPoll is how often startProc tries the QMP socket while the process
// starts (a poll, bounded by readyTimeout: the socket appears only when the
// process has prepared its guest).
const readyPoll = 10 * time.Millisecond

// startProc starts argv with its output in logPath, then connects to its
// QMP socket sock and waits for query-status to answer, at most
// readyTimeout.
func startProc(ctx context.Context, name string, argv []string, sock, logPath string, readyTimeout time.Duration) (*proc, error) {
	_ = os.Remove(sock)
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	p := &proc{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{}), events: newEventLog()}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", name, argv[0], err)
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	tick := time.NewTicker(readyPoll)
	defer tick.Stop()
	for {
		dctx, dcancel := context.WithTimeout(rctx, 5*time.Second)
		cl, err := qmp.DialAddr(dctx, "unix:"+sock)
		dcancel()
		if err == nil {
			p.qmp = cl
			break
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("%s exited before its QMP socket answered (%v): %s", name, p.waitErr, p.logTail())
		case <-rctx.Done():
			p.kill()
			return nil, fmt.Errorf("%s: no QMP on %s within %s (%w): %s", name, sock, readyTimeout, context.Cause(rctx), p.logTail())
		case <-tick.C:
		}
	}
	go p.events.collect(p.qmp.Events())
	if _, err := p.execute(rctx, "query-status", nil); err != nil {
		p.kill()
		return nil, fmt.Errorf("%s: query-status: %w", name, err)
	}
	p.Ready = time.Since(t0)
	return p, nil
}

// execute runs one QMP command, bounded by commandTimeout.
func (p *proc) execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	r, err := p.qmp.Execute(ctx, cmd, args)
	if err != nil {
		return nil, fmt.Errorf("%s: %s: %w", p.name, cmd, err)
	}
	return r, nil
}

// commandTimeout bounds one QMP command (QEMU 7.2's source holds its lock
// for over a second at switchover).
const commandTimeout = 30 * time.Second

// queryMigrate returns the process's query-migrate.
func (p *proc) queryMigrate(ctx context.Context) (qmp.MigrationInfo, error) {
	var info qmp.MigrationInfo
	raw, err := p.execute(ctx, "query-migrate", nil)
	if err != nil {
		return info, err
	}
	if err := json.Unmarshal(raw, &info); err != nil {
		return info, fmt.Errorf("%s: query-migrate: %w", p.name, err)
	}
	return info, nil
}

// running reports query-status's running member.
func (p *proc) running(ctx context.Context) (bool, error) {
	raw, err := p.execute(ctx, "query-status", nil)
	if err != nil {
		return false, err
	}
	var st struct {
		Running bool `json:"running"`
	}
	err = json.Unmarshal(raw, &st)
	return st.Running, err
}

// stop asks the process to quit over QMP and waits for it at most
// stopTimeout, then kills it by its PID.
func (p *proc) stop() {
	if p.qmp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _ = p.qmp.Execute(ctx, "quit", nil)
		cancel()
	}
	t := time.NewTimer(stopTimeout)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		p.kill()
	}
	if p.qmp != nil {
		_ = p.qmp.Close()
	}
}

// stopTimeout bounds a process's exit after quit.
const stopTimeout = 15 * time.Second

// kill sends SIGKILL to the process (by its PID) and waits for it.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
	if p.qmp != nil {
		_ = p.qmp.Close()
	}
}

// logTail returns the end of the process's output, for error messages.
func (p *proc) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 800 {
		s = "…" + s[len(s)-800:]
	}
	if s == "" {
		return "(no output)"
	}
	return s
}

// eventLog keeps every QMP event of one connection, for waits on an event
// that may already have arrived. mu guards evs and changed.
type eventLog struct {
	mu      sync.Mutex
	evs     []qmp.Event
	changed chan struct{} // closed and replaced on every append
	closed  bool          // the connection ended
}

func newEventLog() *eventLog { return &eventLog{changed: make(chan struct{})} }

// collect appends the events of ch until it is closed (the QMP client
// closes it when its connection ends).
func (l *eventLog) collect(ch <-chan qmp.Event) {
	for ev := range ch {
		l.mu.Lock()
		l.evs = append(l.evs, ev)
		close(l.changed)
		l.changed = make(chan struct{})
		l.mu.Unlock()
	}
	l.mu.Lock()
	l.closed = true
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

// errNoEvent is returned when a connection ends without the event.
var errNoEvent = errors.New("the QMP connection ended without the event")

// waitFor returns the first event named name whose timestamp is not before
// after, waiting until ctx ends.
func (l *eventLog) waitFor(ctx context.Context, name string, after time.Time) (qmp.Event, error) {
	for {
		l.mu.Lock()
		for _, ev := range l.evs {
			if ev.Event == name && !ev.Timestamp.Time().Before(after) {
				l.mu.Unlock()
				return ev, nil
			}
		}
		closed, changed := l.closed, l.changed
		l.mu.Unlock()
		if closed {
			return qmp.Event{}, fmt.Errorf("%s: %w", name, errNoEvent)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return qmp.Event{}, fmt.Errorf("waiting for %s: %w", name, context.Cause(ctx))
		}
	}
}

// procStatus reads a "Key:   N kB" line of /proc/PID/status, in bytes.
func procStatus(pid int, key string) (uint64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseStatusKB(string(data), key)
}

// parseStatusKB finds key in /proc/PID/status text and returns its value
// in bytes.
func parseStatusKB(status, key string) (uint64, error) {
	for _, line := range strings.Split(status, "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("/proc status line %q: want N kB", line)
			}
			kb, err := strconv.ParseUint(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc status line %q: %w", line, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("/proc status has no %s line", key)
}

// cpuTicks returns a process's user+system CPU time in clock ticks
// (/proc/PID/stat fields 14 and 15).
func cpuTicks(pid int) (uint64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatTicks(string(data))
}

// parseStatTicks reads utime+stime from /proc/PID/stat text. The command
// name (field 2) may hold spaces and parentheses, so fields are counted
// after its last ')'.
func parseStatTicks(stat string) (uint64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("/proc stat: no ')' after the command name")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat: %d fields after the name, want at least 13", len(f))
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc stat: %w", err)
	}
	return u + s, nil
}

// settle waits until the process uses at most idleTicks of CPU in one
// settleWindow (an idle guest), at most settleMax; it reports whether the
// process settled. It is a measurement window, not a synchronisation: a
// busy source is reported, not hidden.
func settle(ctx context.Context, pid int) (bool, error) {
	deadline := time.Now().Add(settleMax)
	for time.Now().Before(deadline) {
		a, err := cpuTicks(pid)
		if err != nil {
			return false, err
		}
		t := time.NewTimer(settleWindow)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return false, context.Cause(ctx)
		}
		b, err := cpuTicks(pid)
		if err != nil {
			return false, err
		}
		if b-a <= idleTicks {
			return true, nil
		}
	}
	return false, nil
}

// An idle source: at most idleTicks clock ticks (10 ms each) of CPU in
// settleWindow, i.e. under 5 % of one core; waited for at most settleMax.
const (
	settleWindow = 500 * time.Millisecond
	idleTicks    = 2
	settleMax    = 30 * time.Second
)
