// Package ibv is the real RDMA provider: rdma-core's libibverbs and
// librdmacm through cgo. It is compiled only with the build tag rdma_verbs
// (and needs the Debian packages libibverbs-dev and librdmacm-dev);
// without the tag New returns ErrNotBuilt.
//
// This provider's data path compiles and passes go vet in CI, but has never
// run: the machines migctl is built and tested on have no RDMA device (no
// InfiniBand, no rdma_rxe, no siw). On such a machine New succeeds and
// Probe (run by rdma.Open) returns a *verbs.NoDeviceError naming the probe:
// "ibv_get_device_list returned 0 devices" where the kernel has RDMA support
// but no device, or "ibv_get_device_list returned no list: function not
// implemented" (ENOSYS) where the kernel has none, as on migctl's CI.
package ibv

import "errors"

// Name is this provider's registry name.
const Name = "verbs"

// ErrNotBuilt is returned by New in a binary built without the rdma_verbs tag.
var ErrNotBuilt = errors.New("rdma: provider verbs: this binary was built without rdma-core " +
	"(rebuild with -tags rdma_verbs after apt-get install libibverbs-dev librdmacm-dev) or choose the soft provider explicitly")
