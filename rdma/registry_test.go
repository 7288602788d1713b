package rdma

import (
	"errors"
	"strings"
	"testing"

	"github.com/migctl/migctl/rdma/ibv"
	"github.com/migctl/migctl/rdma/verbs"
)

func TestOpenSoft(t *testing.T) {
	p, err := Open(testCtx(t), "soft")
	if err != nil || p.Name() != "soft" {
		t.Fatalf("Open(soft) = %v, %v", p, err)
	}
}

func TestOpenUnknown(t *testing.T) {
	if _, err := Open(testCtx(t), "rxe"); err == nil || !strings.Contains(err.Error(), "known: soft, verbs") {
		t.Fatalf("Open(rxe): %v", err)
	}
}

// TestOpenVerbs: without the rdma_verbs tag the binary has no rdma-core
// provider and says so; with it, this machine (no RDMA device) gets a
// NoDeviceError naming the probe. Either way, no fallback to soft.
func TestOpenVerbs(t *testing.T) {
	p, err := Open(testCtx(t), "verbs")
	if err == nil {
		t.Skipf("an RDMA device is present here (%s): this test covers machines without one", p.Name())
	}
	var nd *verbs.NoDeviceError
	switch {
	case errors.Is(err, ibv.ErrNotBuilt):
		if !strings.Contains(err.Error(), "-tags rdma_verbs") {
			t.Errorf("error does not say how to build the provider: %v", err)
		}
	case errors.As(err, &nd):
		// "returned 0 devices" with kernel RDMA support and no device;
		// "returned no list: function not implemented" without (CI).
		if !errors.Is(err, verbs.ErrNoDevice) || !strings.Contains(err.Error(), "ibv_get_device_list returned") || nd.Provider != "verbs" {
			t.Errorf("no-device error does not name the probe: %v", err)
		}
	default:
		t.Fatalf("Open(verbs): %v; want ErrNotBuilt or a NoDeviceError", err)
	}
	t.Logf("Open(verbs): %v", err)
}
