package engine_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// relay is a loopback TCP relay in front of a destination: every
// connection it accepts is copied both ways to target, and Cut closes all
// of them at once (a cable pulled, as far as both sides can tell).
type relay struct {
	ln     net.Listener
	target string

	// backLimit > 0: the relay cuts everything once it has carried this
	// many bytes from target back to the dialler (a link that breaks in
	// the middle of a handshake).
	backLimit int64

	// backFirst, when set, wraps the back direction (target → dialler) of
	// the first connection only (e.g. an rpCutter).
	backFirst func(from net.Conn) io.Reader
	first     bool // the first connection was accepted; owned by accept

	mu    sync.Mutex
	conns []net.Conn
	cut   bool
	back  int64 // bytes carried back so far
	wg    sync.WaitGroup
}

func newRelay(t *testing.T, target string, backLimit int64) *relay {
	t.Helper()
	return startRelay(t, &relay{target: target, backLimit: backLimit})
}

// startRelay listens for r and relays until the test ends.
func startRelay(t *testing.T, r *relay) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.ln = ln
	r.wg.Add(1)
	go r.accept()
	t.Cleanup(func() { r.Cut(); r.ln.Close(); r.wg.Wait() })
	return r
}

func (r *relay) uri() string { return "tcp:" + r.ln.Addr().String() }

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		d, err := net.DialTimeout("tcp", r.target, 10*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		if r.cut {
			r.mu.Unlock()
			c.Close()
			d.Close()
			continue
		}
		r.conns = append(r.conns, c, d)
		r.wg.Add(2)
		r.mu.Unlock()
		var wrap func(net.Conn) io.Reader
		if !r.first && r.backFirst != nil {
			wrap = r.backFirst
		}
		r.first = true
		pipe := func(to, from net.Conn, back bool) {
			defer r.wg.Done()
			switch {
			case back && wrap != nil:
				_, _ = io.Copy(to, wrap(from))
			case back && r.backLimit > 0:
				_, _ = io.Copy(to, &limitedBack{r: r, from: from})
			default:
				_, _ = io.Copy(to, from)
			}
			// Half a connection gone: end both, as a broken link does.
			to.Close()
			from.Close()
		}
		go pipe(c, d, true)
		go pipe(d, c, false)
	}
}

// limitedBack reads from a target connection until the relay's backLimit
// is reached, then cuts the relay.
type limitedBack struct {
	r    *relay
	from net.Conn
}

func (l *limitedBack) Read(p []byte) (int, error) {
	l.r.mu.Lock()
	left := l.r.backLimit - l.r.back
	l.r.mu.Unlock()
	if left <= 0 {
		l.r.Cut()
		return 0, io.EOF
	}
	n, err := l.from.Read(p[:min(int64(len(p)), left)])
	l.r.mu.Lock()
	l.r.back += int64(n)
	l.r.mu.Unlock()
	return n, err
}

// Cut closes every relayed connection, and every later one at once.
func (r *relay) Cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cut = true
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
}

// A link cut in postcopy-active takes both sides to postcopy-paused (never
// failed: the guest runs on the destination with pages still at the
// source); migrate-recover on the destination and migrate resume=true on
// the source rebuild the channel (RECV_BITMAP, RESUME_ACK) and the
// migration completes with every page equal. The background stream is
// held to max-postcopy-bandwidth so the cut finds most pages still at the
// source; the destination's reader vCPUs fault on them and stay blocked
// (never read zeros) across the pause.
func TestPostcopyRecoverAfterCut(t *testing.T) {
	for _, c := range []struct {
		preempt  bool
		second   string // "": one cut; "handshake": the recovery handshake is cut too; "reconnect": the reconnection is cut
		pauseDst bool   // the first failure is migrate-pause on the destination instead of a cut
	}{{false, "", false}, {true, "", false}, {false, "handshake", false}, {true, "handshake", false}, {false, "reconnect", false}, {true, "", true}} {
		preempt := c.preempt
		t.Run(fmt.Sprintf("preempt=%v,second=%s,pause-dst=%v", preempt, c.second, c.pauseDst), func(t *testing.T) {
			cfg := guest.Config{Size: 32 << 20, DirtyRate: 32 << 20, Seed: 12, ZeroFraction: 0.1}
			caps := map[string]bool{"postcopy-ram": true, "postcopy-preempt": preempt, "events": true}
			src := newEnd(t, false, cfg)
			setCaps(t, src.c, caps, map[string]any{"max-bandwidth": 16 << 20, "max-postcopy-bandwidth": 1 << 20})
			dst := newPostcopyDest(t, cfg, 1, caps)
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
			if err != nil {
				t.Fatal(err)
			}
			r := newRelay(t, strings.TrimPrefix(in.Addr().String(), "tcp:"), 0)
			m, err := engine.Start(ctx, src.c, src.g, r.uri(), engine.Options{SectionBytes: 256 << 10})
			if err != nil {
				in.Abort("source refused")
				<-in.Done()
				t.Fatal(err)
			}
			// Before the guest process goes (cleanups run last first): a
			// failed test ends both sides, so no fault service outlives the
			// guest's mappings.
			t.Cleanup(func() {
				in.Abort("test ended")
				m.Abort("test ended")
				<-m.Done()
				<-in.Done()
			})
			abort := func(format string, args ...any) {
				t.Helper()
				in.Abort("test failed")
				m.Abort("test failed")
				<-m.Done()
				<-in.Done()
				t.Fatalf(format, args...)
			}
			m.StartPostcopy()
			t.Cleanup(func() {
				if t.Failed() {
					st, _ := dst.c.Status(spec.Incoming, 0)
					t.Logf("destination: %s (%s), states %v", st.State, st.Error, history(t, dst.c, spec.Incoming))
				}
			})
			waitSide(ctx, t, src.c, spec.Outgoing, machine.State("postcopy-active"))
			waitSide(ctx, t, dst.c, spec.Incoming, machine.State("postcopy-active"))
			if c.pauseDst {
				if err := in.Pause(ctx); err != nil {
					abort("destination migrate-pause in postcopy-active: %v", err)
				}
			} else {
				r.Cut()
			}
			waitSide(ctx, t, src.c, spec.Outgoing, machine.State("postcopy-paused"))
			waitSide(ctx, t, dst.c, spec.Incoming, machine.State("postcopy-paused"))

			// The cut found pages still at the source (else this would test
			// nothing): the guest process counts what it received.
			if st, err := dst.g.Stats(ctx); err != nil || st.Received >= st.Pages {
				abort("after the cut: guest process stats %+v (%v): want pages still missing", st, err)
			} else {
				t.Logf("paused with %d of %d pages received", st.Received, st.Pages)
			}
			// Paused, the migration cannot be cancelled (QEMU's words): the
			// guest's state is split between the two sides.
			if err := m.Cancel(ctx); err == nil || !strings.Contains(err.Error(), "Postcopy migration in progress, cannot cancel.") {
				abort("cancel while paused: %v, want QEMU's refusal", err)
			}
			if c.second != "" {
				// A second failure: the recovery goes through a relay that
				// breaks during the handshake (after the first byte the
				// destination sends back) or refuses the reconnection
				// (cut before it comes). Both sides pause again.
				if c.second == "reconnect" {
					// The destination's listener only sees a connection that
					// closes at once; it waits x-migctl-io-timeout for the
					// source, then pauses again (QEMU refuses migrate-pause
					// while it listens: its status is postcopy-paused).
					if err := dst.c.SetParameters(ctx, map[string]any{"x-migctl-keepalive": 100, "x-migctl-io-timeout": 500}); err != nil {
						abort("%v", err)
					}
				}
				if err := in.Recover(ctx, "tcp:127.0.0.1:0"); err != nil {
					abort("migrate-recover: %v", err)
				}
				st, _ := dst.c.Status(spec.Incoming, 0)
				if st.Endpoint == nil {
					abort("destination status has no endpoint after migrate-recover: %+v", st)
				}
				var limit int64
				if c.second == "handshake" {
					limit = 1
				}
				r2 := newRelay(t, strings.TrimPrefix(st.Endpoint.URI, "tcp:"), limit)
				if c.second == "reconnect" {
					r2.Cut()
				}
				if err := m.Resume(ctx, r2.uri(), nil); err != nil {
					abort("migrate resume=true: %v", err)
				}
				waitSide(ctx, t, src.c, spec.Outgoing, machine.State("postcopy-paused"))
				waitSide(ctx, t, dst.c, spec.Incoming, machine.State("postcopy-paused"))
			}
			// Recover on a new address, directly (the relay is gone).
			ruri := "unix:" + filepath.Join(t.TempDir(), "recover.sock")
			if err := in.Recover(ctx, ruri); err != nil {
				abort("migrate-recover: %v", err)
			}
			if err := src.c.SetParameters(ctx, map[string]any{"max-postcopy-bandwidth": 0}); err != nil {
				abort("%v", err)
			}
			if err := m.Resume(ctx, ruri, nil); err != nil {
				abort("migrate resume=true: %v", err)
			}
			sr, err := m.Wait(ctx)
			if err != nil {
				abort("the migration did not end: %v (source %v, destination %v)", err, history(t, src.c, spec.Outgoing), history(t, dst.c, spec.Incoming))
			}
			dr, err := in.Wait(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if sr.Err != nil || dr.Err != nil {
				t.Fatalf("source %v (%s), destination %v (%s)", sr.Err, sr.State, dr.Err, dr.State)
			}
			wantSrc := []string{"postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"}
			if got := history(t, src.c, spec.Outgoing); !inOrder(got, wantSrc) {
				t.Fatalf("source states %v, want %v in order", got, wantSrc)
			}
			wantDst := []string{"postcopy-active", "postcopy-paused", "postcopy-recover-listening", "postcopy-recover", "postcopy-active", "completed"}
			if got := history(t, dst.c, spec.Incoming); !inOrder(got, wantDst) {
				t.Fatalf("destination states %v, want %v in order", got, wantDst)
			}
			checkDest(t, dst, src.g)
		})
	}
}

var _ = errors.Is

// waitAny waits on sub for side to reach one of states and returns it.
func waitAny(ctx context.Context, t *testing.T, c *machine.Controller, sub *machine.Subscription, side string, states ...string) string {
	t.Helper()
	if st, _ := c.Status(side, 0); slices.Contains(states, string(st.State)) {
		return string(st.State)
	}
	for {
		select {
		case ev, ok := <-sub.C():
			if !ok {
				t.Fatalf("subscription closed waiting for %s %v", side, states)
			}
			if ev.Kind == machine.EventState && ev.Side == side && slices.Contains(states, string(ev.To)) {
				return string(ev.To)
			}
		case <-ctx.Done():
			st, _ := c.Status(side, 0)
			t.Fatalf("%s side never reached %v (it is %s): %v", side, states, st.State, ctx.Err())
		}
	}
}

// The fault matrix at postcopy's commit point: the link is cut as the
// source enters postcopy-device (the package is on its way, or its PONG
// on the way back). Whichever side of the commit point the cut lands on,
// the guest runs in exactly one place: either the source never saw the
// PONG, fails and runs its guest again while the destination (failed, or
// paused if its PONG was lost) never started it; or the source committed
// (POSTCOPY_RUN) and both sides pause, then recover and complete with
// equal RAM.
func TestPostcopyCutAtPackage(t *testing.T) {
	cfg := guest.Config{Size: 32 << 20, DirtyRate: 32 << 20, Seed: 14, ZeroFraction: 0.1}
	caps := map[string]bool{"postcopy-ram": true, "events": true}
	src := newEnd(t, false, cfg)
	setCaps(t, src.c, caps, map[string]any{"max-bandwidth": 16 << 20, "max-postcopy-bandwidth": 1 << 20})
	dst := newPostcopyDest(t, cfg, 1, caps)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := newRelay(t, strings.TrimPrefix(in.Addr().String(), "tcp:"), 0)
	ssub := src.c.Subscribe(256)
	defer ssub.Close()
	dsub := dst.c.Subscribe(256)
	defer dsub.Close()
	m := startPostcopyRun(ctx, t, src, in, r.uri())
	m.StartPostcopy()
	waitAny(ctx, t, src.c, ssub, spec.Outgoing, "postcopy-device")
	r.Cut()
	switch got := waitAny(ctx, t, src.c, ssub, spec.Outgoing, "failed", "postcopy-paused"); got {
	case "failed":
		// Before the commit point: the source runs its guest again.
		if _, err := m.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		if !src.g.Running() {
			t.Fatal("the source failed before its commit point but its guest does not run")
		}
		d := waitAny(ctx, t, dst.c, dsub, spec.Incoming, "failed", "postcopy-paused")
		if slices.Contains(history(t, dst.c, spec.Guest), "running") || dst.g.Running() {
			t.Fatalf("the destination (%s) ran the guest although the source resumed it: guest states %v", d, history(t, dst.c, spec.Guest))
		}
		t.Logf("cut before the commit point: source failed and resumed; destination %s, guest never started", d)
	case "postcopy-paused":
		// After it: the destination ran the guest; recover.
		waitAny(ctx, t, dst.c, dsub, spec.Incoming, "postcopy-paused")
		if src.g.Running() {
			t.Fatal("the source runs its guest after its commit point")
		}
		recoverAndComplete(ctx, t, in, m, src, dst)
		t.Logf("cut after the commit point: both paused, recovered, completed")
	}
}
