package machine_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/internal/intent"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// path reaches a state from a fresh controller: optional capabilities set
// first, then triggers on one side.
type path struct {
	caps  map[string]bool
	steps []machine.Trigger
}

func (p path) String() string {
	steps := make([]string, len(p.steps))
	for i, s := range p.steps {
		steps[i] = string(s)
	}
	return fmt.Sprintf("caps=%v %s", p.caps, strings.Join(steps, " → "))
}

func argsFor(trigger machine.Trigger) *machine.Args {
	switch trigger {
	case "incoming", "migrate", "recover", "resume":
		return &machine.Args{Endpoint: &guards.Endpoint{Transport: "tcp", URI: "tcp:127.0.0.1:4444"}}
	case "fail":
		return &machine.Args{Reason: "test failure"}
	}
	return nil
}

// replay builds a controller (a destination for the incoming side) and
// walks p on side; it returns the state.
func replay(t testing.TB, sideName string, p path) (*machine.Controller, machine.State) {
	t.Helper()
	c := newController(t, sideName == spec.Incoming)
	ctx := context.Background()
	if len(p.caps) > 0 {
		if err := c.SetCapabilities(ctx, p.caps); err != nil {
			t.Fatalf("%s: set caps: %v", p, err)
		}
	}
	for _, tr := range p.steps {
		if _, err := c.Fire(ctx, sideName, tr, argsFor(tr)); err != nil {
			var ge *machine.GuardError
			if !errors.As(err, &ge) || ge.To == "" {
				t.Fatalf("%s: %s: %v", p, tr, err)
			}
		}
	}
	st, _ := c.State(sideName)
	return c, st
}

// reachable explores a side by firing every permitted trigger, from fresh
// controllers configured with each of the given capability sets.
func reachable(t *testing.T, sideName string) map[machine.State]path {
	found := map[machine.State]path{}
	for _, caps := range []map[string]bool{nil, {"pause-before-switchover": true}} {
		start := path{caps: caps}
		_, init := replay(t, sideName, start)
		if _, ok := found[init]; !ok {
			found[init] = start
		}
		queue := []path{start}
		seen := map[machine.State]bool{init: true}
		for len(queue) > 0 {
			p := queue[0]
			queue = queue[1:]
			c, _ := replay(t, sideName, p)
			stat, _ := c.Status(sideName, 0)
			for _, tr := range stat.Permitted {
				np := path{caps: caps, steps: append(slices.Clone(p.steps), tr)}
				_, to := replay(t, sideName, np)
				if !seen[to] {
					seen[to] = true
					queue = append(queue, np)
					if _, ok := found[to]; !ok {
						found[to] = np
					}
				}
			}
		}
	}
	return found
}

// For every reachable state of each side, a capability change and a
// frozen-parameter change succeed exactly where intent.Mutable (written by
// hand, not read from the spec) says; live parameters always apply.
func TestMutabilityExhaustive(t *testing.T) {
	ctx := context.Background()
	for _, sideName := range spec.SideNames {
		found := reachable(t, sideName)
		want := intent.Mutable[sideName]
		for st := range want {
			if _, ok := found[machine.State(st)]; !ok {
				t.Errorf("%s: state %s (in the table) not reached by exploration", sideName, st)
			}
		}
		for state, p := range found {
			mutable, ok := want[string(state)]
			if !ok {
				t.Errorf("%s: state %s reached but not in the table: add its intended mutability", sideName, state)
				continue
			}
			for _, tc := range []struct {
				what string
				do   func(c *machine.Controller) error
				want bool
			}{
				{"capability", func(c *machine.Controller) error {
					return c.SetCapabilities(ctx, map[string]bool{"events": true})
				}, mutable},
				{"frozen parameter", func(c *machine.Controller) error {
					return c.SetParameters(ctx, map[string]any{"multifd-channels": 4})
				}, mutable},
				{"live parameter", func(c *machine.Controller) error {
					return c.SetParameters(ctx, map[string]any{"max-bandwidth": "64M", "downtime-limit": 100})
				}, true},
			} {
				c, got := replay(t, sideName, p)
				if got != state {
					t.Fatalf("replay of %s reached %s, want %s", p, got, state)
				}
				before := c.Config()
				err := tc.do(c)
				if (err == nil) != tc.want {
					t.Errorf("%s/%s: %s change allowed=%v, want %v: %v", sideName, state, tc.what, err == nil, tc.want, err)
				}
				if err != nil {
					var ge *machine.GuardError
					if !errors.As(err, &ge) || !slices.Contains(ge.Guards, guards.ConfigMutable) || !strings.Contains(err.Error(), string(state)) {
						t.Errorf("%s/%s: refusal should come from config-mutable and name the state: %v", sideName, state, err)
					}
					if after := c.Config(); !equalConfig(before, after) {
						t.Errorf("%s/%s: a refused change modified the configuration", sideName, state)
					}
				}
			}
		}
	}
}

func equalConfig(a, b guards.Config) bool {
	if len(a.Caps) != len(b.Caps) || len(a.Params) != len(b.Params) {
		return false
	}
	for k, v := range a.Caps {
		if b.Caps[k] != v {
			return false
		}
	}
	for k, v := range a.Params {
		if b.Params[k] != v {
			return false
		}
	}
	return true
}

// A change is all or nothing: one bad member leaves everything as it was.
func TestAllOrNothing(t *testing.T) {
	c := newController(t, false)
	ctx := context.Background()
	before := c.Config()
	err := c.SetParameters(ctx, map[string]any{"downtime-limit": 500, "multifd-channels": 0})
	var iv *machine.InvalidValueError
	if !errors.As(err, &iv) || iv.Param != "multifd-channels" || !strings.Contains(err.Error(), "min=1") {
		t.Fatalf("want an invalid-value error naming multifd-channels and its range, got %v", err)
	}
	err = c.SetCapabilities(ctx, map[string]bool{"validate-uuid": true, "multifd": true, "xbzrle": true})
	var ge *machine.GuardError
	if !errors.As(err, &ge) {
		t.Fatalf("want a guard refusal for multifd+xbzrle, got %v", err)
	}
	if !equalConfig(before, c.Config()) {
		t.Fatal("a refused change was partly applied")
	}
	if err := c.SetCapabilities(ctx, map[string]bool{"no-such-cap": true}); !errors.Is(err, machine.ErrUnknownName) {
		t.Fatalf("unknown capability: %v", err)
	}
	if err := c.SetParameters(ctx, map[string]any{"no-such-param": 1}); !errors.Is(err, machine.ErrUnknownName) {
		t.Fatalf("unknown parameter: %v", err)
	}
}

// 64 goroutines change capabilities and parameters and query while another
// drives an incoming migration to completed; the history must show that no
// capability or frozen-parameter change was accepted after listening.
func TestConcurrentConfigureDuringIncoming(t *testing.T) {
	c := newController(t, true)
	ctx := context.Background()
	s := defaultSpec(t)
	sub := c.Subscribe(16) // deliberately small: a slow subscriber must not block anyone
	defer sub.Close()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopped := false
	halt := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer halt() // a Fatal below must not leave the writers running
	var mu sync.Mutex
	accepted := map[string]int{}
	for g := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 7))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var err error
				kind := ""
				switch r.IntN(4) {
				case 0:
					kind = "cap"
					err = c.SetCapabilities(ctx, map[string]bool{"pause-before-switchover": r.IntN(2) == 0, "events": true})
				case 1:
					kind = "frozen-param"
					err = c.SetParameters(ctx, map[string]any{"multifd-channels": 1 + r.IntN(8)})
				case 2:
					kind = "live-param"
					err = c.SetParameters(ctx, map[string]any{"max-bandwidth": 1 << (20 + r.IntN(8))})
				default:
					st, qerr := c.Status(spec.Incoming, 4)
					if qerr != nil || st.State == "" {
						t.Errorf("status: %v", qerr)
					}
					_ = c.Config()
					continue
				}
				if err == nil {
					mu.Lock()
					accepted[kind]++
					mu.Unlock()
				} else {
					var ge *machine.GuardError
					if !errors.As(err, &ge) {
						t.Errorf("%s change failed with %v, want a guard refusal", kind, err)
					}
				}
				if i%8 == 0 {
					runtime.Gosched()
				}
			}
		}()
	}
	drive := []struct {
		trigger machine.Trigger
		a       *machine.Args
	}{
		{"incoming", &machine.Args{Endpoint: &guards.Endpoint{Transport: "tcp", URI: "tcp:127.0.0.1:4444"}}},
		{"listen", nil},
		{"connect", nil},
		{"load", nil},
		{"complete", nil},
	}
	for _, d := range drive {
		for range 200 { // give the writers room between edges
			runtime.Gosched()
		}
		if _, err := c.Fire(ctx, spec.Incoming, d.trigger, d.a); err != nil {
			t.Fatalf("%s: %v", d.trigger, err)
		}
	}
	for range 500 {
		runtime.Gosched()
	}
	halt()

	st, _ := c.Status(spec.Incoming, -1)
	if st.State != "completed" {
		t.Fatalf("incoming ended in %s", st.State)
	}
	sd := s.Side(spec.Incoming)
	frozenSince := -1
	for i, r := range st.History {
		if frozenSince >= 0 && sd.Terminal(string(r.To)) && r.From != r.To {
			break // mutable again once the migration ended
		}
		if r.From != r.To && sd.Mutable(string(r.From)) && !sd.Mutable(string(r.To)) {
			frozenSince = i
		}
		if frozenSince >= 0 && i > frozenSince {
			switch r.Trigger {
			case machine.TriggerSetCapabilities:
				t.Errorf("capability change accepted after listening: %+v", r)
			case machine.TriggerSetParameters:
				if strings.Contains(r.Detail, "multifd-channels") {
					t.Errorf("frozen parameter change accepted after listening: %+v", r)
				}
			}
		}
	}
	if frozenSince < 0 {
		t.Fatal("history shows no move into a frozen state")
	}
	t.Logf("accepted: %v; history %d records; subscriber dropped %d events", accepted, len(st.History), sub.Dropped())
}

// State events are never lost: a subscriber with the production buffer
// (the QMP server's 1024) that does not read while ten times that many
// transitions happen, then reads, sees every one of them, in order.
// Statistics in between may be dropped, and only they.
func TestSubscribeLossless(t *testing.T) {
	const buf = 1024
	c := newController(t, false)
	sub := c.Subscribe(buf)
	defer sub.Close()
	ctx := context.Background()
	cycle := []machine.Trigger{"migrate", "cancel", "cleanup"}
	type edge struct{ from, to machine.State }
	var want []edge
	for i := 0; len(want) < 10*buf; i++ {
		tr := cycle[i%len(cycle)]
		out, err := c.Fire(ctx, spec.Outgoing, tr, argsFor(tr))
		if err != nil || !out.Moved {
			t.Fatalf("fire %s: %+v %v", tr, out, err)
		}
		want = append(want, edge{out.From, out.To})
		if err := c.PublishStats(spec.Outgoing, machine.Stats{Transferred: uint64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	var got []edge
	for len(got) < len(want) {
		var ev machine.Event
		var ok bool
		select {
		case ev, ok = <-sub.C():
		case <-time.After(10 * time.Second): // everything was queued before reading: a bound, not a wait
			t.Fatalf("only %d of %d transitions delivered", len(got), len(want))
		}
		if !ok {
			t.Fatalf("channel closed after %d of %d transitions (err %v)", len(got), len(want), sub.Err())
		}
		if ev.Kind == machine.EventState {
			got = append(got, edge{ev.From, ev.To})
		}
	}
	if !slices.Equal(got, want) {
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("transition %d: got %v, want %v", i, got[i], want[i])
			}
		}
	}
	if sub.Dropped() == 0 {
		t.Error("no statistics were dropped: the test did not overflow the buffer")
	}
	t.Logf("%d transitions delivered in order; %d statistics events dropped", len(got), sub.Dropped())
}

// A subscriber that never reads does not hold memory without bound: past
// MaxQueued undelivered events its subscription is closed with
// ErrOverflow, and the controller goes on.
func TestSubscribeOverflow(t *testing.T) {
	c := newController(t, false)
	sub := c.Subscribe(1)
	defer sub.Close()
	ctx := context.Background()
	cycle := []machine.Trigger{"migrate", "cancel", "cleanup"}
	// The subscription's goroutine holds what it took before it blocked;
	// the queue behind it overflows within MaxQueued more events.
	for i := 0; sub.Err() == nil; i++ {
		if i > 2*machine.MaxQueued {
			t.Fatalf("no overflow after %d events", i)
		}
		tr := cycle[i%len(cycle)]
		if _, err := c.Fire(ctx, spec.Outgoing, tr, argsFor(tr)); err != nil {
			t.Fatal(err)
		}
	}
	n := 0
	for range sub.C() {
		n++
	}
	if !errors.Is(sub.Err(), machine.ErrOverflow) {
		t.Fatalf("Err = %v, want ErrOverflow", sub.Err())
	}
	if n > machine.MaxQueued+1 {
		t.Fatalf("delivered %d events, more than MaxQueued+1", n)
	}
}

func TestSubscriptionClose(t *testing.T) {
	c := newController(t, false)
	sub := c.Subscribe(8)
	if _, err := c.Fire(context.Background(), spec.Outgoing, "migrate", argsFor("migrate")); err != nil {
		t.Fatal(err)
	}
	ev := <-sub.C()
	if ev.Kind != machine.EventState || ev.From != "none" || ev.To != "setup" || ev.Side != spec.Outgoing {
		t.Fatalf("first event %+v", ev)
	}
	sub.Close()
	for range sub.C() {
	}
	// After the controller's Close a subscription delivers what was queued,
	// then closes.
	sub2 := c.Subscribe(8)
	_, _ = c.Fire(context.Background(), spec.Outgoing, "cancel", nil)
	c.Close()
	var evs []machine.Event
	for ev := range sub2.C() {
		evs = append(evs, ev)
	}
	if len(evs) != 1 || evs[0].To != "cancelling" {
		t.Fatalf("after Close got %+v, want the cancel transition", evs)
	}
	sub2.Close()
}

func TestContextCancelled(t *testing.T) {
	c := newController(t, false)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Fire(ctx, spec.Outgoing, "migrate", argsFor("migrate")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Fire with a cancelled context: %v", err)
	}
	if st, _ := c.State(spec.Outgoing); st != "none" {
		t.Fatalf("state moved to %s", st)
	}
}

func specBytes(b *testing.B) []byte {
	_, file, _, _ := runtime.Caller(0)
	data, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "transitions.yaml"))
	if err != nil {
		b.Fatal(err)
	}
	return data
}

// BenchmarkBuild: load + validate the default spec and build a controller.
func BenchmarkBuild(b *testing.B) {
	data := specBytes(b)
	names := guards.Default().Names()
	b.ReportAllocs()
	for b.Loop() {
		s, err := spec.Load("transitions.yaml", data, names)
		if err != nil {
			b.Fatal(err)
		}
		c, err := machine.New(s, machine.Options{})
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkFireGuarded: one permitted, guarded Fire — migrate on the
// outgoing side, whose guard transport-compatible judges every rule of the
// spec against the transport. The clock runs only around that Fire; the
// cancel and cleanup that bring the side back are outside it.
func BenchmarkFireGuarded(b *testing.B) {
	c := newController(b, false)
	ctx := context.Background()
	a := argsFor("migrate")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Fire(ctx, spec.Outgoing, "migrate", a); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if _, err := c.Fire(ctx, spec.Outgoing, "cancel", nil); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Fire(ctx, spec.Outgoing, "cleanup", nil); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkFireUnguarded: one permitted Fire with no guard (cancel, then
// cleanup, alternately: ns/op is per Fire); the migrate that brings the
// side back runs with the clock stopped.
func BenchmarkFireUnguarded(b *testing.B) {
	c := newController(b, false)
	ctx := context.Background()
	step := 0
	b.ReportAllocs()
	for b.Loop() {
		if step == 0 {
			b.StopTimer()
			if _, err := c.Fire(ctx, spec.Outgoing, "migrate", argsFor("migrate")); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		tr := []machine.Trigger{"cancel", "cleanup"}[step]
		if _, err := c.Fire(ctx, spec.Outgoing, tr, nil); err != nil {
			b.Fatal(err)
		}
		step = 1 - step
	}
}

// BenchmarkSetCapabilities: an all-or-nothing capability change judged by
// both sides' guards.
func BenchmarkSetCapabilities(b *testing.B) {
	c := newController(b, false)
	ctx := context.Background()
	on := false
	b.ReportAllocs()
	for b.Loop() {
		on = !on
		if err := c.SetCapabilities(ctx, map[string]bool{"validate-uuid": on, "events": on}); err != nil {
			b.Fatal(err)
		}
	}
}
