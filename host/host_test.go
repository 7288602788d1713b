package host

import (
	"os"
	"testing"
)

func TestFeatures(t *testing.T) {
	f := Features()
	if !f["msg-zerocopy"] {
		t.Error("msg-zerocopy not reported on Linux")
	}
	if os.Geteuid() == 0 && !f["userfaultfd"] {
		t.Log("running as root but userfaultfd is unavailable (kernel built without it?)")
	}
	for _, never := range []string{"kvm-dirty-ring", "uffd-wp", "colo-replication"} {
		if f[never] {
			t.Errorf("%s reported", never)
		}
	}
}
