package host

import (
	"fmt"
	"os"
	"strings"
)

// THPDir is where Linux exposes its transparent huge page policy.
const THPDir = "/sys/kernel/mm/transparent_hugepage"

// THP is the host's transparent huge page policy, as selected (the value in
// brackets) in two files of [THPDir]:
//   - Anon, from "enabled": "always", "madvise" or "never". It governs
//     private anonymous memory (guest.BackingAnon): with "always" or
//     "madvise", memory advised with MADV_HUGEPAGE is faulted in 2 MiB at a
//     time.
//   - Shmem, from "shmem_enabled": "always", "within_size", "advise",
//     "never", "deny" or "force". It governs shmem, so memfds
//     (guest.BackingMemfd). "" when the file is absent (older kernels).
type THP struct {
	Anon, Shmem string
}

// AnonAdvised reports whether anonymous memory advised with MADV_HUGEPAGE
// may get huge pages.
func (t THP) AnonAdvised() bool { return t.Anon == "always" || t.Anon == "madvise" }

// ShmemAdvised reports whether a memfd advised with MADV_HUGEPAGE may get
// huge pages.
func (t THP) ShmemAdvised() bool {
	switch t.Shmem {
	case "always", "within_size", "advise", "force":
		return true
	}
	return false
}

// String describes the policy in the files' own terms.
func (t THP) String() string {
	return fmt.Sprintf("%s/enabled=%s, shmem_enabled=%s", THPDir, t.Anon, t.Shmem)
}

// TransparentHugePages reads the host's policy. It fails when the kernel has
// no transparent huge pages (no "enabled" file): then no memory gets them.
func TransparentHugePages() (THP, error) {
	var t THP
	b, err := os.ReadFile(THPDir + "/enabled")
	if err != nil {
		return t, fmt.Errorf("host: transparent huge pages: %w (kernel built without CONFIG_TRANSPARENT_HUGEPAGE?)", err)
	}
	if t.Anon, err = selected(string(b)); err != nil {
		return t, fmt.Errorf("host: %s/enabled: %w", THPDir, err)
	}
	if b, err := os.ReadFile(THPDir + "/shmem_enabled"); err == nil {
		if t.Shmem, err = selected(string(b)); err != nil {
			return t, fmt.Errorf("host: %s/shmem_enabled: %w", THPDir, err)
		}
	}
	return t, nil
}

// selected returns the bracketed word of a sysfs choice list such as
// "always [madvise] never".
func selected(s string) (string, error) {
	for _, w := range strings.Fields(s) {
		if len(w) > 2 && w[0] == '[' && w[len(w)-1] == ']' {
			return w[1 : len(w)-1], nil
		}
	}
	return "", fmt.Errorf("no selected value in %.64q", s)
}
