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

	"go.uber.org/goleak"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// path reaches a state from a fresh controller: optional capabilities set
// first, then triggers on one side.
type path struct {
	caps  map[string]bool
	steps []string
}

func (p path) String() string {
	return fmt.Sprintf("caps=%v %s", p.caps, strings.Join(p.steps, " → "))
}

func argsFor(trigger string) *machine.Args {
	switch trigger {
	case "incoming", "migrate", "recover", "resume":
		return &machine.Args{Endpoint: &guards.Endpoint{Transport: "tcp", URI: "tcp:127.0.0.1:4444"}}
	case "fail":
		return &machine.Args{Reason: "test failure"}
	}
	return nil
}

// replay builds a controller and walks p on side; it returns the state.
func replay(t testing.TB, sideName string, p path) (*machine.Controller, string) {
	t.Helper()
	c := newController(t)
	ctx := context.Background()
	if len(p.caps) > 0 {
		if err := c.SetCapabilities(ctx, p.caps); err != nil {
			t.Fatalf("%s: set caps: %v", p, err)
		}
	}
	for _, tr := range p.steps {
		if err := c.Fire(ctx, sideName, tr, argsFor(tr)); err != nil {
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
func reachable(t *testing.T, sideName string) map[string]path {
	found := map[string]path{}
	for _, caps := range []map[string]bool{nil, {"pause-before-switchover": true}} {
		start := path{caps: caps}
		_, init := replay(t, sideName, start)
		if _, ok := found[init]; !ok {
			found[init] = start
		}
		queue := []path{start}
		seen := map[string]bool{init: true}
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

// For every reachable state of each side, a capability change succeeds iff
// the spec marks that state mutable; the same for frozen parameters; live
// parameters always apply.
func TestMutabilityExhaustive(t *testing.T) {
	s := defaultSpec(t)
	ctx := context.Background()
	for _, sideName := range spec.SideNames {
		sd := s.Side(sideName)
		found := reachable(t, sideName)
		for _, st := range sd.States {
			if _, ok := found[st.Name]; !ok {
				t.Errorf("%s: state %s not reached by exploration", sideName, st.Name)
			}
		}
		for state, p := range found {
			mutable := sd.Mutable(state)
			for _, tc := range []struct {
				what string
				do   func(c *machine.Controller) error
				want bool
			}{
				{"capability", func(c *machine.Controller) error {
					return c.SetCapabilities(ctx, map[string]bool{"validate-uuid": true})
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
					if !errors.As(err, &ge) || !slices.Contains(ge.Guards, guards.ConfigMutable) || !strings.Contains(err.Error(), state) {
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
	c := newController(t)
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
	c := newController(t)
	ctx := context.Background()
	s := defaultSpec(t)
	sub := c.Subscribe(16) // deliberately small: a slow subscriber must not block anyone
	defer sub.Close()

	stop := make(chan struct{})
	var wg sync.WaitGroup
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
					err = c.SetCapabilities(ctx, map[string]bool{"validate-uuid": r.IntN(2) == 0, "events": true})
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
		trigger string
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
		if err := c.Fire(ctx, spec.Incoming, d.trigger, d.a); err != nil {
			t.Fatalf("%s: %v", d.trigger, err)
		}
	}
	for range 500 {
		runtime.Gosched()
	}
	close(stop)
	wg.Wait()

	st, _ := c.Status(spec.Incoming, -1)
	if st.State != "completed" {
		t.Fatalf("incoming ended in %s", st.State)
	}
	sd := s.Side(spec.Incoming)
	frozenSince := -1
	for i, r := range st.History {
		if r.From != r.To && sd.Mutable(r.From) && !sd.Mutable(r.To) {
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

func TestSubscribe(t *testing.T) {
	c := newController(t)
	sub := c.Subscribe(8)
	ctx := context.Background()
	if err := c.Fire(ctx, spec.Outgoing, "migrate", argsFor("migrate")); err != nil {
		t.Fatal(err)
	}
	ev := <-sub.C()
	if ev.Kind != machine.EventState || ev.From != "none" || ev.To != "setup" || ev.Side != spec.Outgoing {
		t.Fatalf("first event %+v", ev)
	}
	// A full subscriber drops, never blocks.
	for range 20 {
		_ = c.PublishPass(spec.Outgoing, 1)
	}
	if sub.Dropped() == 0 {
		t.Fatal("expected dropped events on a full subscription")
	}
	sub.Close()
	if _, ok := <-drain(sub.C()); ok {
		t.Fatal("channel not closed after Close")
	}
}

func drain(ch <-chan machine.Event) <-chan machine.Event {
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return ch
			}
		default:
			return ch
		}
	}
}

func TestContextCancelled(t *testing.T) {
	c := newController(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Fire(ctx, spec.Outgoing, "migrate", argsFor("migrate")); !errors.Is(err, context.Canceled) {
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

// BenchmarkFire: one permitted, guarded Fire (a cycle migrate → cancel →
// cleanup on the outgoing side; ns/op is per Fire).
func BenchmarkFire(b *testing.B) {
	c := newController(b)
	ctx := context.Background()
	cycle := []string{"migrate", "cancel", "cleanup"}
	args := []*machine.Args{argsFor("migrate"), nil, nil}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := c.Fire(ctx, spec.Outgoing, cycle[i], args[i]); err != nil {
			b.Fatal(err)
		}
		i = (i + 1) % len(cycle)
	}
}

// BenchmarkSetCapabilities: an all-or-nothing capability change judged by
// both sides' guards.
func BenchmarkSetCapabilities(b *testing.B) {
	c := newController(b)
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
