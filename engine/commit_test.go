package engine_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// Tests of the switchover commit protocol (issue 9): whatever breaks, the
// guest never runs on both sides, and each side ends, within its
// x-migctl-io-timeout, in a terminal state or in unknown-outcome (the
// operator's call).

// gate freezes a channel as SIGSTOP freezes a process: while frozen, reads
// and writes wait (deadlines do not help, as nothing runs in a stopped
// process); what the peer sends waits in the kernel's buffers.
type gate struct {
	mu   sync.Mutex
	open chan struct{} // closed while the gate is open
}

func newGate() *gate {
	g := &gate{open: make(chan struct{})}
	close(g.open)
	return g
}

func (g *gate) freeze() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
		g.open = make(chan struct{})
	default:
	}
}

func (g *gate) thaw() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
	default:
		close(g.open)
	}
}

func (g *gate) wait(closed <-chan struct{}) error {
	g.mu.Lock()
	ch := g.open
	g.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-closed:
		return net.ErrClosed
	}
}

var errCut = errors.New("the test cut the channel")

// faultConn is a channel with faults the tests apply: a gate, and a cut
// when a write matches.
type faultConn struct {
	transport.Conn
	g      *gate
	cutAt  func(b []byte) cut // what to do with the write of b
	closed chan struct{}
	once   sync.Once
}

// cut is what a faultConn does to a write.
type cut int

const (
	pass      cut = iota // write it
	cutBefore            // close the channel instead of writing
	cutAfter             // write it, then close the channel
)

func (c *faultConn) Read(b []byte) (int, error) {
	if err := c.g.wait(c.closed); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *faultConn) Write(b []byte) (int, error) {
	if err := c.g.wait(c.closed); err != nil {
		return 0, err
	}
	what := pass
	if c.cutAt != nil {
		what = c.cutAt(b)
	}
	switch what {
	case cutBefore:
		c.Close()
		return 0, errCut
	case cutAfter:
		n, err := c.Conn.Write(b)
		c.Close()
		return n, err
	}
	return c.Conn.Write(b)
}

func (c *faultConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// faultListener hands out faultConns.
type faultListener struct {
	transport.Listener
	g     *gate
	cutAt func(b []byte) cut
}

func (l *faultListener) Accept(ctx context.Context) (transport.Conn, error) {
	c, err := l.Listener.Accept(ctx)
	if err != nil {
		return nil, err
	}
	return &faultConn{Conn: c, g: l.g, cutAt: l.cutAt, closed: make(chan struct{})}, nil
}

// Return-path messages on the wire (be16 type, be16 length): written here
// from qemu-wire.md §6.1 and docs/stream.md, not taken from package stream.
var (
	wireShut0  = []byte{0x00, 0x01, 0x00, 0x04, 0, 0, 0, 0}
	wireLoaded = []byte{0x7f, 0x02, 0x00, 0x00}
)

// commitEnds returns a source whose guest runs and a destination whose
// guest starts when it arrives, with the liveness parameters given.
func commitEnds(t *testing.T, cfg guest.Config, srcParams, dstParams map[string]any) (src, dst *end) {
	t.Helper()
	src = newEnd(t, false, cfg)
	dst = newEnd(t, true, cfg)
	// newEnd asks the destination to stay paused; these tests want it to
	// run on arrival, as a production destination does.
	if _, err := dst.c.Fire(context.Background(), spec.Guest, machine.TriggerCont, nil); err != nil {
		t.Fatal(err)
	}
	for e, p := range map[*end]map[string]any{src: srcParams, dst: dstParams} {
		if len(p) > 0 {
			if err := e.c.SetParameters(context.Background(), p); err != nil {
				t.Fatal(err)
			}
		}
	}
	return src, dst
}

// neverBoth fails if the two guests' run intervals ever overlap (an
// interval still open runs until now).
func neverBoth(t *testing.T, a, b *guest.Builtin) {
	t.Helper()
	now := time.Now()
	end := func(iv guest.Interval) time.Time {
		if iv.Stop.IsZero() {
			return now
		}
		return iv.Stop
	}
	for _, x := range a.RunLog() {
		for _, y := range b.RunLog() {
			if x.Start.Before(end(y)) && y.Start.Before(end(x)) {
				t.Fatalf("both guests ran at once: source %v–%v, destination %v–%v", x.Start, end(x), y.Start, end(y))
			}
		}
	}
}

// run starts the two sides (the destination's channel through l) and
// returns them.
func run(t *testing.T, src, dst *end, g *gate, cutAt func([]byte) cut, opts engine.Options, lopts loaders.Options) (*engine.Migration, *loaders.Incoming) {
	t.Helper()
	ctx := context.Background()
	lopts.Listen = func(ctx context.Context, a transport.Addr) (transport.Listener, error) {
		ln, err := transport.Listen(ctx, a)
		if err != nil {
			return nil, err
		}
		return &faultListener{Listener: ln, g: g, cutAt: cutAt}, nil
	}
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", lopts)
	if err != nil {
		t.Fatal(err)
	}
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), opts)
	if err != nil {
		in.Abort("source refused")
		<-in.Done()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.thaw()
		_ = m.Cancel(context.Background())
		in.Abort("test over")
		<-m.Done()
		<-in.Done()
	})
	return m, in
}

func wait[R any](t *testing.T, what string, w interface {
	Wait(context.Context) (R, error)
}) R {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r, err := w.Wait(ctx)
	if err != nil {
		t.Fatalf("%s did not end: %v", what, err)
	}
	return r
}

var idle = guest.Config{Size: testSize, Seed: 7, ZeroFraction: 0.1} // no writers: the last pass is tiny

// TestStallBeforeCommit is issue 9's first split brain: pause before the
// switchover, stop the destination, continue, let the source give up,
// then let the destination go on. The source resumes its guest; the
// destination must never start it (it loaded everything, but go never
// came: it fails, or waits for the operator).
func TestStallBeforeCommit(t *testing.T) {
	src, dst := commitEnds(t, idle,
		map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 400},
		map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 60000})
	if err := src.c.SetCapabilities(context.Background(), map[string]bool{"pause-before-switchover": true}); err != nil {
		t.Fatal(err)
	}
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	g := newGate()
	m, in := run(t, src, dst, g, nil, engine.Options{}, loaders.Options{})
	waitState(t, sub, machine.StatePreSwitchover)
	g.freeze() // kill -STOP the destination
	if err := m.Continue(context.Background()); err != nil {
		t.Fatal(err)
	}
	sr := wait[engine.Result](t, "the source", m)
	var stall *engine.StallError
	if !errors.As(sr.Err, &stall) || sr.State != "failed" {
		t.Fatalf("source ended %s with %v, want failed by a stall", sr.State, sr.Err)
	}
	if !src.g.Running() {
		t.Fatal("the source did not resume its guest")
	}
	g.thaw() // kill -CONT
	dr := wait[loaders.Result](t, "the destination", in)
	if dr.State == "completed" || dst.g.Running() || len(dst.g.RunLog()) > 0 {
		t.Fatalf("the destination ended %s (%v) and its guest ran: %v", dr.State, dr.Err, dst.g.RunLog())
	}
	neverBoth(t, src.g, dst.g)
}

// TestCutAtConfirmation is issue 9's second split brain: the channel is
// reset just as the destination's confirmation (SHUT 0) passes. The
// destination had the source's go and runs the guest; the source
// committed, so it must not resume: it waits in unknown-outcome until the
// operator says the destination runs it.
func TestCutAtConfirmation(t *testing.T) {
	src, dst := commitEnds(t, idle,
		map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 2000}, nil)
	m, in := run(t, src, dst, newGate(), func(b []byte) cut {
		if bytes.HasPrefix(b, wireShut0) {
			return cutBefore
		}
		return pass
	}, engine.Options{}, loaders.Options{})
	sr := wait[engine.Result](t, "the source", m)
	dr := wait[loaders.Result](t, "the destination", in)
	if !errors.Is(sr.Err, engine.ErrOutcomeUnknown) || sr.State != "unknown-outcome" {
		t.Fatalf("source ended %s with %v, want unknown-outcome", sr.State, sr.Err)
	}
	if src.g.Running() {
		t.Fatal("the source resumed its guest after it committed")
	}
	if dr.State != "completed" || !dst.g.Running() {
		t.Fatalf("destination ended %s (%v), running %v; want completed and running", dr.State, dr.Err, dst.g.Running())
	}
	neverBoth(t, src.g, dst.g)

	// Neither a plain cont nor a cancel ends it; the operator does.
	if _, err := src.c.Fire(context.Background(), spec.Guest, machine.TriggerCont, nil); err == nil {
		t.Fatal("cont accepted in unknown-outcome")
	}
	if err := m.Cancel(context.Background()); err == nil {
		t.Fatal("migrate_cancel accepted in unknown-outcome")
	}
	st, _ := src.c.Status(spec.Outgoing, 0)
	if st.QMPStatus != "x-migctl-unknown-outcome" || st.Terminal || st.Error == "" {
		t.Fatalf("status %q terminal %v error %q", st.QMPStatus, st.Terminal, st.Error)
	}
	if err := m.Resolve(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if st, _ := src.c.Status(spec.Outgoing, 0); st.State != "completed" || src.g.Running() {
		t.Fatalf("after resolving destination-running: %s, guest running %v", st.State, src.g.Running())
	}
	if st, _ := src.c.Status(spec.Guest, 0); st.State != "postmigrate" {
		t.Fatalf("source guest graph %s, want postmigrate", st.State)
	}
}

// TestCutAtLoaded: the channel is reset as the destination reports
// LOADED. The source never committed, so it resumes; the destination
// loaded everything but cannot know whether the source committed: it
// waits in unknown-outcome, guest not started, and the operator discards.
func TestCutAtLoaded(t *testing.T) {
	src, dst := commitEnds(t, idle, map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 2000},
		map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 2000})
	m, in := run(t, src, dst, newGate(), func(b []byte) cut {
		// LOADED itself goes out; the channel breaks right after it, so
		// the source may or may not have read it.
		if bytes.HasPrefix(b, wireLoaded) {
			return cutAfter
		}
		return pass
	}, engine.Options{}, loaders.Options{})
	sr := wait[engine.Result](t, "the source", m)
	dr := wait[loaders.Result](t, "the destination", in)
	neverBoth(t, src.g, dst.g)
	switch sr.State {
	case "failed": // LOADED did not reach the source
		if !src.g.Running() {
			t.Fatal("failed before the commit, and the source guest is not running")
		}
	case "unknown-outcome": // it did: the source committed
		if src.g.Running() {
			t.Fatal("the source resumed after it committed")
		}
	default:
		t.Fatalf("source ended %s (%v)", sr.State, sr.Err)
	}
	if dst.g.Running() || len(dst.g.RunLog()) > 0 {
		t.Fatal("the destination started without the source's go")
	}
	if !errors.Is(dr.Err, loaders.ErrOutcomeUnknown) || dr.State != "unknown-outcome" {
		t.Fatalf("destination ended %s with %v, want unknown-outcome", dr.State, dr.Err)
	}
	if _, err := dst.c.Fire(context.Background(), spec.Guest, machine.TriggerCont, nil); err == nil {
		t.Fatal("a plain cont accepted on a destination whose outcome is unknown")
	}
	if err := in.Resolve(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if st, _ := dst.c.Status(spec.Incoming, 0); st.State != "failed" || dst.g.Running() {
		t.Fatalf("after discarding: %s, guest running %v", st.State, dst.g.Running())
	}
}

// TestStallReported: a destination that stops answering is reported
// stalled in the source's status (query-migrate's x-migctl-stalled-ms)
// while the migration is still active, before x-migctl-io-timeout fails
// it; the source's guest keeps running throughout.
func TestStallReported(t *testing.T) {
	cfg := guestCfg()
	src, dst := commitEnds(t, cfg,
		map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 3000, "max-bandwidth": 4 << 20}, nil)
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	g := newGate()
	m, _ := run(t, src, dst, g, nil, engine.Options{}, loaders.Options{})
	waitState(t, sub, "active")
	g.freeze()
	var seen machine.Status
	waitFor(t, "a stall report", func() bool {
		seen, _ = src.c.Status(spec.Outgoing, 0)
		return seen.Stalled > 0 || seen.Terminal
	})
	if seen.Terminal || seen.State != "active" {
		t.Fatalf("the stall was first seen in %s (terminal %v), want active", seen.State, seen.Terminal)
	}
	sr := wait[engine.Result](t, "the source", m)
	var stall *engine.StallError
	if !errors.As(sr.Err, &stall) || sr.State != "failed" || !src.g.Running() {
		t.Fatalf("source ended %s with %v (guest running %v)", sr.State, sr.Err, src.g.Running())
	}
	if st, _ := src.c.Status(spec.Outgoing, 0); st.Stalled != 0 {
		t.Fatalf("a failed migration still reports a stall of %v", st.Stalled)
	}
}

// TestYank: QMP yank of a running migration aborts its channels at once:
// before the commit the migration fails and the source guest runs on.
func TestYank(t *testing.T) {
	src, dst := commitEnds(t, guestCfg(), map[string]any{"max-bandwidth": 4 << 20}, nil)
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	m, in := run(t, src, dst, newGate(), nil, engine.Options{}, loaders.Options{})
	waitState(t, sub, "active")
	m.Yank()
	sr := wait[engine.Result](t, "the source", m)
	if !errors.Is(sr.Err, engine.ErrYanked) || sr.State != "failed" || !src.g.Running() {
		t.Fatalf("source ended %s with %v (guest running %v)", sr.State, sr.Err, src.g.Running())
	}
	dr := wait[loaders.Result](t, "the destination", in)
	if dr.State != "failed" || dst.g.Running() {
		t.Fatalf("destination ended %s (%v)", dr.State, dr.Err)
	}
}

// TestFallbackWithoutProtocol: a source or a destination without the
// commit protocol (the test switch stands for an older peer) still
// migrates: the other side notices and behaves as before it existed.
func TestFallbackWithoutProtocol(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst bool // NoCommitProtocol
	}{{"old-source", true, false}, {"old-destination", false, true}, {"both-old", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := commitEnds(t, guestCfg(), nil, nil)
			m, in := run(t, src, dst, newGate(), nil, engine.Options{NoCommitProtocol: tc.src}, loaders.Options{NoCommitProtocol: tc.dst})
			sr := wait[engine.Result](t, "the source", m)
			dr := wait[loaders.Result](t, "the destination", in)
			if sr.Err != nil || dr.Err != nil || sr.State != "completed" || dr.State != "completed" {
				t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
			}
			// Without the protocol neither side ever enters its commit
			// states.
			for side, states := range map[string][]machine.State{spec.Outgoing: {"committed"}, spec.Incoming: {"loaded"}} {
				c := map[string]*machine.Controller{spec.Outgoing: src.c, spec.Incoming: dst.c}[side]
				st, _ := c.Status(side, -1)
				for _, r := range st.History {
					for _, s := range states {
						if r.To == s {
							t.Fatalf("%s side went through %s without the protocol", side, s)
						}
					}
				}
			}
			neverBoth(t, src.g, dst.g)
		})
	}
}

// TestCommitStates: with both sides speaking it, the protocol's states
// are visited in order: the destination loaded → completed, the source
// device → committed → completed.
func TestCommitStates(t *testing.T) {
	src, dst := commitEnds(t, guestCfg(), nil, nil)
	m, in := run(t, src, dst, newGate(), nil, engine.Options{}, loaders.Options{})
	sr := wait[engine.Result](t, "the source", m)
	dr := wait[loaders.Result](t, "the destination", in)
	if sr.Err != nil || dr.Err != nil {
		t.Fatalf("source %v, destination %v", sr.Err, dr.Err)
	}
	path := func(c *machine.Controller, side string) []machine.State {
		st, _ := c.Status(side, -1)
		var out []machine.State
		for _, r := range st.History {
			if r.From != r.To {
				out = append(out, r.To)
			}
		}
		return out
	}
	want := map[string][]machine.State{
		spec.Outgoing: {"setup", "active", "device", "committed", "completed"},
		spec.Incoming: {"setup", "listening", "connected", "active", "loaded", "completed"},
	}
	for side, c := range map[string]*machine.Controller{spec.Outgoing: src.c, spec.Incoming: dst.c} {
		if got := path(c, side); !equalStates(got, want[side]) {
			t.Errorf("%s path %v, want %v", side, got, want[side])
		}
	}
	neverBoth(t, src.g, dst.g)
}

func equalStates(a, b []machine.State) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
