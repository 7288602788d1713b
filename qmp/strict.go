package qmp

// JSON input, read as strictly as QEMU reads it.
//
// QEMU's monitor splits its input with a lexer (qobject/json-lexer.c), a
// streamer that counts brackets (json-streamer.c) and a parser
// (json-parser.c). This file does the same job in two steps:
//
//   - framer.next splits the byte stream into top-level values and catches
//     lexical errors at once, as QEMU's lexer does: a control character
//     (U+0000–U+001F) or the impossible UTF-8 bytes 0xFE/0xFF inside a
//     string, a byte that cannot appear in JSON outside a string, a stray
//     closing bracket, and nesting deeper than maxNesting;
//   - checkJSON checks one framed value against RFC 8259 with QEMU's extra
//     rules: no duplicate keys in any object, valid UTF-8 without
//     noncharacters or surrogates, \u escapes that name valid characters.
//
// Error texts are QEMU's ("JSON parse error, duplicate key", …), with
// migctl's detail after a colon where it helps. QEMU's single-quoted
// strings and \' escape are not accepted (encoding/json could not decode
// them afterwards).
//
// Resynchronisation. After a lexical error, or after a top-level value that
// is not an object (which QMP refuses anyway), the framer discards input up
// to the next '{' and starts again there. So one malformed input
// gets one error reply, however long it is: a megabyte of ']' is one
// error, not a million. The rule is one reply per object, plus at most one
// error per run of bytes between objects. A lexical error ends the
// broken value where QEMU's lexer ends it (at the control character), so an
// unterminated string no longer swallows the requests that follow; QEMU's
// documented way to reset its parser (send a control character other than
// \t, \r, \n, or the byte 0xFF) works here too. A value nested deeper than
// maxNesting is skipped up to the end of that value (its brackets
// balance), a lexical error, or the request size limit, whichever comes
// first, as QEMU's newer streamer does: requests inside an unclosed deep
// value are part of it. A value whose brackets never balance and that
// contains no lexical error is bounded by the request size limit, after
// which the connection is closed, as before.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/migctl/migctl/internal/safe"
)

// maxNesting bounds the nesting of arrays and objects in a request: QEMU's
// MAX_NESTING (1 << 10, qobject/json-streamer.c). Depth 1024 is accepted,
// 1025 is refused.
const maxNesting = 1024

// maxToken bounds the part of a bad token quoted in an error message.
const maxToken = 40

// errTooLarge: a request exceeded the size bound.
var errTooLarge = errors.New("request too large")

// syntaxError is a JSON parse error: the request is answered with it and
// no id.
type syntaxError struct{ msg string }

func (e *syntaxError) Error() string { return e.msg }

func parseErrorf(format string, args ...any) *syntaxError {
	return &syntaxError{msg: "JSON parse error, " + fmt.Sprintf(format, args...)}
}

// stray is QEMU's lexical error: "JSON parse error, stray '<token>'", the
// token being what was read of the bad token, offending byte included.
func stray(tok []byte, detail string) *syntaxError {
	e := parseErrorf("stray '%s'", safe.Printable(string(tok), maxToken))
	if detail != "" {
		e.msg += ": " + detail
	}
	return e
}

func nestingError() *syntaxError {
	return &syntaxError{msg: fmt.Sprintf("JSON nesting depth limit exceeded: arrays and objects nest at most %d deep", maxNesting)}
}

// strayInString is the lexical error for byte c ending a string early.
func strayInString(tok []byte, c byte) *syntaxError {
	if c >= 0xfe {
		return stray(tok, fmt.Sprintf("byte 0x%02x is never valid UTF-8", c))
	}
	return stray(tok, fmt.Sprintf("a raw control character (U+%04X) in a string; write it escaped (\\u%04x)", c, c))
}

// framer splits a byte stream into top-level JSON values, as QEMU's lexer
// and streamer do: objects and arrays end when their brackets balance
// (outside strings), scalars at whitespace or a bracket. Requests need no
// trailing newline (go-qemu sends none), and one request can make the
// server hold at most max bytes. A framer belongs to the goroutine reading
// one connection.
type framer struct {
	r   *bufio.Reader
	max int
	// resync is set after a JSON parse error or a top-level value that is
	// not an object: next first discards input up to the next '{'.
	resync bool
}

func newFramer(r io.Reader, max int) *framer {
	if max <= 0 {
		max = DefaultMaxRequest
	}
	return &framer{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// next returns the next value's bytes (a fresh slice), checked by
// checkJSON. Errors: io.EOF at a clean end (also while discarding after an
// error), io.ErrUnexpectedEOF inside a value, errTooLarge when a value
// exceeds the bound (the stream cannot be resynchronised then),
// *syntaxError for a JSON parse error (the caller answers it and may go
// on: the framer resynchronises), or a read error.
func (f *framer) next() ([]byte, error) {
	if f.resync {
		if err := f.skipToObject(); err != nil {
			return nil, err
		}
		f.resync = false
	}
	raw, err := f.value()
	var se *syntaxError
	switch {
	case errors.As(err, &se):
		f.resync = true
		return nil, err
	case err != nil:
		return nil, err
	}
	// A value that is not an object gets one error and the input after
	// it up to the next '{' gets none. An object that fails checkJSON was
	// framed in step (its brackets balance), so what follows it is read
	// normally.
	if raw[0] != '{' {
		f.resync = true
	}
	if err := checkJSON(raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// skipToObject discards input up to (not including) the next '{'.
func (f *framer) skipToObject() error {
	for {
		b, err := f.r.Peek(1)
		if err != nil {
			return err
		}
		if b[0] == '{' {
			return nil
		}
		// Discard a whole buffered run at once.
		n := f.r.Buffered()
		buf, _ := f.r.Peek(n)
		if i := bytes.IndexByte(buf, '{'); i >= 0 {
			n = i
		}
		if _, err := f.r.Discard(n); err != nil {
			return err
		}
	}
}

// outsideByte reports whether c may appear in a JSON value outside a
// string: structure, whitespace, and the characters of numbers and of
// QEMU's keywords ([a-z]+).
func outsideByte(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		return true
	}
	switch c {
	case '{', '}', '[', ']', ',', ':', '"', ' ', '\t', '\r', '\n', '-', '+', '.', 'E':
		return true
	}
	return false
}

// value frames one top-level value.
func (f *framer) value() ([]byte, error) {
	var buf []byte
	depth := 0
	inStr, esc, scalar := false, false, false
	strStart := 0
	for {
		c, err := f.r.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				if scalar && !inStr {
					return buf, nil
				}
				if len(buf) > 0 {
					return nil, io.ErrUnexpectedEOF
				}
			}
			return nil, err
		}
		if len(buf) >= f.max {
			return nil, errTooLarge
		}
		if inStr {
			buf = append(buf, c)
			switch {
			case c < 0x20 || c >= 0xfe:
				return nil, strayInString(buf[strStart:], c)
			case esc:
				esc = false
			case c == '\\':
				esc = true
			case c == '"':
				inStr = false
				if scalar {
					return buf, nil
				}
			}
			continue
		}
		if len(buf) == 0 {
			switch c {
			case ' ', '\t', '\r', '\n':
				continue
			}
		}
		if scalar {
			// A top-level number or keyword: it ends at whitespace or
			// structure, which belongs to what follows.
			switch c {
			case ' ', '\t', '\r', '\n':
				return buf, nil
			case '{', '[', '}', ']', '"', ',', ':':
				_ = f.r.UnreadByte()
				return buf, nil
			}
			if !outsideByte(c) {
				return nil, stray(append(buf, c), strayDetail(c))
			}
			buf = append(buf, c)
			continue
		}
		if !outsideByte(c) {
			return nil, stray([]byte{c}, strayDetail(c))
		}
		switch c {
		case '"':
			inStr, strStart = true, len(buf)
			scalar = depth == 0
		case '{', '[':
			depth++
			if depth > maxNesting {
				f.skipValue(depth)
				return nil, nestingError()
			}
		case '}', ']':
			if depth == 0 {
				return nil, parseErrorf("expecting value")
			}
			depth--
		case ',', ':':
			if depth == 0 {
				return nil, parseErrorf("expecting value")
			}
		case ' ', '\t', '\r', '\n':
		default:
			scalar = depth == 0
		}
		buf = append(buf, c)
		if depth == 0 && !scalar {
			return buf, nil
		}
	}
}

func strayDetail(c byte) string {
	if c == '\'' {
		return "single-quoted strings are not accepted: use double quotes"
	}
	return ""
}

// skipValue consumes the rest of a value nested depth deep, bounded by the
// size limit, and stops early at a lexical error (resynchronisation then
// takes over), so that a deep value costs one error.
func (f *framer) skipValue(depth int) {
	inStr, esc := false, false
	for n := 0; depth > 0 && n < f.max; n++ {
		c, err := f.r.ReadByte()
		if err != nil {
			return
		}
		switch {
		case inStr && (c < 0x20 || c >= 0xfe):
			return
		case inStr && esc:
			esc = false
		case inStr && c == '\\':
			esc = true
		case inStr && c == '"':
			inStr = false
		case inStr:
		case !outsideByte(c):
			return
		case c == '"':
			inStr = true
		case c == '{' || c == '[':
			depth++
		case c == '}' || c == ']':
			depth--
		}
	}
}

// checkJSON reports whether b is exactly one JSON value (with optional
// whitespace around it) that QEMU's parser would accept, with QEMU's error
// text when not.
func checkJSON(b []byte) error {
	c := checker{b: b}
	c.ws()
	if err := c.value(); err != nil {
		return err
	}
	c.ws()
	if c.pos < len(c.b) {
		return c.strayHere()
	}
	return nil
}

// checker walks one value; pos is the next byte to read.
type checker struct {
	b     []byte
	pos   int
	depth int
	buf   []byte // scratch for decoding object keys
}

const eoi = -1

func (c *checker) peek() int {
	if c.pos >= len(c.b) {
		return eoi
	}
	return int(c.b[c.pos])
}

func (c *checker) ws() {
	for c.pos < len(c.b) {
		switch c.b[c.pos] {
		case ' ', '\t', '\r', '\n':
			c.pos++
		default:
			return
		}
	}
}

func premature() error { return parseErrorf("premature EOI") }

// strayHere reports the byte at pos as a lexical error.
func (c *checker) strayHere() error {
	ch := c.b[c.pos]
	return stray([]byte{ch}, strayDetail(ch))
}

func (c *checker) value() error {
	switch ch := c.peek(); {
	case ch == eoi:
		return premature()
	case ch == '{':
		return c.object()
	case ch == '[':
		return c.array()
	case ch == '"':
		_, err := c.str(false)
		return err
	case ch == '-' || (ch >= '0' && ch <= '9'):
		return c.number()
	case ch >= 'a' && ch <= 'z':
		return c.keyword()
	case ch == '}' || ch == ']' || ch == ',' || ch == ':':
		return parseErrorf("expecting value")
	default:
		return c.strayHere()
	}
}

func (c *checker) enter() error {
	c.depth++
	if c.depth > maxNesting {
		return nestingError()
	}
	c.pos++
	return nil
}

func (c *checker) object() error {
	if err := c.enter(); err != nil {
		return err
	}
	c.ws()
	if c.peek() == '}' {
		c.pos++
		c.depth--
		return nil
	}
	var keys keySet
	for {
		c.ws()
		switch c.peek() {
		case eoi:
			return premature()
		case '"':
		default:
			// QEMU parses a value and then complains it is not a key;
			// an error inside that value comes first.
			if err := c.value(); err != nil {
				return err
			}
			return parseErrorf("key is not a string in object")
		}
		key, err := c.str(true)
		if err != nil {
			return err
		}
		c.ws()
		switch c.peek() {
		case eoi:
			return premature()
		case ':':
			c.pos++
		default:
			return parseErrorf("missing : in object pair")
		}
		c.ws()
		if err := c.value(); err != nil {
			return err
		}
		if !keys.add(key) {
			return parseErrorf("duplicate key: '%s' appears more than once in one object", safe.Printable(key, maxToken))
		}
		c.ws()
		switch c.peek() {
		case ',':
			c.pos++
		case '}':
			c.pos++
			c.depth--
			return nil
		case eoi:
			return premature()
		default:
			return parseErrorf("expected separator in dict")
		}
	}
}

func (c *checker) array() error {
	if err := c.enter(); err != nil {
		return err
	}
	c.ws()
	if c.peek() == ']' {
		c.pos++
		c.depth--
		return nil
	}
	for {
		c.ws()
		if err := c.value(); err != nil {
			return err
		}
		c.ws()
		switch c.peek() {
		case ',':
			c.pos++
		case ']':
			c.pos++
			c.depth--
			return nil
		case eoi:
			return premature()
		default:
			return parseErrorf("expected separator in list")
		}
	}
}

// keySet holds the keys seen in one object: a slice while small, a map
// when an object has many members.
type keySet struct {
	list []string
	m    map[string]struct{}
}

func (k *keySet) add(key string) bool {
	if k.m != nil {
		if _, dup := k.m[key]; dup {
			return false
		}
		k.m[key] = struct{}{}
		return true
	}
	for _, s := range k.list {
		if s == key {
			return false
		}
	}
	k.list = append(k.list, key)
	if len(k.list) > 16 {
		k.m = make(map[string]struct{}, 2*len(k.list))
		for _, s := range k.list {
			k.m[s] = struct{}{}
		}
		k.list = nil
	}
	return true
}

// validRune is QEMU's is_valid_codepoint: in range, not a surrogate, not
// one of Unicode's 66 noncharacters.
func validRune(r rune) bool {
	switch {
	case r < 0 || r > 0x10ffff:
		return false
	case r >= 0xd800 && r <= 0xdfff:
		return false
	case r >= 0xfdd0 && r <= 0xfdef, r&0xfffe == 0xfffe:
		return false
	}
	return true
}

func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, ch := range b[:4] {
		r <<= 4
		switch {
		case ch >= '0' && ch <= '9':
			r |= rune(ch - '0')
		case ch >= 'a' && ch <= 'f':
			r |= rune(ch-'a') + 10
		case ch >= 'A' && ch <= 'F':
			r |= rune(ch-'A') + 10
		default:
			return 0, false
		}
	}
	return r, true
}

// str checks the string at pos and, if decode is set, returns its value.
func (c *checker) str(decode bool) (string, error) {
	start := c.pos
	c.pos++ // opening quote
	c.buf = c.buf[:0]
	for {
		if c.pos >= len(c.b) {
			return "", premature()
		}
		ch := c.b[c.pos]
		switch {
		case ch == '"':
			c.pos++
			if !decode {
				return "", nil
			}
			return string(c.buf), nil
		case ch < 0x20 || ch >= 0xfe:
			return "", strayInString(c.b[start:c.pos+1], ch)
		case ch == '\\':
			if c.pos+1 >= len(c.b) {
				return "", premature()
			}
			esc := c.b[c.pos+1]
			var out byte
			switch esc {
			case '"', '\\', '/':
				out = esc
			case 'b':
				out = '\b'
			case 'f':
				out = '\f'
			case 'n':
				out = '\n'
			case 'r':
				out = '\r'
			case 't':
				out = '\t'
			case 'u':
				r, n, err := c.unicodeEscape()
				if err != nil {
					return "", err
				}
				if decode {
					c.buf = utf8.AppendRune(c.buf, r)
				}
				c.pos += n
				continue
			default:
				return "", parseErrorf("invalid escape sequence in string")
			}
			if decode {
				c.buf = append(c.buf, out)
			}
			c.pos += 2
		case ch < 0x80:
			if decode {
				c.buf = append(c.buf, ch)
			}
			c.pos++
		default:
			r, size := utf8.DecodeRune(c.b[c.pos:])
			if (r == utf8.RuneError && size == 1) || !validRune(r) {
				return "", parseErrorf("invalid UTF-8 sequence in string")
			}
			if decode {
				c.buf = append(c.buf, c.b[c.pos:c.pos+size]...)
			}
			c.pos += size
		}
	}
}

// unicodeEscape decodes the \uXXXX (or surrogate pair \uXXXX\uXXXX) at pos
// as QEMU's parse_string does, returning the character and the bytes used.
func (c *checker) unicodeEscape() (rune, int, error) {
	rest := c.b[c.pos:]
	bad := func(n int) error {
		n = min(n, len(rest))
		return parseErrorf("%s is not a valid Unicode character", safe.Printable(string(rest[:n]), maxToken))
	}
	r, ok := hex4(rest[2:])
	if !ok {
		if len(rest) < 6 {
			return 0, 0, premature()
		}
		return 0, 0, bad(6)
	}
	n := 6
	if r >= 0xd800 && r <= 0xdbff && len(rest) >= 8 && rest[6] == '\\' && rest[7] == 'u' {
		low, ok := hex4(rest[8:])
		if ok && low >= 0xdc00 && low <= 0xdfff {
			r = 0x10000 + (r-0xd800)<<10 + (low - 0xdc00)
			n = 12
		} else {
			return 0, 0, bad(6)
		}
	}
	if !validRune(r) {
		return 0, 0, bad(n)
	}
	return r, n, nil
}

// number checks an RFC 8259 number; a malformed one is a lexical error
// naming what was read, offending byte included.
func (c *checker) number() error {
	start := c.pos
	fail := func() error {
		end := min(c.pos+1, len(c.b))
		if end == len(c.b) && c.pos == len(c.b) {
			return premature()
		}
		return stray(c.b[start:end], "")
	}
	digit := func() bool { return c.pos < len(c.b) && c.b[c.pos] >= '0' && c.b[c.pos] <= '9' }
	if c.peek() == '-' {
		c.pos++
	}
	switch {
	case c.peek() == '0':
		c.pos++
	case digit():
		for digit() {
			c.pos++
		}
	default:
		return fail()
	}
	if c.peek() == '.' {
		c.pos++
		if !digit() {
			return fail()
		}
		for digit() {
			c.pos++
		}
	}
	if ch := c.peek(); ch == 'e' || ch == 'E' {
		c.pos++
		if ch := c.peek(); ch == '+' || ch == '-' {
			c.pos++
		}
		if !digit() {
			return fail()
		}
		for digit() {
			c.pos++
		}
	}
	if digit() { // 01: a leading zero followed by digits
		return fail()
	}
	return nil
}

func (c *checker) keyword() error {
	start := c.pos
	for c.pos < len(c.b) && c.b[c.pos] >= 'a' && c.b[c.pos] <= 'z' {
		c.pos++
	}
	switch kw := string(c.b[start:c.pos]); kw {
	case "true", "false", "null":
		return nil
	default:
		return parseErrorf("invalid keyword '%s'", safe.Printable(kw, maxToken))
	}
}

// safeID returns id if it can be echoed in a reply (strict JSON, hence
// valid UTF-8), else nil: a reply is always valid JSON. Requests whose id
// is not strict JSON never get this far (they are parse errors, answered
// without id); this guards every other path.
func safeID(id json.RawMessage) json.RawMessage {
	if id == nil || checkJSON(id) != nil {
		return nil
	}
	return id
}
