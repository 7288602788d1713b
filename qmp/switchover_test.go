package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/transport"
	"github.com/migctl/migctl/vmm"
)

// Issue 9 over QMP: the destination's start policy, cont after a
// completed migration, the unknown-outcome status and its resolution,
// yank, and the stall report.

// waitEvent reads events until one named name arrives.
func waitEvent(t *testing.T, cl *Client, name string) {
	t.Helper()
	timer := time.NewTimer(testTimeout)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-cl.Events():
			if !ok {
				t.Fatalf("connection closed while waiting for %s", name)
			}
			if ev.Event == name {
				return
			}
		case <-timer.C:
			t.Fatalf("no %s within %s", name, testTimeout)
		}
	}
}

// TestDestinationStaysPaused: a destination told to stay paused (stop
// while it waits, QEMU's -S) completes with its guest paused; cont starts
// it (RESUME).
func TestDestinationStaysPaused(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	dst := newNode(t, nodeOpts{dest: true})
	cd := dst.client(t)
	run(t, cd, "migrate-set-capabilities", caps("events", true))
	run(t, cd, "stop", nil)
	uri := listen(t, cd, nil)
	run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 0})
	run(t, cs, "migrate", map[string]any{"uri": uri})
	waitStatus(t, cd, "completed")
	if rs := queryStatus(t, cd); rs != (RunState{Status: "paused"}) || dst.g.Running() {
		t.Fatalf("destination told to stay paused: %+v (guest running %v)", rs, dst.g.Running())
	}
	run(t, cd, "cont", nil)
	waitEvent(t, cd, EventResume)
	if rs := queryStatus(t, cd); rs != (RunState{Status: "running", Running: true}) || !dst.g.Running() {
		t.Fatalf("after cont: %+v (guest running %v)", rs, dst.g.Running())
	}
}

// TestContAfterCompletion: after a completed migration the source's guest
// is in postmigrate; a new migrate is refused until cont (QEMU's words),
// and cont runs the guest here again (the operator's call), after which a
// new migration works.
func TestContAfterCompletion(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	migrateFully(t, cs)
	if e := fails(t, cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:1"}); !strings.Contains(e.Desc, "Can't migrate the vm that was paused due to previous migration") {
		t.Fatalf("migrate in postmigrate: %v", e)
	}
	run(t, cs, "cont", nil)
	if rs := queryStatus(t, cs); rs != (RunState{Status: "running", Running: true}) || !src.g.Running() {
		t.Fatalf("source after cont: %+v (guest running %v)", rs, src.g.Running())
	}
	migrateFully(t, cs)
}

// cutConn resets the source's channel instead of writing the commit
// protocol's go frame ("MGCT", be32 2: docs/stream.md).
type cutConn struct {
	transport.Conn
	gone bool
}

var wireGo = []byte{'M', 'G', 'C', 'T', 0, 0, 0, 2}

func (c *cutConn) Write(b []byte) (int, error) {
	if bytes.Contains(b, wireGo) {
		c.Conn.Close()
		return 0, errors.New("the test cut the channel before go")
	}
	return c.Conn.Write(b)
}

// TestResolveSwitchover: a channel cut between the source's commit and its
// go leaves both sides in x-migctl-unknown-outcome (never failed: an
// orchestrator would resume the source), guests stopped; migrate_cancel
// and cont are refused; x-migctl-resolve-switchover ends each side as the
// operator says.
func TestResolveSwitchover(t *testing.T) {
	params := map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 2000, "max-bandwidth": 0}
	srcNode := newNode(t, nodeOpts{host: vmm.Options{Engine: engineCutBeforeGo()}})
	cs := srcNode.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	run(t, cs, "migrate-set-parameters", params)
	dst, cd, uri := newDest(t, true) // exit-on-error: an unknown outcome must not end the process
	run(t, cd, "migrate-set-parameters", params)
	run(t, cs, "migrate", map[string]any{"uri": uri})
	waitStatus(t, cs, "x-migctl-unknown-outcome")
	waitStatus(t, cd, "x-migctl-unknown-outcome")
	for name, cl := range map[string]*Client{"source": cs, "destination": cd} {
		info := queryMigrate(t, cl)
		if info.Status != "x-migctl-unknown-outcome" || !strings.Contains(info.ErrorDesc, "x-migctl-resolve-switchover") {
			t.Fatalf("%s query-migrate: %+v", name, info)
		}
		if e := fails(t, cl, "migrate_cancel", nil); !strings.Contains(e.Desc, "x-migctl-resolve-switchover") {
			t.Fatalf("%s migrate_cancel: %v", name, e)
		}
		if e := fails(t, cl, "cont", nil); !strings.Contains(e.Desc, "x-migctl-resolve-switchover") {
			t.Fatalf("%s cont: %v", name, e)
		}
	}
	if srcNode.g.Running() || dst.g.Running() {
		t.Fatalf("a guest runs while the outcome is unknown: source %v, destination %v", srcNode.g.Running(), dst.g.Running())
	}
	select {
	case err := <-dst.exit:
		t.Fatalf("exit-on-error ended the destination on an unknown outcome: %v", err)
	default:
	}
	// The wrong side's argument, or none, is refused.
	fails(t, cs, "x-migctl-resolve-switchover", nil)
	fails(t, cs, "x-migctl-resolve-switchover", map[string]any{"destination-gone": true, "source-gone": true})
	if e := fails(t, cs, "x-migctl-resolve-switchover", map[string]any{"source-gone": true}); !strings.Contains(e.Desc, "no switchover to resolve") {
		t.Fatalf("source-gone on a source: %v", e)
	}
	// The destination never got go: it discards; the source resumes.
	run(t, cd, "x-migctl-resolve-switchover", map[string]any{"source-gone": false})
	run(t, cs, "x-migctl-resolve-switchover", map[string]any{"destination-gone": true})
	if info := queryMigrate(t, cs); info.Status != "failed" {
		t.Fatalf("source after destination-gone: %+v", info)
	}
	if rs := queryStatus(t, cs); rs != (RunState{Status: "running", Running: true}) || !srcNode.g.Running() {
		t.Fatalf("source guest after destination-gone: %+v", rs)
	}
	if info := queryMigrate(t, cd); info.Status != "failed" || dst.g.Running() {
		t.Fatalf("destination after source-gone=false: %+v", info)
	}
	if e := fails(t, cs, "x-migctl-resolve-switchover", map[string]any{"destination-gone": true}); !strings.Contains(e.Desc, "no switchover to resolve") {
		t.Fatalf("a second resolve: %v", e)
	}
}

// engineCutBeforeGo returns engine options whose channel resets instead
// of sending go.
func engineCutBeforeGo() (o engine.Options) {
	o.Dial = func(ctx context.Context, a transport.Addr) (transport.Conn, error) {
		c, err := transport.Dial(ctx, a)
		if err != nil {
			return nil, err
		}
		return &cutConn{Conn: c}, nil
	}
	return o
}

// frozenConn stops moving bytes either way once frozen, as a peer that
// stopped does; as with a real blocked socket, Close or a deadline in the
// past (the engine's interrupt) ends a blocked call.
type frozenConn struct {
	transport.Conn
	frozen      chan struct{} // closed when frozen
	closed      chan struct{}
	once        sync.Once
	interrupted chan struct{}
	intOnce     sync.Once
}

func (c *frozenConn) hold() error {
	select {
	case <-c.frozen:
		select {
		case <-c.closed:
			return errors.New("closed")
		case <-c.interrupted:
			return os.ErrDeadlineExceeded
		}
	default:
		return nil
	}
}

func (c *frozenConn) SetDeadline(t time.Time) error {
	if !t.IsZero() && !t.After(time.Now()) {
		c.intOnce.Do(func() { close(c.interrupted) })
	}
	return c.Conn.SetDeadline(t)
}

func (c *frozenConn) Read(b []byte) (int, error) {
	if err := c.hold(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *frozenConn) Write(b []byte) (int, error) {
	if err := c.hold(); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

func (c *frozenConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// TestYankAndStall: query-yank lists the migration instance while one
// runs; a stalled channel shows in query-migrate as x-migctl-stalled-ms
// before any timeout; yank ends it at once (failed, the guest runs on);
// yank with nothing running is QEMU's "Instance not found".
func TestYankAndStall(t *testing.T) {
	freeze := make(chan struct{})
	var once sync.Once
	opts := vmm.Options{}
	opts.Engine.Dial = func(ctx context.Context, a transport.Addr) (transport.Conn, error) {
		c, err := transport.Dial(ctx, a)
		if err != nil {
			return nil, err
		}
		return &frozenConn{Conn: c, frozen: freeze, closed: make(chan struct{}), interrupted: make(chan struct{})}, nil
	}
	gcfg := guest.Config{Size: 16 << 20, DirtyRate: 8 << 20, Seed: 3}
	src := newNode(t, nodeOpts{host: opts, guest: &gcfg})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	run(t, cs, "migrate-set-parameters", map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 0, "max-bandwidth": 1 << 20})
	var none []YankInstance
	if err := json.Unmarshal(run(t, cs, "query-yank", nil), &none); err != nil || len(none) != 0 {
		t.Fatalf("query-yank with nothing running: %v %v", none, err)
	}
	if e := fails(t, cs, "yank", map[string]any{"instances": []map[string]any{{"type": "migration"}}}); e.Class != ClassDeviceNotFound || e.Desc != "Instance not found" {
		t.Fatalf("yank with nothing running: %+v", e)
	}
	// The destination hosts the same guest: a destination that differs
	// refuses the source at connect, and that refusal can win the race
	// with the freeze below (CI saw "guest differs" instead of "yanked").
	dst := newNode(t, nodeOpts{dest: true, guest: &gcfg})
	cd := dst.client(t)
	run(t, cd, "migrate-set-capabilities", caps("events", true))
	uri := listen(t, cd, nil)
	run(t, cs, "migrate", map[string]any{"uri": uri})
	waitStatus(t, cs, "active")
	var list []YankInstance
	if err := json.Unmarshal(run(t, cs, "query-yank", nil), &list); err != nil || len(list) != 1 || list[0].Type != "migration" {
		t.Fatalf("query-yank while migrating: %v %v", list, err)
	}
	once.Do(func() { close(freeze) })
	deadline := time.Now().Add(testTimeout)
	for {
		info := queryMigrate(t, cs)
		if info.XMigctlStalledMs != nil && *info.XMigctlStalledMs > 0 {
			if info.Status != "active" {
				t.Fatalf("stalled in %s", info.Status)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no x-migctl-stalled-ms within %s: %+v", testTimeout, info)
		}
		time.Sleep(5 * time.Millisecond) // polling a status the server offers no event for
	}
	run(t, cs, "yank", map[string]any{"instances": []map[string]any{{"type": "migration"}}})
	waitStatus(t, cs, "failed")
	info := queryMigrate(t, cs)
	if !strings.Contains(info.ErrorDesc, "yanked") || info.XMigctlStalledMs != nil {
		t.Fatalf("after yank: %+v", info)
	}
	if rs := queryStatus(t, cs); !rs.Running || !src.g.Running() {
		t.Fatalf("source guest after yank: %+v", rs)
	}
}

// TestTrueDowntimeOverQMP: after a completed migration both sides report
// the guest's true downtime (migctl's x-migctl-true-downtime-us), measured
// from both processes' monotonic stamps (exact: the nodes share this
// host's boot) and therefore equal.
func TestTrueDowntimeOverQMP(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	_, cd := migrateFully(t, cs)
	si := queryMigrate(t, cs)
	// The destination knows it once its guest runs, which follows its
	// MIGRATION completed: poll (no event marks it).
	var di MigrationInfo
	for deadline := time.Now().Add(testTimeout); ; time.Sleep(5 * time.Millisecond) {
		if di = queryMigrate(t, cd); di.XMigctlTrueDowntimeUs != nil || time.Now().After(deadline) {
			break
		}
	}
	for name, info := range map[string]MigrationInfo{"source": si, "destination": di} {
		if info.XMigctlTrueDowntimeUs == nil || *info.XMigctlTrueDowntimeUs <= 0 || info.XMigctlTrueDowntimeExact == nil || !*info.XMigctlTrueDowntimeExact {
			t.Fatalf("%s query-migrate: %+v", name, info)
		}
	}
	if *si.XMigctlTrueDowntimeUs != *di.XMigctlTrueDowntimeUs {
		t.Fatalf("true downtime: source %d µs, destination %d µs", *si.XMigctlTrueDowntimeUs, *di.XMigctlTrueDowntimeUs)
	}
}
