package engine_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"

	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

func TestMain(m *testing.M) {
	proc.Main() // the guest processes of the postcopy tests
	goleak.VerifyTestMain(m)
}

func defaultSpec(t testing.TB) *spec.Spec {
	t.Helper()
	s, err := migctl.Spec()
	if err != nil {
		t.Fatalf("load default spec: %v", err)
	}
	return s
}

// end is one side of an in-process migration: a controller and a guest.
type end struct {
	c *machine.Controller
	g *guest.Builtin
}

const testSize = 16 << 20

func newEnd(t *testing.T, dest bool, cfg guest.Config) *end {
	t.Helper()
	var g *guest.Builtin
	var err error
	if dest {
		g, err = guest.NewDestination(cfg)
	} else {
		g, err = guest.New(cfg)
	}
	if err != nil {
		t.Fatal(err)
	}
	c, err := machine.New(defaultSpec(t), machine.Options{Facts: map[string]string{"page-size": "4096", "guest": g.ID()}, Incoming: dest})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); g.Close() })
	if dest {
		stayPaused(t, c)
	} else if err := g.Start(); err != nil {
		t.Fatal(err)
	}
	// Unlimited bandwidth, as the tests measure correctness not pacing.
	if err := c.SetParameters(context.Background(), map[string]any{"max-bandwidth": 0}); err != nil {
		t.Fatal(err)
	}
	return &end{c: c, g: g}
}

// stayPaused fires QMP's stop on a destination still waiting for its
// migration (QEMU's way of asking for a paused guest on arrival), so the
// tests can compare its memory with the source's while no writer runs.
func stayPaused(t testing.TB, c *machine.Controller) {
	t.Helper()
	if _, err := c.Fire(context.Background(), spec.Guest, machine.TriggerStop, nil); err != nil {
		t.Fatal(err)
	}
}

func guestCfg() guest.Config {
	return guest.Config{Size: testSize, DirtyRate: 16 << 20, Seed: 42, ZeroFraction: 0.1}
}

func checksum(t *testing.T, g *guest.Builtin) uint64 {
	t.Helper()
	running := g.Running()
	if running {
		g.Stop()
	}
	sum, err := g.Checksum()
	if err != nil {
		t.Fatal(err)
	}
	if running {
		g.Start()
	}
	return sum
}

func migrate(t *testing.T, src, dst *end, listenURI string, opts engine.Options) (engine.Result, loaders.Result) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, listenURI, loaders.Options{PageSums: true})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), opts)
	if err != nil {
		in.Abort("source refused")
		in.Wait(ctx)
		t.Fatalf("migrate: %v", err)
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		// Timed out: end both sides before the guests are closed under them.
		_ = m.Cancel(context.Background())
		in.Abort("test timed out")
		<-m.Done()
		<-in.Done()
		t.Fatalf("the migration did not end in time: %v", err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		in.Abort("test timed out")
		<-in.Done()
		t.Fatalf("the destination did not end in time: %v", err)
	}
	return sr, dr
}

func TestMigrateTCPAndUnix(t *testing.T) {
	for _, uri := range []string{"tcp:127.0.0.1:0", "unix:" + filepath.Join(t.TempDir(), "mig.sock")} {
		t.Run(strings.SplitN(uri, ":", 2)[0], func(t *testing.T) {
			src := newEnd(t, false, guestCfg())
			dst := newEnd(t, true, guestCfg())
			sr, dr := migrate(t, src, dst, uri, engine.Options{})
			if sr.State != "completed" || dr.State != "completed" {
				t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
			}
			if src.g.Running() {
				t.Error("source guest still running after completion")
			}
			want := checksum(t, src.g)
			got := checksum(t, dst.g)
			if got != want {
				t.Fatalf("destination checksum %#x, source %#x", got, want)
			}
			if err := dst.g.Verify(); err != nil {
				t.Fatalf("destination memory: %v", err)
			}
			d, err := dst.g.DigestWithPageSums(dr.PageSums)
			if err != nil || d.Sum() != want {
				t.Fatalf("incremental digest %#x (%v), want %#x", d.Sum(), err, want)
			}
			if sr.Stats.Downtime <= 0 || sr.Stats.DirtySyncCount < 1 {
				t.Errorf("stats not reported: %+v", sr.Stats)
			}
			t.Logf("passes %d, downtime %v, total %v, transferred %d", sr.Stats.DirtySyncCount, sr.Stats.Downtime, sr.Stats.TotalTime, sr.Stats.Transferred)
		})
	}
}

// A must-match capability that differs fails both sides at connect,
// naming the capability and both values, before any page is loaded.
func TestCapabilityMismatchAtConnect(t *testing.T) {
	src := newEnd(t, false, guestCfg())
	dst := newEnd(t, true, guestCfg())
	if err := src.c.SetCapabilities(context.Background(), map[string]bool{"return-path": true}); err != nil {
		t.Fatal(err)
	}
	before := checksum(t, dst.g)
	sr, dr := migrate(t, src, dst, "tcp:127.0.0.1:0", engine.Options{})
	if sr.State != "failed" || dr.State != "failed" {
		t.Fatalf("source %s, destination %s", sr.State, dr.State)
	}
	for _, err := range []error{sr.Err, dr.Err} {
		if err == nil || !strings.Contains(err.Error(), "return-path") || !strings.Contains(err.Error(), "source has it on") || !strings.Contains(err.Error(), "destination has it off") {
			t.Errorf("reason should name return-path and both values: %v", err)
		}
	}
	if after := checksum(t, dst.g); after != before || dr.Stats.Normal != 0 {
		t.Errorf("pages were loaded into the destination (%d)", dr.Stats.Normal)
	}
	if !src.g.Running() {
		t.Error("source guest is not running after the failure")
	}
	st, _ := dst.c.Status(spec.Incoming, 0)
	if !strings.Contains(st.Error, "return-path") {
		t.Errorf("destination error-desc %q", st.Error)
	}
}

// Cancel in setup, in active and just before switchover: the source ends
// cancelled with its guest running and its memory intact; a second
// migration afterwards succeeds.
func TestCancel(t *testing.T) {
	for _, when := range []machine.State{"setup", "active", "pre-switchover"} {
		t.Run(string(when), func(t *testing.T) {
			src := newEnd(t, false, guestCfg())
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sub := src.c.Subscribe(1024)
			defer sub.Close()
			var dial func(context.Context, transport.Addr) (transport.Conn, error)
			hold := make(chan struct{})
			if when == "setup" {
				// Hold the connection attempt so the cancel lands in setup.
				dial = func(ctx context.Context, a transport.Addr) (transport.Conn, error) {
					<-hold
					return nil, context.Canceled
				}
			}
			if when == "pre-switchover" {
				if err := src.c.SetCapabilities(ctx, map[string]bool{"pause-before-switchover": true}); err != nil {
					t.Fatal(err)
				}
			}
			if when == "active" {
				// Slow enough to be caught mid-stream.
				if err := src.c.SetParameters(ctx, map[string]any{"max-bandwidth": "8M"}); err != nil {
					t.Fatal(err)
				}
			}
			dst := newEnd(t, true, guestCfg())
			in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
			if err != nil {
				t.Fatal(err)
			}
			m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{Dial: dial})
			if err != nil {
				t.Fatal(err)
			}
			waitState(t, sub, when)
			if err := m.Cancel(ctx); err != nil {
				t.Fatal(err)
			}
			close(hold)
			sr, _ := m.Wait(ctx)
			if sr.State != "cancelled" || !errors.Is(sr.Err, engine.ErrCancelled) {
				t.Fatalf("source ended %s: %v", sr.State, sr.Err)
			}
			if !src.g.Running() {
				t.Fatal("source guest not running after cancel")
			}
			src.g.Stop()
			if err := src.g.Verify(); err != nil {
				t.Fatalf("source memory after cancel: %v", err)
			}
			src.g.Start()
			if when == "setup" {
				in.Abort("test over")
			}
			dr, _ := in.Wait(ctx)
			if dr.State != "failed" && dr.State != "cancelled" {
				t.Fatalf("destination ended %s", dr.State)
			}
			// A fresh destination and a second migration succeed.
			if err := src.c.SetCapabilities(ctx, map[string]bool{"pause-before-switchover": false}); err != nil {
				t.Fatal(err)
			}
			if err := src.c.SetParameters(ctx, map[string]any{"max-bandwidth": 0}); err != nil {
				t.Fatal(err)
			}
			dst2 := newEnd(t, true, guestCfg())
			sr2, dr2 := migrate(t, src, dst2, "tcp:127.0.0.1:0", engine.Options{})
			if sr2.State != "completed" || dr2.State != "completed" {
				t.Fatalf("second migration: source %s (%v), destination %s (%v)", sr2.State, sr2.Err, dr2.State, dr2.Err)
			}
			if checksum(t, src.g) != checksum(t, dst2.g) {
				t.Fatal("second migration: checksums differ")
			}
		})
	}
}

func waitState(t *testing.T, sub *machine.Subscription, state machine.State) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case ev := <-sub.C():
			if ev.Kind == machine.EventState && ev.Side == spec.Outgoing && ev.To == state {
				return
			}
		case <-timeout:
			t.Fatalf("outgoing side never reached %s", state)
		}
	}
}

// cutProxy forwards a TCP connection and cuts it after limit bytes from the
// source.
func cutProxy(t *testing.T, target string, limit int64) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		u, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer u.Close()
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(c, u) }()
		io.CopyN(u, c, limit)
	}()
	return "tcp:" + ln.Addr().String()
}

// The connection cut mid-stream: the destination fails with a reason and
// never writes outside its RAM; the source fails with its guest running.
func TestConnectionCut(t *testing.T) {
	src := newEnd(t, false, guestCfg())
	dst := newEnd(t, true, guestCfg())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	proxy := cutProxy(t, strings.TrimPrefix(in.Addr().String(), "tcp:"), 4<<20)
	m, err := engine.Start(ctx, src.c, src.g, proxy, engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sr, _ := m.Wait(ctx)
	dr, _ := in.Wait(ctx)
	if sr.State != "failed" || dr.State != "failed" {
		t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
	}
	if !src.g.Running() {
		t.Fatal("source guest not running")
	}
	st, _ := dst.c.Status(spec.Incoming, 0)
	if st.Error == "" {
		t.Fatal("destination failed without a reason")
	}
	t.Logf("source: %v\ndestination: %v", sr.Err, st.Error)
}

// With switchover-ack on both sides the source must not switch over
// before the destination allowed it: while the destination holds its
// SWITCHOVER_ACK back (a device not ready), the source keeps iterating in
// active although it converged; once the destination allows it, the
// migration completes.
func TestSwitchoverAck(t *testing.T) {
	src := newEnd(t, false, guestCfg())
	dst := newEnd(t, true, guestCfg())
	for _, e := range []*end{src, dst} {
		if err := e.c.SetCapabilities(context.Background(), map[string]bool{"return-path": true, "switchover-ack": true}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ready := make(chan struct{})
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{SwitchoverReady: ready})
	if err != nil {
		t.Fatal(err)
	}
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Converged (a 16 MiB guest fits 300 ms after pass 1), yet held: the
	// source must still be in active after several more passes.
	const heldPasses = 5
	var failure string
	for passes := 0; passes < heldPasses && failure == ""; {
		select {
		case ev := <-sub.C():
			switch {
			case ev.Kind == machine.EventPass:
				passes++
			case ev.Kind == machine.EventState && ev.Side == spec.Outgoing && ev.From == "active":
				failure = fmt.Sprintf("the source went %s → %s while the destination held its switchover ack", ev.From, ev.To)
			}
		case <-ctx.Done():
			failure = "the source stopped iterating while held"
		}
	}
	if failure != "" {
		// End both sides before the guests are closed under them.
		in.Abort("test failed")
		m.Wait(ctx)
		in.Wait(ctx)
		t.Fatal(failure)
	}
	close(ready)
	sr, err := m.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sr.Err != nil || dr.Err != nil {
		t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
	}
	if checksum(t, src.g) != checksum(t, dst.g) {
		t.Fatal("checksums differ")
	}
}

// zero-page-detection is honoured: with none every page travels whole (no
// ZERO record reaches the destination), with legacy — and multifd, which
// without multifd channels QEMU detects on the main channel like legacy —
// zero pages travel as ZERO records. Counted on the wire: the destination's
// count of ZERO records it decoded.
func TestZeroPageDetection(t *testing.T) {
	for _, tc := range []struct {
		mode      string
		wantZeros bool
	}{{"none", false}, {"legacy", true}, {"multifd", true}} {
		t.Run(tc.mode, func(t *testing.T) {
			src := newEnd(t, false, guestCfg())
			dst := newEnd(t, true, guestCfg())
			for _, e := range []*end{src, dst} { // must match, like QEMU's mismatched settings fail at connect
				if err := e.c.SetParameters(context.Background(), map[string]any{"zero-page-detection": tc.mode}); err != nil {
					t.Fatal(err)
				}
			}
			sr, dr := migrate(t, src, dst, "unix:"+filepath.Join(t.TempDir(), "m.sock"), engine.Options{})
			if sr.Err != nil || dr.Err != nil {
				t.Fatalf("source %v, destination %v", sr.Err, dr.Err)
			}
			if got := dr.Stats.Duplicate > 0; got != tc.wantZeros {
				t.Fatalf("zero-page-detection %s: the destination decoded %d ZERO records and %d pages; want zero records: %v",
					tc.mode, dr.Stats.Duplicate, dr.Stats.Normal, tc.wantZeros)
			}
			if sr.Stats.Duplicate != dr.Stats.Duplicate {
				t.Fatalf("the source counted %d zero pages, the destination decoded %d", sr.Stats.Duplicate, dr.Stats.Duplicate)
			}
			if checksum(t, src.g) != checksum(t, dst.g) {
				t.Fatal("checksums differ")
			}
		})
	}
}

// avail-switchover-bandwidth replaces the measured bandwidth in the
// switchover decision: at 1 B/s the expected downtime the source reports
// (and switches over by) is the remaining bytes in seconds, where the
// measured bandwidth would make it milliseconds.
func TestAvailSwitchoverBandwidth(t *testing.T) {
	busy := guestCfg()
	busy.DirtyRate = 256 << 20 // pages are dirty at the syncs
	for _, avail := range []uint64{1, 0} {
		src := newEnd(t, false, busy)
		if err := src.c.SetParameters(context.Background(), map[string]any{"avail-switchover-bandwidth": avail}); err != nil {
			t.Fatal(err)
		}
		sub := src.c.Subscribe(1024)
		sr, dr := migrate(t, src, newEnd(t, true, busy), "tcp:127.0.0.1:0", engine.Options{})
		if sr.Err != nil || dr.Err != nil {
			t.Fatalf("source %v, destination %v", sr.Err, dr.Err)
		}
		src.c.Close() // the subscription delivers what it queued, then ends
		// The statistics published at the end of a pass (the last before
		// the next pass begins) carry the expected downtime the switchover
		// decision used, computed from that moment's remaining bytes.
		judged := 0
		var last *machine.Stats
		judge := func() {
			if last == nil || last.Remaining == 0 || last.ExpectedDowntime == 0 {
				return
			}
			judged++
			atOneByte := time.Duration(last.Remaining) * time.Second
			if avail == 1 && last.ExpectedDowntime != atOneByte {
				t.Errorf("avail-switchover-bandwidth 1: expected downtime %v for %d bytes, want %v", last.ExpectedDowntime, last.Remaining, atOneByte)
			}
			if avail == 0 && last.ExpectedDowntime >= atOneByte {
				t.Errorf("avail-switchover-bandwidth 0: expected downtime %v for %d bytes: the measured bandwidth was not used", last.ExpectedDowntime, last.Remaining)
			}
		}
		for ev := range sub.C() {
			switch {
			case ev.Side != spec.Outgoing:
			case ev.Kind == machine.EventStats:
				last = ev.Stats
			case ev.Kind == machine.EventPass, ev.Kind == machine.EventState && ev.From == "active":
				judge() // the pass before ended: the next began, or the source switched over
				last = nil
			}
		}
		sub.Close()
		if judged == 0 {
			t.Fatalf("avail %d: no statistics with dirty pages left to judge", avail)
		}
	}
}
