// Package migctl is a live-migration controller whose state graphs and
// compatibility rules are data. This root package carries that data: the
// default spec, embedded so the binary needs no files.
package migctl

import (
	_ "embed"
	"sync"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/spec"
)

//go:generate go run ./cmd/specdocs -o docs

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
	return spec.Load("transitions.yaml", DefaultSpec, guards.Default().Names())
})

// Spec returns DefaultSpec loaded and validated against the default guard
// registry (loaded once, shared by every caller).
func Spec() (*spec.Spec, error) { return defaultSpec() }
