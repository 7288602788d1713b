package rdma

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/migctl/migctl/rdma/ibv"
	"github.com/migctl/migctl/rdma/soft"
	"github.com/migctl/migctl/rdma/verbs"
)

// providers maps a registry name to its constructor.
var providers = map[string]func() (verbs.Provider, error){
	soft.Name: func() (verbs.Provider, error) { return soft.New(soft.Options{}), nil },
	ibv.Name:  ibv.New,
}

// Providers lists the registry names, sorted.
func Providers() []string {
	names := make([]string, 0, len(providers))
	for n := range providers {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Open returns the provider registered as name ("soft" or "verbs") after
// probing it: a provider with no device fails here with a
// *verbs.NoDeviceError naming the probe it ran, and "verbs" in a binary
// built without the rdma_verbs tag fails with ibv.ErrNotBuilt. There is no
// fallback from one provider to another.
func Open(ctx context.Context, name string) (verbs.Provider, error) {
	mk, ok := providers[name]
	if !ok {
		return nil, fmt.Errorf("rdma: unknown provider %q (known: %s)", name, strings.Join(Providers(), ", "))
	}
	p, err := mk()
	if err != nil {
		return nil, err
	}
	if _, err := p.Probe(ctx); err != nil {
		return nil, err
	}
	return p, nil
}
