package engine_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/uffd"
)

// pcEnd is a postcopy destination: a controller and a guest process whose
// vCPUs (readers that count every data page they find all zero) run in a
// process of their own, its RAM registered with userfaultfd.
type pcEnd struct {
	c *machine.Controller
	g *proc.Client
	p *proc.Process
}

// newPostcopyDest spawns a destination guest process for cfg (no writers:
// its memory must equal the source's at the end) with readers reader
// vCPUs, and a destination controller with caps on.
func newPostcopyDest(t *testing.T, cfg guest.Config, readers int, caps map[string]bool) *pcEnd {
	t.Helper()
	if err := uffd.Probe(); err != nil {
		t.Skipf("postcopy needs userfaultfd: %v", err)
	}
	cfg.DirtyRate, cfg.Writers = 0, 0
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, g, err := proc.Start(ctx, proc.SpawnOptions{Config: proc.Config{Guest: cfg, Role: proc.RoleDestination, Readers: readers}}, proc.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := machine.New(defaultSpec(t), machine.Options{
		Facts:    map[string]string{"page-size": "4096", "guest": g.ID()},
		Features: map[string]bool{"userfaultfd": true, "userfault-guest": true},
		Incoming: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(caps) > 0 {
		if err := c.SetCapabilities(context.Background(), caps); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if g.Quit(ctx) != nil {
			p.Kill()
		}
		if p.Wait(ctx) != nil {
			p.Kill()
			p.Wait(context.Background())
		}
	})
	return &pcEnd{c: c, g: g, p: p}
}

// setCaps switches caps on for a source end.
func setCaps(t *testing.T, c *machine.Controller, caps map[string]bool, params map[string]any) {
	t.Helper()
	if err := c.SetCapabilities(context.Background(), caps); err != nil {
		t.Fatal(err)
	}
	if params != nil {
		if err := c.SetParameters(context.Background(), params); err != nil {
			t.Fatal(err)
		}
	}
}

// history returns the states a side went through, in order.
func history(t *testing.T, c *machine.Controller, side string) []string {
	t.Helper()
	st, err := c.Status(side, -1)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range st.History {
		out = append(out, string(r.To))
	}
	return out
}

// inOrder reports whether want appears in got in this order (other states
// may come between).
func inOrder(got, want []string) bool {
	i := 0
	for _, s := range got {
		if i < len(want) && s == want[i] {
			i++
		}
	}
	return i == len(want)
}

// waitState waits for a side to reach a state, watching the controller's
// events (bounded by ctx).
func waitSide(ctx context.Context, t *testing.T, c *machine.Controller, side string, want machine.State) {
	t.Helper()
	sub := c.Subscribe(64)
	defer sub.Close()
	if st, _ := c.Status(side, 0); st.State == want {
		return
	}
	for {
		select {
		case ev, ok := <-sub.C():
			if !ok {
				t.Fatalf("subscription closed waiting for %s %s", side, want)
			}
			if ev.Kind == machine.EventState && ev.Side == side && ev.To == want {
				return
			}
		case <-ctx.Done():
			st, _ := c.Status(side, 0)
			t.Fatalf("%s side never reached %s (it is %s): %v", side, want, st.State, ctx.Err())
		}
	}
}

func checkDest(t *testing.T, dst *pcEnd, want uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := dst.g.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.LostReads != 0 {
		t.Fatalf("the destination's readers read %d data pages as zeros (first: %s)", st.LostReads, st.FirstLost)
	}
	if st.Received != st.Pages {
		t.Fatalf("%d of %d pages received", st.Received, st.Pages)
	}
	if err := dst.g.Stop(); err != nil {
		t.Fatal(err)
	}
	got, err := dst.g.Checksum(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("checksums differ: destination %016x, source %016x", got, want)
	}
}

// Postcopy end to end, with and without the preempt channel: the
// destination pre-faults its RAM while it waits, migrate-start-postcopy
// comes while pass 1 is far from done (max-bandwidth holds it back), the
// guest runs on the destination with most pages missing, its readers fault
// and the source serves them first. Every page ends equal to the source's,
// no reader ever saw zeros where the source had data (every pre-faulted
// page never received was punched back into a hole), and both sides went
// through QEMU 10.2's states.
func TestPostcopyEndToEnd(t *testing.T) {
	for _, preempt := range []bool{false, true} {
		t.Run(fmt.Sprintf("preempt=%v", preempt), func(t *testing.T) {
			cfg := guest.Config{Size: 32 << 20, DirtyRate: 32 << 20, Seed: 11, ZeroFraction: 0.1}
			caps := map[string]bool{"postcopy-ram": true, "postcopy-preempt": preempt, "events": true}
			src := newEnd(t, false, cfg)
			setCaps(t, src.c, caps, map[string]any{"max-bandwidth": 16 << 20})
			dst := newPostcopyDest(t, cfg, 2, caps)
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			uri := "unix:" + filepath.Join(t.TempDir(), "mig.sock")
			if preempt {
				uri = "tcp:127.0.0.1:0"
			}
			in, err := loaders.Listen(ctx, dst.c, dst.g, uri, loaders.Options{})
			if err != nil {
				t.Fatal(err)
			}
			select { // the destination pre-faulted all of its RAM before the source came
			case <-in.Prefaulted():
			case <-ctx.Done():
				t.Fatal("pre-faulting did not end")
			}
			m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{SectionBytes: 256 << 10})
			if err != nil {
				in.Abort("source refused")
				<-in.Done()
				t.Fatal(err)
			}
			m.StartPostcopy()
			sr, err := m.Wait(ctx)
			if err != nil {
				in.Abort("timed out")
				m.Abort("timed out")
				<-m.Done()
				<-in.Done()
				t.Fatalf("the migration did not end: %v (source %v, destination %v)", err, history(t, src.c, spec.Outgoing), history(t, dst.c, spec.Incoming))
			}
			dr, err := in.Wait(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if sr.Err != nil || dr.Err != nil {
				t.Fatalf("source %v (%s), destination %v (%s)", sr.Err, sr.State, dr.Err, dr.State)
			}
			if got := history(t, src.c, spec.Outgoing); !inOrder(got, []string{"active", "device", "postcopy-device", "postcopy-active", "completed"}) {
				t.Fatalf("source states %v", got)
			}
			if got := history(t, dst.c, spec.Incoming); !inOrder(got, []string{"active", "postcopy-device", "postcopy-active", "completed"}) {
				t.Fatalf("destination states %v", got)
			}
			if sr.Stats.PostcopyRequests == 0 || dr.Stats.PostcopyRequests == 0 || sr.Stats.PostcopyBytes == 0 {
				t.Fatalf("no page was requested: the guest ran with everything already there (source %+v)", sr.Stats)
			}
			checkDest(t, dst, checksum(t, src.g))
			t.Logf("requests: source %d destination %d; postcopy %d bytes; blocktime %v vcpu %v latency %v",
				sr.Stats.PostcopyRequests, dr.Stats.PostcopyRequests, sr.Stats.PostcopyBytes, dr.Stats.PostcopyBlocktime, dr.Stats.PostcopyVCPUBlocktime, dr.Stats.PostcopyLatency)
		})
	}
}

var _ = errors.Is
var _ = slices.Contains[[]string]
var _ = strings.Contains
