//go:build !rdma_verbs

package ibv

import "github.com/migctl/migctl/rdma/verbs"

// New returns ErrNotBuilt: this binary has no rdma-core provider.
func New() (verbs.Provider, error) { return nil, ErrNotBuilt }
