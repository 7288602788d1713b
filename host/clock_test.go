package host

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestStampSub(t *testing.T) {
	a := Now()
	if a.Boot == ([16]byte{}) {
		t.Skip("/proc/sys/kernel/random/boot_id cannot be read here: stamps never compare")
	}
	b := Now()
	d, ok := b.Sub(a)
	if !ok || d < 0 {
		t.Fatalf("two stamps of one boot: %v, %v", d, ok)
	}
	other := b
	other.Boot[0] ^= 1
	if _, ok := other.Sub(a); ok {
		t.Fatal("stamps of two boots compared")
	}
	if _, ok := (Stamp{Mono: time.Second}).Sub(Stamp{}); ok {
		t.Fatal("stamps of an unknown boot compared")
	}
}

func TestReadBootID(t *testing.T) {
	dir := t.TempDir()
	for name, tc := range map[string]struct {
		text string
		ok   bool
		want byte // first byte
	}{
		"uuid":    {"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n", true, 0x0f},
		"short":   {"0f1e2d3c\n", false, 0},
		"not hex": {"zz1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n", false, 0},
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(tc.text), 0o600); err != nil {
			t.Fatal(err)
		}
		id, err := readBootID(p)
		if (err == nil) != tc.ok || id[0] != tc.want {
			t.Errorf("%s: %x, %v", name, id, err)
		}
	}
}
