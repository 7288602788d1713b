package rdma

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/migctl/migctl/rdma/ibv"
	"github.com/migctl/migctl/rdma/soft"
	"github.com/migctl/migctl/rdma/verbs"
)

// providers maps a registry name to its constructor; providersMu guards it.
var (
	providersMu sync.RWMutex
	providers   = map[string]func() (verbs.Provider, error){
		soft.Name: func() (verbs.Provider, error) { return soft.New(soft.Options{}), nil },
		ibv.Name:  ibv.New,
	}
)

// DefaultProvider is the provider an rdma: address opens when none is
// named: the real one. A host without an RDMA device must be told to use
// "soft" explicitly.
const DefaultProvider = ibv.Name

// Register adds a provider constructor to the registry under name (tests
// register fault-injecting wrappers, rdma/fault, this way and name them in
// transport.Config.RDMAProvider). It panics if name is taken.
func Register(name string, open func() (verbs.Provider, error)) {
	providersMu.Lock()
	defer providersMu.Unlock()
	if _, dup := providers[name]; dup {
		panic(fmt.Sprintf("rdma: provider %q registered twice", name))
	}
	providers[name] = open
}

// Providers lists the registry names, sorted.
func Providers() []string {
	providersMu.RLock()
	defer providersMu.RUnlock()
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
	providersMu.RLock()
	mk, ok := providers[name]
	providersMu.RUnlock()
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
