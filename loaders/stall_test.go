package loaders_test

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// Issue 9, item 3: a destination never hangs on its source. Whatever a
// connected source does — send half a page and hold the channel, trickle
// a byte at a time, flood PINGs and never read the answers — the
// destination fails within x-migctl-io-timeout, and migrate_cancel ends it
// at once, cancelled.

// pingFlood is a stream that opens the return path and then asks for far
// more PONGs than the socket buffers hold.
func pingFlood(t *testing.T, g *guest.Builtin) []byte {
	enc, buf := header(t, g, nil)
	if err := enc.OpenReturnPath(); err != nil {
		t.Fatal(err)
	}
	for i := range 200000 {
		if err := enc.Ping(uint32(i + 2)); err != nil {
			t.Fatal(err)
		}
	}
	if err := enc.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// halfPage is a stream that stops in the middle of a page.
func halfPage(t *testing.T, g *guest.Builtin) []byte {
	enc, buf := header(t, g, nil)
	enc.BeginRAMPart()
	enc.PutPage("pc.ram", 0, page(7))
	enc.Flush()
	return buf.Bytes()[:buf.Len()-2048]
}

// whole is a complete stream of one page.
func whole(t *testing.T, g *guest.Builtin) []byte {
	enc, buf := header(t, g, nil)
	enc.BeginRAMEnd()
	enc.PutPage("pc.ram", 0, page(7))
	enc.CloseRAMSection()
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type misbehaviour struct {
	name string
	// source writes to conn until stop is closed, as the hostile source
	// does; it must return once stop is closed.
	source func(t *testing.T, g *guest.Builtin, conn net.Conn, stop <-chan struct{})
}

var misbehaviours = []misbehaviour{
	{"half a page, then silence", func(t *testing.T, g *guest.Builtin, conn net.Conn, stop <-chan struct{}) {
		conn.Write(halfPage(t, g))
		<-stop
	}},
	{"one byte at a time", func(t *testing.T, g *guest.Builtin, conn net.Conn, stop <-chan struct{}) {
		data := whole(t, g)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for _, b := range data {
			select {
			case <-tick.C:
			case <-stop:
				return
			}
			if _, err := conn.Write([]byte{b}); err != nil {
				return
			}
		}
	}},
	{"PINGs, answers never read", func(t *testing.T, g *guest.Builtin, conn net.Conn, stop <-chan struct{}) {
		conn.Write(pingFlood(t, g)) // blocks once the destination stops reading; the close ends it
	}},
}

// hostileSource connects a misbehaving source to a fresh destination with
// the given liveness parameters.
func hostileSource(t *testing.T, m misbehaviour, params map[string]any) (*loaders.Incoming, *machine.Controller, *guest.Builtin, func()) {
	t.Helper()
	c, g := newDest(t)
	if err := c.SetParameters(context.Background(), params); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "in.sock")
	in, err := loaders.Listen(context.Background(), c, g, "unix:"+sock, loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.source(t, g, conn, stop)
	}()
	return in, c, g, func() {
		close(stop)
		conn.Close()
		<-done
		in.Abort("test over")
		<-in.Done()
	}
}

func TestMisbehavingSourceTimesOut(t *testing.T) {
	for _, m := range misbehaviours {
		t.Run(m.name, func(t *testing.T) {
			in, _, g, stop := hostileSource(t, m, map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 300})
			defer stop()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a hang guard, not a timing
			defer cancel()
			r, err := in.Wait(ctx)
			if err != nil {
				t.Fatalf("the destination is still %v after 30 s", err)
			}
			var stall *loaders.StallError
			if r.State != "failed" || !errors.As(r.Err, &stall) {
				t.Fatalf("destination ended %s with %v, want failed by a stall", r.State, r.Err)
			}
			if g.Running() || len(g.RunLog()) > 0 {
				t.Fatal("the guest ran")
			}
		})
	}
}

// TestCancelUnblocksMisbehavingSource: with no timeout at all
// (x-migctl-io-timeout 0, QEMU's behaviour), migrate_cancel still ends
// each misbehaving source's migration at once, cancelled — including one
// where the destination is blocked writing answers the source never
// reads. The stall is reported first.
func TestCancelUnblocksMisbehavingSource(t *testing.T) {
	for _, m := range misbehaviours {
		t.Run(m.name, func(t *testing.T) {
			in, c, g, stop := hostileSource(t, m, map[string]any{"x-migctl-keepalive": 20, "x-migctl-io-timeout": 0})
			defer stop()
			waitStalled(t, c)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := in.Cancel(ctx, "operator"); err != nil {
				t.Fatal(err)
			}
			r, err := in.Wait(ctx)
			if err != nil {
				t.Fatalf("the destination is still %v after the cancel", err)
			}
			if r.State != "cancelled" || !errors.Is(r.Err, loaders.ErrCancelled) {
				t.Fatalf("destination ended %s with %v, want cancelled", r.State, r.Err)
			}
			if g.Running() {
				t.Fatal("the guest ran")
			}
		})
	}
}

// waitStalled polls the incoming side's status until it reports a stall
// (x-migctl-stalled-ms): the code under test offers no event for it.
func waitStalled(t *testing.T, c *machine.Controller) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		st, _ := c.Status(spec.Incoming, 0)
		if st.Stalled > 0 {
			return
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatal("no stall reported in 30 s")
		}
	}
}
