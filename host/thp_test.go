package host

import (
	"os"
	"slices"
	"testing"
)

func TestSelected(t *testing.T) {
	for in, want := range map[string]string{
		"always [madvise] never\n":                       "madvise",
		"[always] madvise never":                         "always",
		"always within_size advise [never] deny force\n": "never",
		"always defer defer+madvise [madvise] never":     "madvise",
		"always madvise never":                           "", // nothing selected
		"[] never":                                       "",
		"":                                               "",
		"always within_size advise never deny [force] [huge]": "force",
	} {
		got, err := selected(in)
		if want == "" {
			if err == nil {
				t.Errorf("selected(%q) = %q, want an error", in, got)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("selected(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

// TestTransparentHugePages reads this host's policy: the values must be
// among those the kernel documents (Documentation/admin-guide/mm/transhuge.rst).
func TestTransparentHugePages(t *testing.T) {
	thp, err := TransparentHugePages()
	if _, statErr := os.Stat(THPDir + "/enabled"); os.IsNotExist(statErr) {
		if err == nil {
			t.Fatal("no THP directory, yet no error")
		}
		t.Skipf("kernel without transparent huge pages: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Log(thp)
	if !slices.Contains([]string{"always", "madvise", "never"}, thp.Anon) {
		t.Errorf("enabled = %q", thp.Anon)
	}
	if thp.Shmem != "" && !slices.Contains([]string{"always", "within_size", "advise", "never", "deny", "force"}, thp.Shmem) {
		t.Errorf("shmem_enabled = %q", thp.Shmem)
	}
	if thp.AnonAdvised() != (thp.Anon != "never") {
		t.Errorf("AnonAdvised() = %v for %q", thp.AnonAdvised(), thp.Anon)
	}
	if thp.ShmemAdvised() != (thp.Shmem != "never" && thp.Shmem != "deny" && thp.Shmem != "") {
		t.Errorf("ShmemAdvised() = %v for %q", thp.ShmemAdvised(), thp.Shmem)
	}
}

func FuzzSelected(f *testing.F) {
	f.Add("always [madvise] never")
	f.Add("[")
	f.Fuzz(func(t *testing.T, s string) {
		got, err := selected(s)
		if err == nil && (got == "" || len(got) > len(s)) {
			t.Fatalf("selected(%q) = %q", s, got)
		}
	})
}
