package engine_test

import (
	"context"
	"encoding/binary"
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
func newPostcopyDest(t testing.TB, cfg guest.Config, readers int, caps map[string]bool) *pcEnd {
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

// startPostcopyRun starts src's migration to uri (256 KiB sections, so a
// postcopy switch finds pages still to send) and, when the test ends,
// aborts it and in and waits for both.
func startPostcopyRun(ctx context.Context, t *testing.T, src *end, in *loaders.Incoming, uri string) *engine.Migration {
	t.Helper()
	m, err := engine.Start(ctx, src.c, src.g, uri, engine.Options{SectionBytes: 256 << 10})
	if err != nil {
		in.Abort("source refused")
		<-in.Done()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Abort("test ended")
		m.Abort("test ended")
		<-m.Done()
		<-in.Done()
	})
	return m
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
			if ev.Kind == machine.EventState && ev.Side == side && (ev.To == "failed" || ev.To == "completed" || ev.To == "cancelled") {
				st, _ := c.Status(side, 0)
				t.Fatalf("%s side ended %s (%s) waiting for %s", side, ev.To, st.Error, want)
			}
		case <-ctx.Done():
			st, _ := c.Status(side, 0)
			t.Fatalf("%s side never reached %s (it is %s): %v", side, want, st.State, ctx.Err())
		}
	}
}

// checkDest compares the destination guest process with the source guest
// src once both are stopped. RAM must be identical block by block (names,
// sizes, CRC-32C). Devices must be identical except the timer's virtual
// clock: the guest ran on the destination after the run command (and never
// again on the source), so the destination's clock is ahead by its running
// time; the timer's tick count (written only by vCPU writers, of which the
// destination has none) must still be the source's.
func checkDest(t *testing.T, dst *pcEnd, src *guest.Builtin) {
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
	if src.Running() {
		src.Stop()
	}
	got, err := dst.g.Digest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want, err := src.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Blocks, want.Blocks) {
		t.Fatalf("RAM differs: destination %+v, source %+v", got.Blocks, want.Blocks)
	}
	if len(got.Devices) != len(want.Devices) {
		t.Fatalf("devices: destination %+v, source %+v", got.Devices, want.Devices)
	}
	for i, w := range want.Devices {
		if w.Name != "timer.0" {
			if got.Devices[i] != w {
				t.Fatalf("device %s differs: destination %+v, source %+v", w.Name, got.Devices[i], w)
			}
			continue
		}
		ds, err := dst.g.Devices()[i].Save()
		if err != nil {
			t.Fatal(err)
		}
		ss, err := src.Devices()[i].Save()
		if err != nil {
			t.Fatal(err)
		}
		// The timer's saved state: ticks u64 LE, then the virtual clock in ns (i64 LE).
		if len(ds) != 16 || len(ss) != 16 {
			t.Fatalf("timer state %d and %d bytes, want 16", len(ds), len(ss))
		}
		if dt, stk := binary.LittleEndian.Uint64(ds[:8]), binary.LittleEndian.Uint64(ss[:8]); dt != stk {
			t.Fatalf("timer ticks: destination %d, source %d", dt, stk)
		}
		if dc, sc := int64(binary.LittleEndian.Uint64(ds[8:])), int64(binary.LittleEndian.Uint64(ss[8:])); dc <= sc {
			t.Fatalf("timer clock: destination %d ns, source %d ns: the guest never ran on the destination", dc, sc)
		}
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
			caps := map[string]bool{"postcopy-ram": true, "postcopy-preempt": preempt, "postcopy-blocktime": true, "events": true}
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
			// Before the guest process goes (cleanups run last first): a
			// failed test ends both sides, so no fault service outlives the
			// guest's mappings.
			t.Cleanup(func() {
				in.Abort("test ended")
				m.Abort("test ended")
				<-m.Done()
				<-in.Done()
			})
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
				t.Fatalf("postcopy served no page request (source served %d, destination sent %d, %d postcopy bytes): %+v", sr.Stats.PostcopyRequests, dr.Stats.PostcopyRequests, sr.Stats.PostcopyBytes, sr.Stats)
			}
			if len(dr.Stats.PostcopyVCPUBlocktime) != 2 || dr.Stats.PostcopyVCPUBlocktime[0]+dr.Stats.PostcopyVCPUBlocktime[1] == 0 {
				t.Fatalf("postcopy-blocktime on, 2 reader vCPUs that faulted: per-vCPU blocktime %v", dr.Stats.PostcopyVCPUBlocktime)
			}
			checkDest(t, dst, src.g)
			t.Logf("requests: source %d destination %d; postcopy %d bytes; blocktime %v vcpu %v latency %v",
				sr.Stats.PostcopyRequests, dr.Stats.PostcopyRequests, sr.Stats.PostcopyBytes, dr.Stats.PostcopyBlocktime, dr.Stats.PostcopyVCPUBlocktime, dr.Stats.PostcopyLatency)
		})
	}
}

var _ = errors.Is
var _ = slices.Contains[[]string]
var _ = strings.Contains
