package spec

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestNormalize(t *testing.T) {
	u8 := &Parameter{Name: "multifd-channels", Type: TypeUint8, Validate: "min=1,max=255"}
	u32 := &Parameter{Name: "x-checkpoint-delay", Type: TypeUint32}
	u64 := &Parameter{Name: "downtime-limit", Type: TypeUint64, Validate: "max=2000000"}
	size := &Parameter{Name: "xbzrle-cache-size", Type: TypeSize, Validate: "pow2,min=4096"}
	bw := &Parameter{Name: "max-bandwidth", Type: TypeSize}
	b := &Parameter{Name: "direct-io", Type: TypeBool}
	str := &Parameter{Name: "tls-creds", Type: TypeString}
	enum := &Parameter{Name: "mode", Type: TypeEnum, Values: []string{"normal", "cpr-reboot"}}
	for _, c := range []struct {
		p    *Parameter
		in   any
		want string // "" with bad set: an error
		bad  string // substring of the error
	}{
		{p: u8, in: "2", want: "2"},
		{p: u8, in: 255, want: "255"},
		{p: u8, in: json.Number("7"), want: "7"},
		{p: u8, in: float64(9), want: "9"},
		{p: u8, in: "0x10", want: "16"},
		{p: u8, in: 0, bad: "0 is out of range (min=1,max=255)"},
		{p: u8, in: 256, bad: "256 does not fit a uint8"},
		{p: u8, in: -1, bad: "want a non-negative integer, got -1"},
		{p: u8, in: 1.5, bad: "want a non-negative integer, got 1.5"},
		{p: u8, in: "2K", bad: `want a non-negative integer, got "2K"`}, // suffixes are for sizes
		{p: u8, in: true, bad: "want an integer, got bool true"},
		{p: u8, in: nil, bad: "want an integer, got null"},
		{p: u32, in: uint64(1 << 32), bad: "does not fit a uint32"},
		{p: u32, in: int64(1<<32 - 1), want: "4294967295"},
		{p: u64, in: "2000000", want: "2000000"},
		{p: u64, in: "2000001", bad: "out of range (max=2000000)"},
		{p: u64, in: "18446744073709551615", bad: "out of range"},
		{p: u64, in: "18446744073709551616", bad: "want a non-negative integer"},
		{p: size, in: "64M", want: "67108864"},
		{p: size, in: "1GiB", want: "1073741824"},
		{p: size, in: "4k", want: "4096"},
		{p: size, in: "4097", bad: "out of range (pow2,min=4096)"},
		{p: size, in: "2048", bad: "out of range"},
		{p: size, in: "0", bad: "out of range"},
		{p: bw, in: "16777216T", bad: "too large"},
		{p: bw, in: "1T", want: "1099511627776"},
		{p: b, in: true, want: "true"},
		{p: b, in: "on", want: "true"},
		{p: b, in: "No", want: "false"},
		{p: b, in: "maybe", bad: `want a boolean, got string "maybe"`},
		{p: b, in: 1, bad: "want a boolean"},
		{p: str, in: "", want: ""},
		{p: str, in: "tls0", want: "tls0"},
		{p: str, in: 5, bad: "want a string, got int 5"},
		{p: enum, in: "cpr-reboot", want: "cpr-reboot"},
		{p: enum, in: "Normal", bad: `"Normal" is not one of normal, cpr-reboot`},
		{p: enum, in: false, bad: "want a string"},
	} {
		got, err := c.p.Normalize(c.in)
		if c.bad != "" {
			if err == nil {
				t.Errorf("%s.Normalize(%#v) = %q, want an error with %q", c.p.Name, c.in, got, c.bad)
				continue
			}
			if !errors.Is(err, ErrBadValue) || !strings.Contains(err.Error(), c.bad) || !strings.Contains(err.Error(), c.p.Name) {
				t.Errorf("%s.Normalize(%#v): error %q, want ErrBadValue naming the parameter and %q", c.p.Name, c.in, err, c.bad)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s.Normalize(%#v) = %q, %v; want %q", c.p.Name, c.in, got, err, c.want)
		}
	}
}

func TestRange(t *testing.T) {
	for _, c := range []struct {
		p    Parameter
		want string
	}{
		{Parameter{Type: TypeUint8, Validate: "min=1,max=255"}, "uint8 with min=1,max=255"},
		{Parameter{Type: TypeSize}, "any size"},
		{Parameter{Type: TypeBool}, "any bool"},
		{Parameter{Type: TypeString}, "any string"},
		{Parameter{Type: TypeEnum, Values: []string{"none", "zlib"}}, "one of none, zlib"},
	} {
		if got := c.p.Range(); got != c.want {
			t.Errorf("Range of %+v = %q, want %q", c.p, got, c.want)
		}
	}
}

func TestValue(t *testing.T) {
	p := &Parameter{Type: TypeUint64}
	if v := p.Value("300"); v != uint64(300) {
		t.Errorf("Value = %#v", v)
	}
	if v := (&Parameter{Type: TypeBool}).Value("true"); v != true {
		t.Errorf("Value = %#v", v)
	}
	if v := (&Parameter{Type: TypeEnum}).Value("zlib"); v != "zlib" {
		t.Errorf("Value = %#v", v)
	}
}

// TestDefaultParametersNormalize checks that every default of the default
// spec is already in canonical form, so a fresh configuration and one that
// was set to the defaults compare equal.
func TestDefaultParametersNormalize(t *testing.T) {
	s := loadDefault(t)
	for i := range s.Parameters {
		p := &s.Parameters[i]
		got, err := p.Normalize(p.Default)
		if err != nil || got != p.Default {
			t.Errorf("%s: default %q normalises to %q, %v", p.Name, p.Default, got, err)
		}
	}
}
