package engine_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// The destination's migctl goes away in postcopy-active (in this process:
// its loader is aborted, its client of the guest process closed, as a
// SIGKILL would leave them; cmd/migctl's TestServeReattachAfterKill9 does
// it with a real kill -9 across processes). The source pauses; a new
// controller attaches to the guest process and loaders.Reattach takes it
// from none to postcopy-paused; Recover and Resume finish with RAM equal
// and no page read as zeros. In-process, so that -race and goleak watch
// the reattached loader.
func TestPostcopyReattach(t *testing.T) {
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
	m := startPostcopyRun(ctx, t, src, in, in.Addr().String())
	m.StartPostcopy()
	waitSide(ctx, t, src.c, spec.Outgoing, machine.State("postcopy-active"))
	waitSide(ctx, t, dst.c, spec.Incoming, machine.State("postcopy-active"))

	// The destination's migctl dies.
	in.Abort("killed")
	<-in.Done()
	if err := dst.g.Close(); err != nil {
		t.Fatal(err)
	}
	waitSide(ctx, t, src.c, spec.Outgoing, machine.State("postcopy-paused"))

	// A new migctl.
	g2, err := proc.Attach(ctx, dst.p.Socket, proc.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := g2.Stats(ctx)
	if err != nil || st.LostReads != 0 || st.Received >= st.Pages {
		t.Fatalf("the guest process after its migctl died: %+v (%v); want pages missing, no lost read", st, err)
	}
	t.Logf("migctl gone with %d of %d pages received", st.Received, st.Pages)
	c2, err := machine.New(defaultSpec(t), machine.Options{
		Facts:    map[string]string{"page-size": "4096", "guest": g2.ID()},
		Features: map[string]bool{"userfaultfd": true, "userfault-guest": true},
		Incoming: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	dst2 := &pcEnd{c: c2, g: g2, p: dst.p}
	t.Cleanup(func() { // before the first destination's cleanup, which kills the guest process
		c2.Close()
		qctx, qcancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer qcancel()
		_ = g2.Quit(qctx)
	})
	in2, err := loaders.Reattach(ctx, c2, g2, loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in2.Abort("test ended")
		<-in2.Done()
	})
	if st, _ := c2.Status(spec.Incoming, 0); st.State != machine.State("postcopy-paused") {
		t.Fatalf("after Reattach the side is %s, want postcopy-paused", st.State)
	}
	ruri := "unix:" + filepath.Join(t.TempDir(), "recover.sock")
	if err := in2.Recover(ctx, ruri); err != nil {
		t.Fatalf("migrate-recover: %v", err)
	}
	if err := src.c.SetParameters(ctx, map[string]any{"max-postcopy-bandwidth": 0}); err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(ctx, ruri, nil); err != nil {
		t.Fatalf("migrate resume=true: %v", err)
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		t.Fatalf("the migration did not end: %v (source %v, destination %v)", err, history(t, src.c, spec.Outgoing), history(t, c2, spec.Incoming))
	}
	dr, err := in2.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sr.Err != nil || dr.Err != nil {
		t.Fatalf("source %v (%s), destination %v (%s)", sr.Err, sr.State, dr.Err, dr.State)
	}
	wantDst := []string{"postcopy-paused", "postcopy-recover-listening", "postcopy-recover", "postcopy-active", "completed"}
	if got := history(t, c2, spec.Incoming); !inOrder(got, wantDst) {
		t.Fatalf("reattached destination states %v, want %v in order", got, wantDst)
	}
	checkDest(t, dst2, src.g)
}
