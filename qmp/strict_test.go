package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/migctl/migctl/machine"
)

// streamServer is a server over a real controller and a host that does
// nothing, for feeding byte streams to serveStream without sockets.
func streamServer(t testing.TB) *Server {
	t.Helper()
	c, err := machine.New(testSpec(t), machine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(c, noopHost{}, Options{MaxRequest: 64 << 10})
	t.Cleanup(func() { s.Close(); c.Close() })
	return s
}

// feed runs one connection's worth of input through the server's request
// path and returns every message it would send (after the greeting).
func feed(s *Server, in []byte, negotiated bool) [][]byte {
	cl := &client{s: s}
	cl.negotiated.Store(negotiated)
	var out [][]byte
	_ = s.serveStream(bytes.NewReader(in), cl, func(b []byte) bool {
		out = append(out, b)
		return true
	})
	return out
}

// strictReply checks a server message independently of strict.go: one
// CRLF-terminated line, valid UTF-8, valid JSON with no duplicate key in
// any object (walked with encoding/json's tokenizer), and either a return
// or an error.
func strictReply(m []byte) (rawReply, error) {
	var r rawReply
	if !bytes.HasSuffix(m, []byte("\r\n")) || bytes.Count(m, []byte("\n")) != 1 {
		return r, fmt.Errorf("not one CRLF line: %q", m)
	}
	if !utf8.Valid(m) {
		return r, fmt.Errorf("invalid UTF-8: %q", m)
	}
	if !json.Valid(m) {
		return r, fmt.Errorf("invalid JSON: %q", m)
	}
	if err := noDuplicateKeys(json.NewDecoder(bytes.NewReader(m))); err != nil {
		return r, fmt.Errorf("%v: %q", err, m)
	}
	if err := json.Unmarshal(m, &r); err != nil {
		return r, err
	}
	if (r.Return == nil) == (r.Error == nil) {
		return r, fmt.Errorf("neither a return nor an error: %q", m)
	}
	if r.Error != nil && (r.Error.Desc == "" || len(r.Error.Desc) > MaxDesc) {
		return r, fmt.Errorf("bad desc (%d bytes): %q", len(r.Error.Desc), m)
	}
	return r, nil
}

// noDuplicateKeys walks one JSON value token by token.
func noDuplicateKeys(d *json.Decoder) error {
	tok, err := d.Token()
	if err != nil {
		return err
	}
	delim, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	switch delim {
	case '{':
		seen := map[string]bool{}
		for d.More() {
			k, err := d.Token()
			if err != nil {
				return err
			}
			key := k.(string)
			if seen[key] {
				return fmt.Errorf("duplicate key %q", key)
			}
			seen[key] = true
			if err := noDuplicateKeys(d); err != nil {
				return err
			}
		}
	case '[':
		for d.More() {
			if err := noDuplicateKeys(d); err != nil {
				return err
			}
		}
	}
	_, err = d.Token() // closing delimiter
	return err
}

// TestStrictRejections: each kind of input QEMU's parser refuses is one
// GenericError with QEMU's wording (and migctl's detail after a colon),
// never an id, and nothing runs.
func TestStrictRejections(t *testing.T) {
	s := streamServer(t)
	deep := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	cases := []struct {
		name, in, desc string
	}{
		{"duplicate key in arguments (issue 12: exec ran)",
			`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","uri":"exec:touch /tmp/PWN"},"id":1}`,
			`JSON parse error, duplicate key: 'uri' appears more than once in one object`},
		{"duplicate key at the top", `{"execute":"query-status","execute":"quit"}`,
			`JSON parse error, duplicate key: 'execute' appears more than once in one object`},
		{"duplicate key spelt with an escape", `{"execute":"query-status","arguments":{"a":1,"\u0061":2}}`,
			`JSON parse error, duplicate key: 'a' appears more than once in one object`},
		{"duplicate key deep inside", `{"execute":"x","arguments":{"l":[{"k":1,"k":2}]}}`,
			`JSON parse error, duplicate key: 'k' appears more than once in one object`},
		{"control character in a string", "{\"execute\":\"query-status\",\"id\":\"a\x01b\"}",
			`JSON parse error, stray '"a\x01': a raw control character (U+0001) in a string; write it escaped (\u0001)`},
		{"raw newline in a string", "{\"execute\":\"query-status\",\"id\":\"ab\n\"}",
			`JSON parse error, stray '"ab\n': a raw control character (U+000A) in a string; write it escaped (\u000a)`},
		{"raw tab in a string", "{\"execute\":\"qu\tery\"}",
			`JSON parse error, stray '"qu\t': a raw control character (U+0009) in a string; write it escaped (\u0009)`},
		{"byte 0xff in a string", "{\"execute\":\"query-status\",\"id\":\"\xff\"}",
			`JSON parse error, stray '"\xff': byte 0xff is never valid UTF-8`},
		{"truncated UTF-8 sequence in id", "{\"execute\":\"query-status\",\"id\":\"\xc3(\"}",
			`JSON parse error, invalid UTF-8 sequence in string`},
		{"overlong NUL (QEMU's modified UTF-8, refused here)", "{\"execute\":\"query-status\",\"id\":\"\xc0\x80\"}",
			`JSON parse error, invalid UTF-8 sequence in string`},
		{"encoded surrogate", "{\"execute\":\"query-status\",\"id\":\"\xed\xa0\x80\"}",
			`JSON parse error, invalid UTF-8 sequence in string`},
		{"noncharacter U+FFFF", "{\"execute\":\"query-status\",\"id\":\"\xef\xbf\xbf\"}",
			`JSON parse error, invalid UTF-8 sequence in string`},
		{"lone surrogate escape", `{"execute":"query-status","id":"\ud800"}`,
			`JSON parse error, \ud800 is not a valid Unicode character`},
		{"surrogate pair with a bad low half", `{"execute":"query-status","id":"\ud800\u0041"}`,
			`JSON parse error, \ud800 is not a valid Unicode character`},
		{"noncharacter escape", `{"execute":"query-status","id":"\ufdd0"}`,
			`JSON parse error, \ufdd0 is not a valid Unicode character`},
		{"bad hex in an escape", `{"execute":"query-status","id":"\u12G4"}`,
			`JSON parse error, \u12G4 is not a valid Unicode character`},
		{"unknown escape", `{"execute":"query-status","id":"\x41"}`,
			`JSON parse error, invalid escape sequence in string`},
		{"QEMU's \\' escape is not accepted", `{"execute":"query-status","id":"\'"}`,
			`JSON parse error, invalid escape sequence in string`},
		{"nesting one deeper than QEMU's MAX_NESTING", deep(1025),
			`JSON nesting depth limit exceeded: arrays and objects nest at most 1024 deep`},
		{"nesting inside a request", `{"execute":"x","arguments":{"a":` + deep(1024) + `}}`,
			`JSON nesting depth limit exceeded: arrays and objects nest at most 1024 deep`},
		{"trailing comma", `{"execute":"query-status",}`, `JSON parse error, expecting value`},
		{"missing colon", `{"execute" "query-status"}`, `JSON parse error, missing : in object pair`},
		{"key not a string", `{1:"query-status"}`, `JSON parse error, key is not a string in object`},
		{"missing comma in an object", `{"execute":"query-status" "id":1}`, `JSON parse error, expected separator in dict`},
		{"missing comma in a list", `{"execute":"x","arguments":{"l":[1 2]}}`, `JSON parse error, expected separator in list`},
		{"unknown keyword", `{"execute":"x","id":nul}`, `JSON parse error, invalid keyword 'nul'`},
		{"leading zero", `{"execute":"x","id":01}`, `JSON parse error, stray '01'`},
		{"fraction without digits", `{"execute":"x","id":1.}`, `JSON parse error, stray '1.}'`},
		{"single quotes", `{'execute':'query-status'}`, `JSON parse error, stray ''': single-quoted strings are not accepted: use double quotes`},
		{"stray closing bracket", `]`, `JSON parse error, expecting value`},
		{"stray comma", `,`, `JSON parse error, expecting value`},
		{"stray byte", `@`, `JSON parse error, stray '@'`},
		{"escape sequence for the terminal", "\x1b[2J", `JSON parse error, stray '\x1b'`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := feed(s, []byte(tc.in), true)
			if len(out) != 1 {
				t.Fatalf("%d replies, want 1: %q", len(out), out)
			}
			r, err := strictReply(out[0])
			if err != nil {
				t.Fatal(err)
			}
			if r.Error == nil || r.Error.Class != ClassGenericError || r.Error.Desc != tc.desc {
				t.Fatalf("reply %s\nwant desc %s", out[0], tc.desc)
			}
			if r.ID != nil {
				t.Fatalf("a request that is not strict JSON must be answered without id: %s", out[0])
			}
		})
	}
	// Nothing ran: the duplicate-key migrate did not start a migration.
	if st, _ := s.c.State("outgoing"); st != "none" {
		t.Fatalf("outgoing state %s after rejected requests", st)
	}
}

// TestStrictAccepts: what QEMU accepts still works, at the limits.
func TestStrictAccepts(t *testing.T) {
	for _, in := range []string{
		`{}`, `[]`, `""`, `0`, `-0.5e+10`, `1E3`, `true`, `false`, `null`,
		`{"a":"\u00e9\n\"\\\/\b\f\r\t","b":[1,{"c":null}]}`,
		`"\ud83d\ude00"`,                                      // a surrogate pair
		"\"\xf0\x9f\x98\x80 é \\u0000\"",                      // raw UTF-8 and an escaped NUL
		strings.Repeat("[", 1024) + strings.Repeat("]", 1024), // exactly QEMU's MAX_NESTING
		" \t\r\n{\"a\":1} \n",
	} {
		if err := checkJSON([]byte(in)); err != nil {
			t.Errorf("checkJSON(%.60q): %v", in, err)
		}
	}
	// Many members: the key set switches to a map and still finds
	// duplicates.
	var b strings.Builder
	b.WriteString("{")
	for i := range 100 {
		fmt.Fprintf(&b, `"k%d":%d,`, i, i)
	}
	if err := checkJSON([]byte(b.String() + `"z":0}`)); err != nil {
		t.Fatalf("100 members: %v", err)
	}
	if err := checkJSON([]byte(b.String() + `"k57":0}`)); err == nil || !strings.Contains(err.Error(), "duplicate key: 'k57'") {
		t.Fatalf("duplicate among 100 members: %v", err)
	}
}

// TestOneErrorPerMalformedInput: however long a malformed input is, it
// gets one error, and the request after it is answered. The rule
// (strict.go): after a lexical error or a top-level value that is not an
// object, input is skipped up to the next '{'.
func TestOneErrorPerMalformedInput(t *testing.T) {
	s := streamServer(t)
	next := `{"execute":"query-status","id":"next"}`
	cases := []struct {
		name, in string
		errs     int
	}{
		{"1 MiB of ]", strings.Repeat("]", 1<<20), 1},
		{"1 MiB of a control byte", strings.Repeat("\x01", 1<<20), 1},
		{"1 MiB of invalid UTF-8", strings.Repeat("\xff", 1<<20), 1},
		{"1 MiB of non-objects", strings.Repeat("[1]", 1<<18), 1},
		{"junk of every kind", `nonsense ]]] ,,, :: 12 "s" [1] @@ 'x'`, 1},
		{"unterminated string ended by a newline", `{"execute":"query-status","id":"abc` + "\n", 1},
		{"unterminated string, request on the same line after a control byte", `{"execute":"query-status","id":"abc` + "\x01", 1},
		{"a byte JSON never has outside a string ends the request at once", `{"execute":@`, 1},
		{"QEMU's reset: half a request then a control byte", `{"execute":"query-sta` + "\x01", 1},
		{"QEMU's reset with 0xFF", `{"execute":"query-sta` + "\xff", 1},
		{"deep array", strings.Repeat("[", 5000) + strings.Repeat("]", 5000), 1},
		{"deep object", strings.Repeat(`{"a":`, 2000) + "1" + strings.Repeat("}", 2000), 1},
		{"duplicate key, then a well-formed request", `{"a":1,"a":2}`, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := feed(s, []byte(tc.in+next), true)
			var errs int
			var ids []string
			for _, m := range out {
				r, err := strictReply(m)
				if err != nil {
					t.Fatal(err)
				}
				if r.Error != nil {
					errs++
				}
				ids = append(ids, string(r.ID))
			}
			if errs != tc.errs || len(out) != tc.errs+1 || ids[len(ids)-1] != `"next"` {
				t.Fatalf("%d errors in %d replies (ids %q), want %d errors then the reply to id \"next\": %q", errs, len(out), ids, tc.errs, out)
			}
		})
	}
}

// TestOneMiBOfBracketsOverASocket is issue 12's reproduction end to end: a
// megabyte of ']' on a real connection gets one error reply, and the
// connection then works.
func TestOneMiBOfBracketsOverASocket(t *testing.T) {
	n := newNode(t, nodeOpts{})
	rc := dialRaw(t, n.sock)
	rc.negotiate()
	go rc.conn.Write([]byte(strings.Repeat("]", 1<<20) + `{"execute":"query-status","id":"after"}`))
	r := rc.reply()
	if r.Error == nil || r.Error.Desc != "JSON parse error, expecting value" {
		t.Fatalf("first reply: %+v", r)
	}
	if r := rc.reply(); string(r.ID) != `"after"` || r.Error != nil {
		t.Fatalf("second reply %+v, want the answer to id \"after\" (exactly one error before it)", r)
	}
}

// TestInvalidUTF8IDNeverEchoed: a reply always stays valid JSON, whatever
// the id held.
func TestInvalidUTF8IDNeverEchoed(t *testing.T) {
	s := streamServer(t)
	for _, id := range []string{"\"\xff\"", "\"\xc3\"", "\"\xed\xa0\x80\"", "[\"ok\",\"\x80\"]"} {
		out := feed(s, []byte(`{"execute":"query-status","id":`+id+`}`), true)
		if len(out) != 1 {
			t.Fatalf("id %q: %d replies", id, len(out))
		}
		r, err := strictReply(out[0])
		if err != nil {
			t.Fatalf("id %q: %v", id, err)
		}
		if r.ID != nil {
			t.Fatalf("id %q echoed: %s", id, out[0])
		}
	}
	// The encoder's own guard, for ids that reach it some other way.
	for _, id := range []string{"\"\xff\"", `"a`, `{"a":1,"a":2}`} {
		msg := encodeError(genericf("x"), json.RawMessage(id))
		if _, err := strictReply(msg); err != nil || bytes.Contains(msg, []byte(`"id"`)) {
			t.Fatalf("encodeError with id %q: %q (%v)", id, msg, err)
		}
		msg = encodeReply(nil, json.RawMessage(id))
		if _, err := strictReply(msg); err != nil || bytes.Contains(msg, []byte(`"id"`)) {
			t.Fatalf("encodeReply with id %q: %q (%v)", id, msg, err)
		}
	}
}

// TestLongDescIsBounded: a desc that quotes a huge peer string (here an
// unknown command's name) is cut to MaxDesc and made printable.
func TestLongDescIsBounded(t *testing.T) {
	s := streamServer(t)
	name := "x\u202e" + strings.Repeat("A", 60_000) // within MaxRequest (64 KiB here)
	out := feed(s, []byte(`{"execute":"`+name+`"}`), true)
	if len(out) != 1 {
		t.Fatalf("%d replies", len(out))
	}
	r, err := strictReply(out[0])
	if err != nil {
		t.Fatal(err)
	}
	if r.Error.Class != ClassCommandNotFound || !strings.HasPrefix(r.Error.Desc, `The command x\u202eAAA`) || !strings.HasSuffix(r.Error.Desc, "...") {
		t.Fatalf("desc %.80q… (%d bytes)", r.Error.Desc, len(r.Error.Desc))
	}
}

// TestFramerRules pins the framer's splitting and resynchronisation.
func TestFramerRules(t *testing.T) {
	cases := []struct {
		in   string
		want []string // framed values, or "error: <text>"
		end  error
	}{
		{`{"a":1}{"b":2}`, []string{`{"a":1}`, `{"b":2}`}, io.EOF},
		{` {"a":"}{"} `, []string{`{"a":"}{"}`}, io.EOF},
		{`[1]{"a":1}`, []string{`[1]`, `{"a":1}`}, io.EOF},
		{`[1] [2] "x" 3 {"a":1}`, []string{`[1]`, `{"a":1}`}, io.EOF},
		{`"s" junk`, []string{`"s"`}, io.EOF},
		{`12`, []string{`12`}, io.EOF},
		{`}}}{"a":1}`, []string{"error: JSON parse error, expecting value", `{"a":1}`}, io.EOF},
		{"\"a\nb\"{\"a\":1}", []string{`error: JSON parse error, stray '"a\n': a raw control character (U+000A) in a string; write it escaped (\u000a)`, `{"a":1}`}, io.EOF},
		{`{"a":1,"a":2}]{"b":1}`, []string{"error: JSON parse error, duplicate key: 'a' appears more than once in one object", "error: JSON parse error, expecting value", `{"b":1}`}, io.EOF},
		{`{"a":`, nil, io.ErrUnexpectedEOF},
		{`]]]`, []string{"error: JSON parse error, expecting value"}, io.EOF},
	}
	for _, tc := range cases {
		fr := newFramer(strings.NewReader(tc.in), 1<<20)
		var got []string
		var end error
		for {
			v, err := fr.next()
			var se *syntaxError
			if errors.As(err, &se) {
				got = append(got, "error: "+se.msg)
				continue
			}
			if err != nil {
				end = err
				break
			}
			got = append(got, string(v))
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) || end != tc.end {
			t.Errorf("%q\n got %q, end %v\nwant %q, end %v", tc.in, got, end, tc.want, tc.end)
		}
	}
}

// FuzzStrictStream feeds arbitrary bytes to the whole request path (framer,
// strict checks, decoder, dispatcher with a real controller): every
// message is one CRLF line of valid UTF-8, strict JSON without duplicate
// keys, a return or an error; and the number of replies is bounded by the
// input's shape, not its length: at most one per object plus one per run
// of bytes between objects, so at most 1 + 2×(number of '{' bytes).
func FuzzStrictStream(f *testing.F) {
	for _, s := range []string{
		`{"execute":"qmp_capabilities"}{"execute":"query-migrate","id":1}`,
		`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","uri":"exec:true"},"id":"x"}`,
		"{\"execute\":\"query-status\",\"id\":\"\xff\"}",
		"{\"execute\":\"query-status\",\"id\":\"abc\n{\"execute\":\"query-status\"}",
		`]]]]]]{"execute":"query-status"}`,
		`[[[[[[[[[[]]]]]]]]]] "str" 12 nul {"execute":"quit"}`,
		`{"execute":"query-status","id":"\ud800"}`,
		"\x01\xff{'a':1}",
	} {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	s := streamServer(f)
	f.Fuzz(func(t *testing.T, data []byte, negotiated bool) {
		out := feed(s, data, negotiated)
		for _, m := range out {
			if _, err := strictReply(m); err != nil {
				t.Fatal(err)
			}
		}
		if bound := 1 + 2*bytes.Count(data, []byte("{")); len(out) > bound {
			t.Fatalf("%d replies to %d bytes with %d '{': more than %d", len(out), len(data), bytes.Count(data, []byte("{")), bound)
		}
	})
}

// FuzzOneErrorPerRequest builds malformed requests of several kinds around
// fuzzed bytes, each followed by a good request, and checks that each
// malformed request gets exactly one error (without id) and the good one
// its reply.
func FuzzOneErrorPerRequest(f *testing.F) {
	for _, s := range []string{"", "abc", "]]]", "\x01", "\xff\xfe", `"}`, "a\nb", "\\u12", strings.Repeat("x", 300)} {
		f.Add([]byte(s), uint8(0))
	}
	s := streamServer(f)
	f.Fuzz(func(t *testing.T, junk []byte, kinds uint8) {
		// Bytes that would end the malformed request early or make it
		// well-formed are taken out, so each one stays one bad input.
		clean := func(drop string) []byte {
			return bytes.Map(func(r rune) rune {
				if strings.ContainsRune(drop, r) {
					return -1
				}
				return r
			}, junk)
		}
		noBrace := clean("{")
		inString := clean(`{"\`)
		flat := clean(`{}[]"\`)
		str, _ := json.Marshal(string(junk)) // a valid JSON string of the junk
		forms := []string{
			"]" + string(noBrace), // stray closer, then junk
			`{"execute":"query-status","id":"` + string(inString) + "\x01" + `"}`,       // control byte in a string
			`{"execute":"query-status","id":"` + string(inString) + "\n",                // unterminated at a newline
			`{"execute":"query-status","id":1,"id":` + string(str) + `}`,                // duplicate key
			`{"execute":"query-status","id":"` + string(inString) + "\xc3" + `(` + `"}`, // invalid UTF-8
			// Too deep: the rest of the value is skipped up to its end
			// (or a lexical error), so it must end before the probe.
			strings.Repeat("[", 1025) + string(flat) + strings.Repeat("]", 1025),
		}
		var in bytes.Buffer
		var want int
		for i := range 3 {
			form := forms[(int(kinds)+i*7)%len(forms)]
			in.WriteString(form)
			fmt.Fprintf(&in, `{"execute":"query-status","id":"probe%d"}`, i)
			want++
		}
		out := feed(s, in.Bytes(), true)
		if len(out) != 2*want {
			t.Fatalf("%d replies to %d malformed and %d good requests: %q\ninput %q", len(out), want, want, out, in.Bytes())
		}
		for i := range want {
			e, err := strictReply(out[2*i])
			if err != nil {
				t.Fatal(err)
			}
			p, err := strictReply(out[2*i+1])
			if err != nil {
				t.Fatal(err)
			}
			if e.Error == nil || e.ID != nil || p.Error != nil || string(p.ID) != fmt.Sprintf(`"probe%d"`, i) {
				t.Fatalf("pair %d: %s / %s\ninput %q", i, out[2*i], out[2*i+1], in.Bytes())
			}
		}
	})
}

// TestIdleConnectionsDoNotLockOut: 256 connections that never negotiate
// (issue 12: they locked the operator out) do not keep an operator from
// connecting at once; those beyond MaxPending are told why and dropped.
func TestIdleConnectionsDoNotLockOut(t *testing.T) {
	n := newNode(t, nodeOpts{})
	idle := make([]*rawConn, 256)
	for i := range idle {
		idle[i] = dialRaw(t, n.sock)
		idle[i].line() // the greeting: the server has taken the connection
	}
	cl := n.client(t) // connects and negotiates
	run(t, cl, "query-status", nil)
	// All but the newest DefaultMaxPending were dropped, each told why.
	dropped := 0
	for _, rc := range idle[:len(idle)-DefaultMaxPending] {
		r := rc.reply()
		if r.Error == nil || !strings.Contains(r.Error.Desc, "waiting for capabilities negotiation") {
			t.Fatalf("idle connection got %+v", r)
		}
		_ = rc.conn.SetReadDeadline(time.Now().Add(testTimeout))
		if _, err := rc.r.ReadByte(); err == nil {
			t.Fatal("a dropped connection is still open")
		}
		dropped++
	}
	if dropped != 256-DefaultMaxPending {
		t.Fatalf("%d dropped", dropped)
	}
}

// TestNegotiationDeadline: a client that does not negotiate in time is
// told so and dropped; one that negotiated stays past the deadline.
func TestNegotiationDeadline(t *testing.T) {
	const timeout = 300 * time.Millisecond
	n := newNode(t, nodeOpts{server: Options{NegotiationTimeout: timeout}})
	good := dialRaw(t, n.sock)
	good.negotiate()
	slow := dialRaw(t, n.sock) // connected after good, so its deadline is later
	slow.line()
	slow.send(`{"execute":"query-status","id":1}`) // commands do not extend it
	if r := slow.reply(); r.Error == nil || r.Error.Class != ClassCommandNotFound {
		t.Fatalf("before negotiation: %+v", r)
	}
	r := slow.reply() // arrives when the deadline passes
	want := "Expecting capabilities negotiation with 'qmp_capabilities' within 300ms of connecting; the connection is closed"
	if r.Error == nil || r.Error.Desc != want {
		t.Fatalf("after the deadline: %+v, want %q", r.Error, want)
	}
	_ = slow.conn.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := slow.r.ReadByte(); err == nil {
		t.Fatal("connection still open after the negotiation deadline")
	}
	// good's own deadline has passed too: it negotiated, so it stays.
	good.send(`{"execute":"query-status","id":2}`)
	if r := good.reply(); r.Error != nil || string(r.ID) != "2" {
		t.Fatalf("negotiated client after the deadline: %+v", r)
	}
}

// TestDecodeRequestIsStrict: decodeRequest checks on its own, whoever
// calls it (the framer checks too).
func TestDecodeRequestIsStrict(t *testing.T) {
	for in, want := range map[string]string{
		`{"execute":"migrate","arguments":{"uri":"a","uri":"b"}}`: "JSON parse error, duplicate key: 'uri' appears more than once in one object",
		"{\"execute\":\"query-status\",\"id\":\"\xff\"}":          `JSON parse error, stray '"\xff': byte 0xff is never valid UTF-8`,
	} {
		req, e := decodeRequest([]byte(in))
		if e == nil || e.Desc != want || req != nil {
			t.Errorf("decodeRequest(%q) = %+v, %+v; want %q and no request", in, req, e, want)
		}
	}
}
