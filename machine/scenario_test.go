package machine_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

func defaultSpec(t testing.TB) *spec.Spec {
	t.Helper()
	s, err := migctl.Spec()
	if err != nil {
		t.Fatalf("load default spec: %v", err)
	}
	return s
}

// fakeClock advances one millisecond per reading, so histories are
// ordered and reproducible.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(time.Millisecond)
	return c.t
}

// newController builds a controller of the default spec with a fake
// clock: a source process (its guest boots), or with incoming a
// destination (its guest waits for an incoming migration).
func newController(t testing.TB, incoming bool, features ...string) *machine.Controller {
	t.Helper()
	clk := &fakeClock{t: time.Date(2026, 1, 8, 0, 0, 0, 0, time.UTC)}
	fs := map[string]bool{}
	for _, f := range features {
		fs[f] = true
	}
	c, err := machine.New(defaultSpec(t), machine.Options{
		Now:      clk.now,
		Features: fs,
		Facts:    map[string]string{"page-size": "4096", "guest": "builtin-64M"},
		Incoming: incoming,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func endpoint(uri string) *guards.Endpoint {
	scheme, _, _ := strings.Cut(uri, ":")
	return &guards.Endpoint{Transport: scheme, URI: uri}
}

// describeErr renders an error with its type, as the scenario files expect.
func describeErr(err error) string {
	var np *machine.NotPermittedError
	var ge *machine.GuardError
	var iv *machine.InvalidValueError
	switch {
	case err == nil:
		return "ok"
	case errors.As(err, &np):
		return "not permitted: " + err.Error()
	case errors.As(err, &ge):
		out := fmt.Sprintf("refused by %s", strings.Join(ge.Guards, ", "))
		if ge.To != "" {
			out += ", moved to " + string(ge.To)
		}
		for _, r := range ge.Refusals {
			out += "\n  " + r.String()
		}
		return out
	case errors.As(err, &iv):
		return "invalid value: " + err.Error()
	}
	return "error: " + err.Error()
}

// TestScenarios runs the stories under testdata/: each command drives the
// controller and prints its answer. Commands: reset [role=source|destination]
// [features=...] (a fresh controller; a file starts with a source),
// fire side=S on=T [uri=U] [reason=R] (peer announcement lines as input),
// set-caps, set-params, status side=S, config, history side=S.
func TestScenarios(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		var c *machine.Controller
		datadriven.RunTest(t, path, func(t *testing.T, td *datadriven.TestData) string {
			if c == nil || td.Cmd == "reset" {
				var feats []string
				incoming := false
				for _, a := range td.CmdArgs {
					switch a.Key {
					case "features":
						feats = a.Vals
					case "role":
						incoming = len(a.Vals) > 0 && a.Vals[0] == "destination"
					}
				}
				c = newController(t, incoming, feats...)
				if td.Cmd == "reset" {
					return "ok"
				}
			}
			ctx := context.Background()
			arg := func(k string) string {
				if a, ok := td.Arg(k); ok && len(a.Vals) > 0 {
					return a.Vals[0]
				}
				return ""
			}
			switch td.Cmd {
			case "fire":
				a := &machine.Args{Reason: arg("reason")}
				if u := arg("uri"); u != "" {
					a.Endpoint = endpoint(u)
				}
				if strings.TrimSpace(td.Input) != "" {
					a.Peer = &guards.Peer{Caps: map[string]bool{}, Params: map[string]string{}, Facts: map[string]string{}}
					for _, line := range strings.Split(td.Input, "\n") {
						kind, kv, _ := strings.Cut(strings.TrimSpace(line), " ")
						k, v, _ := strings.Cut(kv, "=")
						switch kind {
						case "cap":
							a.Peer.Caps[k] = v == "on"
						case "param":
							a.Peer.Params[k] = v
						case "fact":
							a.Peer.Facts[k] = v
						default:
							t.Fatalf("%s: peer line %q: want cap|param|fact NAME=VALUE", td.Pos, line)
						}
					}
				}
				out, err := c.Fire(ctx, arg("side"), machine.Trigger(arg("on")), a)
				res := describeErr(err)
				switch {
				case out.Ignored:
					res += " (ignored)"
				case out.Refused && err == nil:
					res += " (guards refused: took the else edge)"
				}
				return res + "\nstate: " + string(out.To)
			case "set-caps":
				caps := map[string]bool{}
				for _, f := range strings.Fields(td.Input) {
					k, v, _ := strings.Cut(f, "=")
					caps[k] = v == "on"
				}
				return describeErr(c.SetCapabilities(ctx, caps))
			case "set-params":
				ps := map[string]any{}
				for _, f := range strings.Fields(td.Input) {
					k, v, _ := strings.Cut(f, "=")
					ps[k] = v
				}
				return describeErr(c.SetParameters(ctx, ps))
			case "status":
				st, err := c.Status(arg("side"), 0)
				if err != nil {
					return describeErr(err)
				}
				mut := "frozen"
				if st.Mutable {
					mut = "mutable"
				}
				var perm []string
				for _, p := range st.Permitted {
					perm = append(perm, string(p))
				}
				out := fmt.Sprintf("state: %s (status %s, config %s)\npermitted: %s", st.State, st.QMPStatus, mut, strings.Join(perm, " "))
				if st.Endpoint != nil {
					out += "\nendpoint: " + st.Endpoint.URI
				}
				if st.Error != "" {
					out += "\nerror: " + st.Error
				}
				return out
			case "config":
				cfg := c.Config()
				def := guards.DefaultConfig(defaultSpec(t))
				var on, changed []string
				for k, v := range cfg.Caps {
					if v {
						on = append(on, k)
					}
				}
				for k, v := range cfg.Params {
					if def.Params[k] != v {
						changed = append(changed, k+"="+v)
					}
				}
				slices.Sort(on)
				slices.Sort(changed)
				return fmt.Sprintf("caps on: %s\nparams changed: %s", strings.Join(on, " "), strings.Join(changed, " "))
			case "history":
				st, err := c.Status(arg("side"), -1)
				if err != nil {
					return describeErr(err)
				}
				var lines []string
				for _, r := range st.History {
					line := fmt.Sprintf("%s --%s--> %s", r.From, r.Trigger, r.To)
					if r.Detail != "" {
						line += "  (" + r.Detail + ")"
					}
					lines = append(lines, line)
				}
				return strings.Join(lines, "\n")
			}
			t.Fatalf("%s: unknown command %q", td.Pos, td.Cmd)
			return ""
		})
	})
}
