package guest

import (
	"errors"
	"strings"
	"testing"
)

func TestUUID(t *testing.T) {
	for _, c := range []struct {
		in, want string // want "" = refused
	}{
		{"11111111-1111-1111-1111-111111111111", "11111111-1111-1111-1111-111111111111"},
		{"0123ABCD-89ab-CDEF-0123-456789ABCDEF", "0123abcd-89ab-cdef-0123-456789abcdef"},
		{"00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000"},
		{"11111111111111111111111111111111", ""},
		{"11111111-1111-1111-1111-11111111111", ""},
		{"11111111-1111-1111-1111-1111111111111", ""},
		{"1111111g-1111-1111-1111-111111111111", ""},
		{"11111111_1111-1111-1111-111111111111", ""},
		{"", ""},
	} {
		u, err := ParseUUID(c.in)
		switch {
		case c.want == "" && (err == nil || !errors.Is(err, ErrConfig)):
			t.Errorf("ParseUUID(%q) = %v, %v: want a refusal", c.in, u, err)
		case c.want != "" && err != nil:
			t.Errorf("ParseUUID(%q): %v", c.in, err)
		case c.want != "" && u.String() != c.want:
			t.Errorf("ParseUUID(%q).String() = %q, want %q", c.in, u, c.want)
		}
	}
	u, _ := ParseUUID("01020304-0506-0708-090a-0b0c0d0e0f10")
	if u != (UUID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}) {
		t.Fatalf("bytes %v", u)
	}
	if !(UUID{}).IsZero() || u.IsZero() {
		t.Fatal("IsZero")
	}
}

// The UUID is the guest's but not part of its identity (ID): guests that
// differ only in UUID can migrate into each other.
func TestBuiltinUUID(t *testing.T) {
	u, _ := ParseUUID("11111111-1111-1111-1111-111111111111")
	a, err := NewDestination(Config{Size: 1 << 20, UUID: u})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := NewDestination(Config{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got, ok := UUIDOf(a); !ok || got != u {
		t.Fatalf("UUIDOf(a) = %v, %v", got, ok)
	}
	if _, ok := UUIDOf(b); ok {
		t.Fatal("a guest without UUID reports one")
	}
	if a.ID() != b.ID() || strings.Contains(a.ID(), "1111") {
		t.Fatalf("the UUID changed the guest's ID: %q vs %q", a.ID(), b.ID())
	}
}

func FuzzParseUUID(f *testing.F) {
	f.Add("11111111-1111-1111-1111-111111111111")
	f.Add("0123ABCD-89ab-CDEF-0123-456789ABCDEF")
	f.Add("zz")
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseUUID(s)
		if err != nil {
			return
		}
		// Whatever parses prints canonically and parses back to itself.
		if !strings.EqualFold(u.String(), s) {
			t.Fatalf("%q parsed, prints %q", s, u)
		}
		if v, err := ParseUUID(u.String()); err != nil || v != u {
			t.Fatalf("%q does not round-trip: %v %v", u, v, err)
		}
	})
}
