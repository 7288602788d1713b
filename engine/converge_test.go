package engine_test

import (
	"context"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// notConverging runs the guest of the tests below (dirtying 128 MiB/s
// against max-bandwidth 32 MiB/s, x-migctl-convergence-passes 3) until
// the source reports it does not converge, checking it stayed in precopy
// until then.
func notConverging(t *testing.T) (context.Context, *end, *pcEnd, *loaders.Incoming, *engine.Migration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	t.Cleanup(cancel)
	cfg := guest.Config{Size: 16 << 20, DirtyRate: 128 << 20, Writers: 2, Seed: 13, ZeroFraction: 0.1}
	src := newEnd(t, false, cfg)
	caps := map[string]bool{"postcopy-ram": true}
	dst := newPostcopyDest(t, cfg, 0, caps)
	setCaps(t, src.c, caps, map[string]any{"max-bandwidth": 32 << 20, "downtime-limit": 10, "x-migctl-convergence-passes": 3})
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sub := src.c.Subscribe(256)
	defer sub.Close()
	m := startPostcopyRun(ctx, t, src, in, in.Addr().String())
	var passes uint64
	for done := false; !done; {
		select {
		case ev, ok := <-sub.C():
			if !ok {
				t.Fatal("subscription closed")
			}
			if ev.Side != spec.Outgoing {
				continue
			}
			if ev.Kind == machine.EventState && ev.To != "setup" && ev.To != "active" {
				st, _ := src.c.Status(spec.Outgoing, 0)
				t.Fatalf("the source went to %s (%s) before it reported non-convergence", ev.To, st.Error)
			}
			if ev.Kind == machine.EventStats && ev.Stats.NotConverging {
				passes = ev.Stats.DirtySyncCount
				done = true
			}
		case <-ctx.Done():
			st, _ := src.c.Status(spec.Outgoing, 0)
			t.Fatalf("no non-convergence reported: %s %+v", st.State, st.Stats)
		}
	}
	// The first pass sends everything once (its expected downtime is not
	// judged before the first sync): 3 passes after it, at least.
	if passes < 3 {
		t.Fatalf("not-converging reported after %d dirty syncs, want at least x-migctl-convergence-passes (3)", passes)
	}
	return ctx, src, dst, in, m
}

// A guest dirtying faster than the link (128 MiB/s against max-bandwidth
// 32 MiB/s) never converges in precopy: after x-migctl-convergence-passes
// (3) passes in a row whose expected downtime stayed above downtime-limit,
// the source says so in its statistics (query-migrate
// x-migctl-not-converging), stays in precopy (postcopy-ram is on, and
// migctl never starts postcopy on its own), and migrate_cancel ends it
// cleanly: cancelled, the guest running on the source.
func TestNotConvergingReportedThenCancelled(t *testing.T) {
	ctx, src, _, _, m := notConverging(t)
	if err := m.Cancel(ctx); err != nil {
		t.Fatal(err)
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sr.State != "cancelled" {
		t.Fatalf("source ended %s (%v), want cancelled", sr.State, sr.Err)
	}
	if !src.g.Running() {
		t.Fatal("the source's guest does not run after the cancel")
	}
	if got := history(t, src.c, spec.Outgoing); !inOrder(got, []string{"active", "cancelling", "cancelled"}) || inOrder(got, []string{"postcopy-device"}) {
		t.Fatalf("source states %v", got)
	}
}

// The same guest completes in postcopy: once the source reported that it
// does not converge, migrate-start-postcopy (the operator acting on the
// report) switches over and the destination's guest process pulls the
// rest; every page arrives, none is read as zeros, RAM equal.
func TestNotConvergingCompletesInPostcopy(t *testing.T) {
	ctx, src, dst, in, m := notConverging(t)
	m.StartPostcopy()
	sr, err := m.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sr.Err != nil || dr.Err != nil || sr.State != "completed" {
		t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
	}
	if got := history(t, src.c, spec.Outgoing); !inOrder(got, []string{"active", "postcopy-device", "postcopy-active", "completed"}) {
		t.Fatalf("source states %v", got)
	}
	checkDest(t, dst, src.g)
}
