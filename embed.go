// Package migctl is a live-migration controller whose state graphs and
// compatibility rules are data. This root package carries that data: the
// default spec, embedded so the binary needs no files.
package migctl

import (
	_ "embed"
	"strings"
	"sync"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

//go:generate go run ./cmd/specdocs -o docs -readme README.md

// DefaultSpec is the text of transitions.yaml, the spec migctl runs with
// unless told otherwise: both sides' state graphs, the guards on their
// edges, and the capabilities, parameters, transports and rules the guards
// enforce. Load it with spec.Load("transitions.yaml", migctl.DefaultSpec,
// registry.Names()); never modify the slice.
//
//go:embed transitions.yaml
var DefaultSpec []byte

// defaultSpec is DefaultSpec loaded once; a Spec is read-only and safe to
// share.
var defaultSpec = sync.OnceValues(func() (*spec.Spec, error) {
	data := DefaultSpec
	if mutant.MutableRunning {
		data = mutableRunning(data)
	}
	s, err := spec.Load("transitions.yaml", data, guards.Default().Names())
	if err != nil {
		return nil, err
	}
	if err := machine.Check(s); err != nil {
		return nil, err
	}
	return s, nil
})

// Spec returns DefaultSpec loaded, validated against the default guard
// registry and checked against the Go code's contract (machine.Check);
// loaded once, shared by every caller.
func Spec() (*spec.Spec, error) { return defaultSpec() }

// mutableRunning is the mutant_mutable_running mutation of the spec: the
// incoming side's connected and active states become mutable.
func mutableRunning(data []byte) []byte {
	text := string(data)
	for _, st := range []string{"connected", "active"} {
		i := strings.Index(text, "\n    - name: "+st+"\n")
		if i < 0 {
			continue
		}
		j := i + strings.Index(text[i:], "config: frozen")
		text = text[:j] + "config: mutable" + text[j+len("config: frozen"):]
	}
	return []byte(text)
}
