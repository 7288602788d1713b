// Package safe makes text that came from a peer safe to show: in a QMP
// error's desc, in an event, in a log line or on a terminal.
//
// A peer (a QMP client, a migration source, a certificate's subject) can
// send text of any length with any bytes in it: invalid UTF-8, terminal
// escape sequences (ESC [ …), bidirectional overrides that make a line read
// differently from what it says, or a 900 KB guest ID that becomes a 900 KB
// error reply. Every such string goes through [Printable] before it is
// copied into something a person or another program reads.
//
// The package is named for what its result is (safe.Printable(id, 64)
// reads as "a safe, printable form of id"); it holds nothing but such
// conversions of untrusted text, so it does not become a utility bag.
package safe

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// Ellipsis marks where Printable cut its input short.
const Ellipsis = "..."

// minMax is the smallest output bound Printable honours: room for one
// escape sequence and the ellipsis.
const minMax = 16

// Printable returns s bounded and made printable:
//
//   - the result is valid UTF-8 and at most max bytes long (max is raised
//     to 16 if smaller); when s does not fit, the result ends in
//     [Ellipsis] and is cut at a character or escape boundary;
//   - printable characters (letters, marks, numbers, punctuation, symbols
//     and the ASCII space, as [strconv.IsPrint] says) are kept as they are,
//     including backslashes, so ordinary text is unchanged;
//   - everything else is written as a Go escape: \n, \r, \t, \xNN for other
//     control bytes and for each byte of invalid UTF-8, \uNNNN or
//     \UNNNNNNNN for other non-printable characters (format characters
//     such as U+202E RIGHT-TO-LEFT OVERRIDE, U+200B ZERO WIDTH SPACE,
//     non-ASCII spaces, private-use characters).
//
// The result is for people to read. Backslashes are not escaped, so it is
// not always reversible: a literal backslash-n in s looks like an escaped
// newline.
func Printable(s string, max int) string {
	if max < minMax {
		max = minMax
	}
	if len(s) <= max && isPlain(s) {
		return s
	}
	var b strings.Builder
	b.Grow(min(len(s), max))
	budget := max - len(Ellipsis)
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		var piece string
		switch {
		case r == utf8.RuneError && size == 1:
			piece = `\x` + hex2(s[i])
		case r == '\n':
			piece = `\n`
		case r == '\r':
			piece = `\r`
		case r == '\t':
			piece = `\t`
		case r < 0x20 || r == 0x7f:
			piece = `\x` + hex2(byte(r))
		case strconv.IsPrint(r):
			piece = s[i : i+size]
		case r <= 0xffff:
			piece = `\u` + hexN(uint32(r), 4)
		default:
			piece = `\U` + hexN(uint32(r), 8)
		}
		// The whole rest fits without an ellipsis: take it and stop
		// worrying about the marker.
		if b.Len()+len(piece) > budget {
			if b.Len()+len(piece)+restLen(s[i+size:]) <= max {
				b.WriteString(piece)
				i += size
				continue
			}
			b.WriteString(Ellipsis)
			return b.String()
		}
		b.WriteString(piece)
		i += size
	}
	return b.String()
}

// isPlain reports whether s is valid UTF-8 made only of printable
// characters, so Printable returns it unchanged when it fits.
func isPlain(s string) bool {
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c < 0x7f {
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && size == 1) || !strconv.IsPrint(r) {
			return false
		}
		i += size
	}
	return true
}

// restLen is how long the rest of s would be once escaped, or a large
// number when that is clearly too long to matter.
func restLen(s string) int {
	if len(s) > 1<<16 {
		return len(s)
	}
	n := 0
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			n += 4
		case r == '\n' || r == '\r' || r == '\t':
			n += 2
		case r < 0x20 || r == 0x7f:
			n += 4
		case strconv.IsPrint(r):
			n += size
		case r <= 0xffff:
			n += 6
		default:
			n += 10
		}
		i += size
	}
	return n
}

const hexDigits = "0123456789abcdef"

func hex2(c byte) string { return string([]byte{hexDigits[c>>4], hexDigits[c&0xf]}) }

func hexN(v uint32, n int) string {
	out := make([]byte, n)
	for i := n - 1; i >= 0; i-- {
		out[i] = hexDigits[v&0xf]
		v >>= 4
	}
	return string(out)
}
