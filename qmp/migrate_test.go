package qmp

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/transport"
	"github.com/migctl/migctl/vmm"
)

// monitor wraps go-qemu's SocketMonitor for the tests: it drains the
// Events channel in a goroutine (go-qemu blocks its reader otherwise, see
// go-libs.md §7) and records MIGRATION statuses.
type monitor struct {
	t   *testing.T
	mon *goqmp.SocketMonitor

	mu       sync.Mutex
	statuses []string
	passes   int
	changed  chan struct{} // signalled (non-blocking) on every event
	drained  chan struct{}
}

func newMonitor(t *testing.T, sock string) *monitor {
	t.Helper()
	mon, err := goqmp.NewSocketMonitor("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	if mon.Version == nil || mon.Version.QEMU.Major != 10 || mon.Version.Package != "migctl" {
		t.Fatalf("go-qemu read the greeting as %+v", mon.Version)
	}
	evs, err := mon.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m := &monitor{t: t, mon: mon, changed: make(chan struct{}, 1), drained: make(chan struct{})}
	go func() {
		defer close(m.drained)
		for ev := range evs {
			m.mu.Lock()
			switch ev.Event {
			case EventMigration:
				m.statuses = append(m.statuses, ev.Data["status"].(string))
			case EventMigrationPass:
				m.passes++
			}
			m.mu.Unlock()
			select {
			case m.changed <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		mon.Disconnect()
		<-m.drained
	})
	return m
}

// run executes a raw command; go-qemu returns the desc of an error reply.
func (m *monitor) run(cmd string) []byte {
	m.t.Helper()
	out, err := m.mon.Run([]byte(cmd))
	if err != nil {
		m.t.Fatalf("%s: %v", cmd, err)
	}
	if len(out) >= 64<<10 {
		m.t.Fatalf("%s: reply of %d bytes, too big for go-qemu", cmd, len(out))
	}
	return out
}

// wait blocks until the monitor has seen MIGRATION status want.
func (m *monitor) wait(want string) []string {
	m.t.Helper()
	timer := time.NewTimer(testTimeout)
	defer timer.Stop()
	for {
		m.mu.Lock()
		seen := slices.Clone(m.statuses)
		m.mu.Unlock()
		if slices.Contains(seen, want) {
			return seen
		}
		select {
		case <-m.changed:
		case <-timer.C:
			m.t.Fatalf("no MIGRATION %s within %s (seen %v)", want, testTimeout, seen)
		}
	}
}

// TestMigrationOverGoQEMU runs a whole migration between two in-process
// servers, driven only over QMP by a third-party client.
func TestMigrationOverGoQEMU(t *testing.T) {
	src := newNode(t, nodeOpts{})
	dst := newNode(t, nodeOpts{dest: true})
	ms, md := newMonitor(t, src.sock), newMonitor(t, dst.sock)

	for _, m := range []*monitor{ms, md} {
		m.run(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}`)
	}
	ms.run(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0,"downtime-limit":500}}`)
	md.run(`{"execute":"migrate-incoming","arguments":{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"127.0.0.1","port":"0"}}],"exit-on-error":false}}`)
	var q struct {
		Return MigrationInfo `json:"return"`
	}
	if err := json.Unmarshal(md.run(`{"execute":"query-migrate"}`), &q); err != nil {
		t.Fatal(err)
	}
	if q.Return.Status != "setup" || len(q.Return.SocketAddress) != 1 || q.Return.SocketAddress[0].Port == "0" {
		t.Fatalf("destination query-migrate: %+v", q.Return)
	}
	uri := q.Return.SocketAddress[0].URI()
	ms.run(`{"execute":"migrate","arguments":{"uri":"` + uri + `"}}`)

	srcSeen, dstSeen := ms.wait("completed"), md.wait("completed")
	checkOrder(t, "source", srcSeen, []string{"setup", "active", "device", "completed"})
	checkOrder(t, "destination", dstSeen, []string{"setup", "active", "completed"})
	ms.mu.Lock()
	passes := ms.passes
	ms.mu.Unlock()
	if passes == 0 {
		t.Error("no MIGRATION_PASS on the source")
	}

	if err := json.Unmarshal(ms.run(`{"execute":"query-migrate"}`), &q); err != nil {
		t.Fatal(err)
	}
	info := q.Return
	if info.Status != "completed" || info.RAM == nil || info.RAM.Total != 16<<20 || info.RAM.Transferred < 1<<20 ||
		info.Downtime == nil || info.TotalTime == nil || info.SetupTime == nil || info.ExpectedDowntime != nil || info.RAM.DirtySyncCount == 0 {
		t.Fatalf("source query-migrate after completion: %+v ram %+v", info, info.RAM)
	}
	var st struct{ Return RunState }
	json.Unmarshal(ms.run(`{"execute":"query-status"}`), &st)
	if st.Return != (RunState{Status: "postmigrate"}) {
		t.Fatalf("source query-status: %+v", st.Return)
	}
	json.Unmarshal(md.run(`{"execute":"query-status"}`), &st)
	if st.Return != (RunState{Status: "running", Running: true}) {
		t.Fatalf("destination query-status: %+v", st.Return)
	}
	// The destination holds the guest, every page intact.
	dst.g.Stop()
	if err := dst.g.Verify(); err != nil {
		t.Fatalf("destination guest: %v", err)
	}
	// go-qemu sees QMP errors as Go errors carrying desc.
	if _, err := ms.mon.Run([]byte(`{"execute":"migrate-start-postcopy"}`)); err == nil || !strings.Contains(err.Error(), "Enable postcopy with migrate_set_capability before the start of migration") {
		t.Fatalf("go-qemu error path: %v", err)
	}
}

// checkOrder checks that want appears in seen as a subsequence, with
// nothing after the last one.
func checkOrder(t *testing.T, side string, seen, want []string) {
	t.Helper()
	i := 0
	for _, s := range seen {
		if i < len(want) && s == want[i] {
			i++
		}
	}
	if i != len(want) || seen[len(seen)-1] != want[len(want)-1] {
		t.Fatalf("%s MIGRATION events %v, want %v in order", side, seen, want)
	}
}

// gate holds an outgoing migration in setup: its Dial waits until the
// gate opens or the migration is cancelled.
type gate struct {
	once sync.Once
	ch   chan struct{}
}

func newGate() *gate { return &gate{ch: make(chan struct{})} }

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

func (g *gate) dial(ctx context.Context, a transport.Addr) (transport.Conn, error) {
	select {
	case <-g.ch:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	return transport.Dial(ctx, a)
}

// pair is a source node and its clients, migrating to fresh destinations.
type pair struct {
	t   *testing.T
	src *node
	cs  *Client
}

// newDest makes a listening destination with events on and returns it,
// its client and the URI to migrate to.
func newDest(t *testing.T, exitOnError bool) (*node, *Client, string) {
	t.Helper()
	dst := newNode(t, nodeOpts{dest: true})
	cd := dst.client(t)
	run(t, cd, "migrate-set-capabilities", caps("events", true))
	return dst, cd, listen(t, cd, map[string]any{"exit-on-error": exitOnError})
}

// migrateFully migrates from the client's server to a fresh destination
// and checks that both ends complete; it returns the destination.
func migrateFully(t *testing.T, from *Client) (*node, *Client) {
	t.Helper()
	dst, cd, uri := newDest(t, false)
	run(t, from, "migrate-set-parameters", map[string]any{"max-bandwidth": 0})
	run(t, from, "migrate", map[string]any{"uri": uri})
	waitStatus(t, from, "completed")
	waitStatus(t, cd, "completed")
	if rs := queryStatus(t, cd); !rs.Running {
		t.Fatalf("destination after a completed migration: %+v", rs)
	}
	return dst, cd
}

// TestCancelMatrix follows QEMU's /migration/cancel/src/after/<state>:
// migrate_cancel once the source reaches a state, check the outcome, then
// check a fresh migration still works.
func TestCancelMatrix(t *testing.T) {
	for _, state := range []string{"none", "setup", "active", "cancelled", "completed", "failed"} {
		t.Run(state, func(t *testing.T) {
			g := newGate()
			if state != "setup" {
				g.open()
			}
			src := newNode(t, nodeOpts{host: vmm.Options{Engine: engine.Options{Dial: g.dial}}})
			cs := src.client(t)
			run(t, cs, "migrate-set-capabilities", caps("events", true))
			switch state {
			case "none":
				run(t, cs, "migrate_cancel", nil)
				if info := queryMigrate(t, cs); info.Status != "" {
					t.Fatalf("cancel without migration: %+v", info)
				}
			case "setup":
				_, cd, uri := newDest(t, false)
				run(t, cs, "migrate", map[string]any{"uri": uri})
				waitStatus(t, cs, "setup")
				run(t, cs, "migrate_cancel", nil)
				checkOrder(t, "source", waitStatus(t, cs, "cancelled"), []string{"cancelling", "cancelled"})
				g.open()
				// The destination never saw the source: still listening,
				// so the fresh migration below could use it; use a new one
				// anyway and check this one is untouched.
				if info := queryMigrate(t, cd); info.Status != "setup" {
					t.Fatalf("destination after a cancel in setup: %+v", info)
				}
			case "active":
				run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 20})
				dst, cd, uri := newDest(t, true)
				run(t, cs, "migrate", map[string]any{"uri": uri})
				waitStatus(t, cs, "active")
				run(t, cs, "migrate_cancel", nil)
				checkOrder(t, "source", waitStatus(t, cs, "cancelled"), []string{"cancelling", "cancelled"})
				waitStatus(t, cd, "failed")
				if info := queryMigrate(t, cd); info.Status != "failed" || info.ErrorDesc == "" {
					t.Fatalf("destination after the source cancelled: %+v", info)
				}
				// exit-on-error (the default) asks the process to exit.
				select {
				case err := <-dst.exit:
					if err == nil {
						t.Fatal("exit with a nil error")
					}
				case <-time.After(testTimeout):
					t.Fatal("exit-on-error did not ask the destination to exit")
				}
			case "cancelled":
				_, _, uri := newDest(t, false)
				run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 20})
				run(t, cs, "migrate", map[string]any{"uri": uri})
				waitStatus(t, cs, "active")
				run(t, cs, "migrate_cancel", nil)
				waitStatus(t, cs, "cancelled")
				run(t, cs, "migrate_cancel", nil) // second cancel: harmless
			case "completed":
				_, cd := migrateFully(t, cs)
				run(t, cs, "migrate_cancel", nil)
				if info := queryMigrate(t, cs); info.Status != "completed" {
					t.Fatalf("cancel after completion: %+v", info)
				}
				// The source cannot migrate again while its guest is in
				// postmigrate (QEMU's refusal, a spec rule); the guest
				// carries on from the destination.
				if e := fails(t, cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:1"}); !strings.Contains(e.Desc, "Can't migrate the vm that was paused due to previous migration") {
					t.Fatalf("migrate after completion: %v", e)
				}
				if rs := queryStatus(t, cs); rs != (RunState{Status: "postmigrate"}) {
					t.Fatalf("source query-status after completion: %+v", rs)
				}
				migrateFully(t, cd)
				return
			case "failed":
				run(t, cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:" + closedPort(t)})
				waitStatus(t, cs, "failed")
				run(t, cs, "migrate_cancel", nil)
				if info := queryMigrate(t, cs); info.Status != "failed" || info.ErrorDesc == "" {
					t.Fatalf("cancel after failure: %+v", info)
				}
			}
			if rs := queryStatus(t, cs); rs != (RunState{Status: "running", Running: true}) {
				t.Fatalf("source guest after cancel in %s: %+v", state, rs)
			}
			want := map[string]string{"none": "", "setup": "cancelled", "active": "cancelled", "cancelled": "cancelled", "failed": "failed"}[state]
			if info := queryMigrate(t, cs); info.Status != want {
				t.Fatalf("source status %q after cancel in %s, want %q", info.Status, state, want)
			}
			migrateFully(t, cs)
		})
	}
}

func TestBadDestination(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	run(t, cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:" + closedPort(t)})
	checkOrder(t, "source", waitStatus(t, cs, "failed"), []string{"setup", "failed"})
	info := queryMigrate(t, cs)
	if info.Status != "failed" || !strings.Contains(info.ErrorDesc, "connect") || info.RAM != nil {
		t.Fatalf("query-migrate after a bad destination: %+v", info)
	}
	if rs := queryStatus(t, cs); rs != (RunState{Status: "running", Running: true}) {
		t.Fatalf("source guest after a bad destination: %+v", rs)
	}
	// Capabilities may change again (failed is mutable), and a second
	// migrate is accepted.
	run(t, cs, "migrate-set-capabilities", caps("return-path", true))
	run(t, cs, "migrate-set-capabilities", caps("return-path", false))
	migrateFully(t, cs)
}

// TestRunningMigrationRefusals: while a migration runs, capability changes
// and a second migrate are refused with QEMU's words plus our detail; live
// parameters still change.
func TestRunningMigrationRefusals(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 20})
	_, _, uri := newDest(t, false)
	run(t, cs, "migrate", map[string]any{"uri": uri})
	waitStatus(t, cs, "active")
	e := fails(t, cs, "migrate", map[string]any{"uri": uri})
	if !strings.HasPrefix(e.Desc, "There's a migration process in progress") || !strings.Contains(e.Desc, "active") {
		t.Fatalf("second migrate: %q", e.Desc)
	}
	e = fails(t, cs, "migrate-set-capabilities", caps("xbzrle", true))
	if !strings.HasPrefix(e.Desc, "There's a migration process in progress") || !strings.Contains(e.Desc, "xbzrle") {
		t.Fatalf("capability change while active: %q", e.Desc)
	}
	e = fails(t, cs, "migrate-set-parameters", map[string]any{"multifd-channels": 4})
	if !strings.Contains(e.Desc, "multifd-channels") {
		t.Fatalf("non-live parameter while active: %q", e.Desc)
	}
	info := queryMigrate(t, cs)
	if info.Status != "active" || info.RAM == nil || info.ExpectedDowntime == nil || info.TotalTime == nil || info.Downtime != nil {
		t.Fatalf("query-migrate while active: %+v", info)
	}
	if e := fails(t, cs, "migrate-continue", map[string]any{"state": "pre-switchover"}); e.Desc != "Migration not in expected state: active" {
		t.Fatalf("migrate-continue while active: %q", e.Desc)
	}
	// Live parameters may change while it runs.
	run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 2 << 20, "downtime-limit": 400})
	if v := src.c.Param("max-bandwidth"); v != "2097152" {
		t.Fatalf("max-bandwidth = %s", v)
	}
	run(t, cs, "migrate_cancel", nil)
	waitStatus(t, cs, "cancelled")
}

// TestPauseBeforeSwitchover drives migrate-continue.
func TestPauseBeforeSwitchover(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true, "pause-before-switchover", true))
	run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 0})
	_, cd, uri := newDest(t, false)
	run(t, cs, "migrate", map[string]any{"uri": uri})
	waitStatus(t, cs, "pre-switchover")
	if e := fails(t, cs, "migrate-continue", map[string]any{"state": "active"}); e.Desc != "Migration not in expected state: pre-switchover" {
		t.Fatalf("migrate-continue with the wrong state: %q", e.Desc)
	}
	run(t, cs, "migrate-continue", map[string]any{"state": "pre-switchover"})
	checkOrder(t, "source", waitStatus(t, cs, "completed"), []string{"device", "completed"})
	waitStatus(t, cd, "completed")
}

// TestEventsCapability: without the events capability there are no
// MIGRATION events (QEMU behaviour).
func TestEventsCapability(t *testing.T) {
	src := newNode(t, nodeOpts{})
	cs := src.client(t)
	sub := src.c.Subscribe(64)
	defer sub.Close()
	run(t, cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:" + closedPort(t)})
	for ev := range sub.C() {
		if ev.Side == "outgoing" && ev.To == "failed" {
			break
		}
	}
	// Events on, and a second failure: the client sees exactly the second
	// migration's events, so the first one's were never sent.
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	run(t, cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:" + closedPort(t)})
	if seen := waitStatus(t, cs, "failed"); !slices.Equal(seen, []string{"setup", "failing", "failed"}) {
		t.Fatalf("MIGRATION events %v, want only the second migration's setup, failing, failed", seen)
	}
}
