package safe

import (
	"fmt"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestPrintable(t *testing.T) {
	cases := []struct {
		name string
		in   string
		max  int
		want string
	}{
		{"plain", "tcp:127.0.0.1:4444", 64, "tcp:127.0.0.1:4444"},
		{"unicode kept", "gäst-é-名前", 64, "gäst-é-名前"},
		{"backslash kept", `CN=a\,b`, 64, `CN=a\,b`},
		{"newline", "a\nb", 64, `a\nb`},
		{"tab and cr", "a\tb\rc", 64, `a\tb\rc`},
		{"terminal escape", "\x1b[31mred\x1b[0m", 64, `\x1b[31mred\x1b[0m`},
		{"nul and del", "a\x00b\x7f", 64, `a\x00b\x7f`},
		{"invalid utf-8", "a\xffb\xc3", 64, `a\xffb\xc3`},
		{"bidi override", "abc\u202edcba", 64, `abc\u202edcba`},
		{"zero width space", "a\u200bb", 64, `a\u200bb`},
		{"non-ascii space", "a\u00a0b", 64, `a\u00a0b`},
		{"private use plane 15", "a\U000f0000b", 64, `a\U000f0000b`},
		{"cut with ellipsis", strings.Repeat("x", 40), 20, strings.Repeat("x", 17) + "..."},
		{"exactly fits", strings.Repeat("x", 20), 20, strings.Repeat("x", 20)},
		{"escape not split", strings.Repeat("x", 15) + "\n" + strings.Repeat("y", 10), 20, strings.Repeat("x", 15) + `\n...`},
		{"escape that would cross the bound", strings.Repeat("x", 16) + "\x1bzzzzzzzzzz", 20, strings.Repeat("x", 16) + "..."},
		{"multibyte not split", strings.Repeat("x", 16) + "名名名名", 20, strings.Repeat("x", 16) + "..."},
		{"escaped rest fits exactly", strings.Repeat("x", 16) + "\n\n", 20, strings.Repeat("x", 16) + `\n\n`},
		{"tiny bound raised to 16", strings.Repeat("x", 40), 1, strings.Repeat("x", 13) + "..."},
		{"empty", "", 10, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Printable(tc.in, tc.max)
			if got != tc.want {
				t.Fatalf("Printable(%q, %d)\n got %q\nwant %q", tc.in, tc.max, got, tc.want)
			}
		})
	}
}

func TestPrintableHugeInputIsBounded(t *testing.T) {
	in := strings.Repeat("\x1b[2J", 1<<18) // 1 MiB of clear-screen
	got := Printable(in, 256)
	if len(got) > 256 || !strings.HasSuffix(got, Ellipsis) || strings.ContainsRune(got, 0x1b) {
		t.Fatalf("Printable of 1 MiB: %d bytes, %q", len(got), got[:min(len(got), 80)])
	}
}

// FuzzPrintable: whatever the input, the output is valid UTF-8, within the
// bound, free of control and format characters, and equal to the input when
// the input is short printable text.
func FuzzPrintable(f *testing.F) {
	for _, s := range []string{"", "abc", "a\nb", "\x1b[0m", "\xff\xfe", "\u202e", "名前", strings.Repeat("é", 30)} {
		f.Add(s, 20)
	}
	f.Fuzz(func(t *testing.T, s string, n int) {
		if n > 1<<20 || n < -1<<20 {
			n %= 1 << 20
		}
		got := Printable(s, n)
		bound := max(n, minMax)
		if len(got) > bound {
			t.Fatalf("len %d > bound %d: %q", len(got), bound, got)
		}
		if !utf8.ValidString(got) {
			t.Fatalf("invalid UTF-8 out: %q", got)
		}
		for _, r := range got {
			if r != ' ' && !unicode.IsGraphic(r) {
				t.Fatalf("non-printable %U in output %q", r, got)
			}
			if unicode.Is(unicode.Cf, r) || unicode.Is(unicode.Co, r) {
				t.Fatalf("format or private-use %U in output %q", r, got)
			}
		}
		if len(s) <= bound && isPlain(s) && got != s {
			t.Fatalf("plain input changed: %q -> %q", s, got)
		}
		if !strings.HasSuffix(got, Ellipsis) && len(s) > 0 && len(got) < len(s) && isPlain(s) {
			t.Fatalf("shortened without ellipsis: %q -> %q", s, got)
		}
	})
}

// Printable makes a hostile guest ID fit an error reply.
func ExamplePrintable() {
	guestID := "vm-7\x1b]0;owned\x07" + strings.Repeat("A", 900_000)
	fmt.Println(Printable(guestID, 40))
	// Output: vm-7\x1b]0;owned\x07AAAAAAAAAAAAAAAAA...
}
