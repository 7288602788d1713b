package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// rawConn is a client that speaks bytes, for protocol tests.
type rawConn struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialRaw(t *testing.T, path string) *rawConn {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	rc := &rawConn{t: t, conn: conn, r: bufio.NewReaderSize(conn, 1<<20)}
	return rc
}

func (rc *rawConn) send(s string) {
	rc.t.Helper()
	if _, err := rc.conn.Write([]byte(s)); err != nil {
		rc.t.Fatal(err)
	}
}

// line reads one message and checks its CRLF framing.
func (rc *rawConn) line() []byte {
	rc.t.Helper()
	_ = rc.conn.SetReadDeadline(time.Now().Add(testTimeout))
	l, err := rc.r.ReadBytes('\n')
	if err != nil {
		rc.t.Fatalf("read: %v (got %q)", err, l)
	}
	if !bytes.HasSuffix(l, []byte("\r\n")) {
		rc.t.Fatalf("message not CRLF-terminated: %q", l)
	}
	return l[:len(l)-2]
}

type rawReply struct {
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     json.RawMessage `json:"id"`
	Event  string          `json:"event"`
}

func (rc *rawConn) reply() rawReply {
	rc.t.Helper()
	l := rc.line()
	var r rawReply
	if err := json.Unmarshal(l, &r); err != nil {
		rc.t.Fatalf("reply %q: %v", l, err)
	}
	return r
}

func (rc *rawConn) negotiate() {
	rc.t.Helper()
	rc.line() // greeting
	rc.send(`{"execute":"qmp_capabilities"}`)
	if r := rc.reply(); r.Error != nil || string(r.Return) != "{}" {
		rc.t.Fatalf("qmp_capabilities: %+v", r)
	}
}

func TestGreetingAndNegotiation(t *testing.T) {
	n := newNode(t, nodeOpts{})
	rc := dialRaw(t, n.sock)
	g := rc.line()
	want := `{"QMP":{"version":{"qemu":{"micro":0,"minor":2,"major":10},"package":"migctl"},"capabilities":["oob"]}}`
	if string(g) != want {
		t.Fatalf("greeting\n got %s\nwant %s", g, want)
	}

	// Before negotiation: everything else is CommandNotFound, id echoed.
	rc.send(`{"execute":"query-status","id":"early"}`)
	r := rc.reply()
	if r.Error == nil || r.Error.Class != ClassCommandNotFound || !strings.Contains(r.Error.Desc, "qmp_capabilities") || string(r.ID) != `"early"` {
		t.Fatalf("command before negotiation: %+v", r)
	}

	// Events are not delivered before negotiation: another client turns
	// events on and makes the source fail a migration (nothing listens).
	cl := n.client(t)
	run(t, cl, "migrate-set-capabilities", caps("events", true))
	run(t, cl, "migrate", map[string]any{"uri": "tcp:127.0.0.1:" + closedPort(t)})
	waitStatus(t, cl, "failed")
	rc.send(`{"execute":"query-migrate","id":2}`)
	if r := rc.reply(); r.Event != "" || r.Error == nil || r.Error.Class != ClassCommandNotFound {
		t.Fatalf("un-negotiated client got %+v, want the CommandNotFound reply and no event", r)
	}

	rc.send(`{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":3}`)
	if r := rc.reply(); r.Error != nil || string(r.ID) != "3" {
		t.Fatalf("qmp_capabilities: %+v", r)
	}
	rc.send(`{"execute":"qmp_capabilities","id":4}`)
	if r := rc.reply(); r.Error == nil || r.Error.Class != ClassCommandNotFound || !strings.Contains(r.Error.Desc, "already complete") {
		t.Fatalf("second qmp_capabilities: %+v", r)
	}
	// The events of the failed migration were not queued for it: the next
	// message is the reply.
	rc.send(`{"execute":"query-status","id":5}`)
	if r := rc.reply(); r.Event != "" || string(r.ID) != "5" {
		t.Fatalf("after negotiation: %+v, want the query-status reply", r)
	}
	// exec-oob: only for commands that allow it.
	rc.send(`{"exec-oob":"query-status","id":6}`)
	if r := rc.reply(); r.Error == nil || !strings.Contains(r.Error.Desc, "does not support OOB") {
		t.Fatalf("exec-oob query-status: %+v", r)
	}
	rc.send(`{"exec-oob":"migrate-pause","id":7}`) // allowed out of band; refused with QEMU's words: no postcopy runs
	if r := rc.reply(); r.Error == nil || !strings.Contains(r.Error.Desc, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state") {
		t.Fatalf("exec-oob migrate-pause: %+v", r)
	}
	rc.send(`{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}`)
	if r := rc.reply(); r.Error == nil {
		t.Fatalf("qmp_capabilities with a bogus capability accepted")
	}
}

// closedPort returns a loopback TCP port nothing listens on.
func closedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	ln.Close()
	return port
}

func TestIDEcho(t *testing.T) {
	n := newNode(t, nodeOpts{})
	rc := dialRaw(t, n.sock)
	rc.negotiate()
	ids := []string{`1`, `"abc"`, `{"a":[1,2,{"b":null}]}`, `null`, `1.5e3`, `true`, `[]`, `"\u00e9\n"`, `123456789012345678901234567890`}
	for _, id := range ids {
		for _, cmd := range []string{"query-status", "no-such-command", "migrate-continue"} {
			rc.send(`{"execute":"` + cmd + `","id": ` + id + ` }` + "\n")
			r := rc.reply()
			var want bytes.Buffer
			json.Compact(&want, []byte(id))
			if string(r.ID) != want.String() {
				t.Errorf("%s with id %s: echoed %s", cmd, id, r.ID)
			}
		}
	}
	// Without id, the reply has none.
	rc.send(`{"execute":"query-status"}`)
	if l := rc.line(); bytes.Contains(l, []byte(`"id"`)) {
		t.Fatalf("reply without id carries one: %s", l)
	}
	// Requests need no newline and may share a segment.
	rc.send(`{"execute":"query-status","id":1}{"execute":"query-status","id":2}` + ` [1]{"execute":"query-status","id":3}`)
	for _, want := range []string{"1", "2", "", "3"} {
		r := rc.reply()
		if string(r.ID) != want {
			t.Fatalf("pipelined: id %s, want %q (%+v)", r.ID, want, r)
		}
	}
}

func TestMalformedInput(t *testing.T) {
	n := newNode(t, nodeOpts{})
	rc := dialRaw(t, n.sock)
	rc.negotiate()
	cases := []struct {
		in, class, desc, id string
	}{
		{`nonsense `, ClassGenericError, "JSON parse error", ""},
		{`{"execute":"query-status",}`, ClassGenericError, "JSON parse error", ""},
		{`}`, ClassGenericError, "JSON parse error", ""},
		// After a parse error or a value that is not an object the server
		// skips to the next '{' (strict.go), so each such case comes
		// after an object.
		{`{"execute":5,"id":1}`, ClassGenericError, "'execute' must be a string", "1"},
		{`[1,2]`, ClassGenericError, "QMP input must be a JSON object", ""},
		{`{"id":1}`, ClassGenericError, "lacks member 'execute'", "1"},
		{`"str"`, ClassGenericError, "QMP input must be a JSON object", ""},
		{`{"execute":"query-status","arguments":[],"id":1}`, ClassGenericError, "'arguments' must be an object", "1"},
		{`{"execute":"query-status","foo":1,"id":1}`, ClassGenericError, "QMP input member 'foo' is unexpected", "1"},
		{`{"execute":"nope","id":"a"}`, ClassCommandNotFound, "The command nope has not been found", `"a"`},
		{`{"execute":"query-status","arguments":{"x":1},"id":1}`, ClassGenericError, "Parameter 'x' is unexpected", "1"},
		{`{"execute":"migrate","arguments":{"uri":5},"id":1}`, ClassGenericError, "Invalid parameter type for 'uri', expected: string", "1"},
		{`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","bogus":true},"id":1}`, ClassGenericError, "Parameter 'bogus' is unexpected", "1"},
		{`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","detach":"yes"},"id":1}`, ClassGenericError, "Invalid parameter type for 'detach', expected: boolean", "1"},
		{`{"execute":"migrate","arguments":{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"127.0.0.1","port":1}}]},"id":1}`, ClassGenericError, "'channels[0].addr.port', expected: string", "1"},
		{`{"execute":"migrate","arguments":{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"127.0.0.1","port":"1","x":1}}]},"id":1}`, ClassGenericError, "Parameter 'channels[0].addr.x' is unexpected", "1"},
		{`{"execute":"migrate","arguments":{"channels":[{"addr":{}}]},"id":1}`, ClassGenericError, "Parameter 'channels[0].channel-type' is missing", "1"},
		{`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":"on"}]},"id":1}`, ClassGenericError, "'capabilities[0].state', expected: boolean", "1"},
		{`{"execute":"migrate-set-parameters","arguments":{"downtime-limit":"500"},"id":1}`, ClassGenericError, "Invalid parameter type for 'downtime-limit', expected: integer", "1"},
		{`{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1.5},"id":1}`, ClassGenericError, "downtime-limit", "1"},
		{`{"execute":"migrate-set-parameters","arguments":{"downtime-limit":-1},"id":1}`, ClassGenericError, "downtime-limit", "1"},
	}
	for _, tc := range cases {
		rc.send(tc.in)
		r := rc.reply()
		if r.Error == nil || r.Error.Class != tc.class || !strings.Contains(r.Error.Desc, tc.desc) || string(r.ID) != tc.id {
			t.Errorf("%s\n got %+v (error %+v)\nwant class %s desc containing %q id %q", tc.in, r, r.Error, tc.class, tc.desc, tc.id)
		}
	}
	// Nothing had a side effect: no migration was started, no parameter set.
	cl := n.client(t)
	if st, _ := n.c.State("outgoing"); st != "none" {
		t.Fatalf("a rejected request started a migration: outgoing %s", st)
	}
	if v := n.c.Param("downtime-limit"); v != "300" {
		t.Fatalf("downtime-limit = %s after rejected requests", v)
	}
	// The connection still works.
	rc.send(`{"execute":"query-status","id":"ok"}`)
	if r := rc.reply(); r.Error != nil || string(r.ID) != `"ok"` {
		t.Fatalf("after bad input: %+v", r)
	}
	run(t, cl, "query-status", nil)
}

func TestOversizedAndTruncated(t *testing.T) {
	n := newNode(t, nodeOpts{server: Options{MaxRequest: 64 << 10}})
	rc := dialRaw(t, n.sock)
	rc.negotiate()
	big := `{"execute":"query-status","arguments":{"x":"` + strings.Repeat("a", 100<<10) + `"}}`
	go rc.conn.Write([]byte(big)) // the server stops reading half way
	r := rc.reply()
	if r.Error == nil || !strings.Contains(r.Error.Desc, "exceeds") {
		t.Fatalf("oversized request: %+v", r)
	}
	_ = rc.conn.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := rc.r.ReadByte(); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("after an oversized request the connection should close, read gave %v", err)
	}
	// A client that hangs up in the middle of a request, or half-closes
	// after one, does not disturb the server; the half-closer gets its
	// reply.
	rc2 := dialRaw(t, n.sock)
	rc2.negotiate()
	rc2.send(`{"execute":"query-migrate","argu`)
	rc2.conn.Close()
	rc3 := dialRaw(t, n.sock)
	rc3.negotiate()
	rc3.send(`{"execute":"query-status","id":9}`)
	rc3.conn.(*net.UnixConn).CloseWrite()
	if r := rc3.reply(); string(r.ID) != "9" || r.Error != nil {
		t.Fatalf("half-closed client: %+v", r)
	}
	cl := n.client(t)
	run(t, cl, "query-migrate", nil)
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "reset") || errors.Is(err, net.ErrClosed))
}

func TestUnixSocketFile(t *testing.T) {
	n := newNode(t, nodeOpts{})
	fi, err := os.Lstat(n.sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket file mode %v, want a socket with 0600", fi.Mode())
	}
	// A second server on the same path is refused: someone serves there.
	s2 := NewServer(n.c, n.h, Options{})
	defer s2.Close()
	if _, err := s2.Listen("unix:" + n.sock); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second server on a live socket: %v", err)
	}
	// A stale socket (nobody listening) is replaced.
	stale := n.sock + ".stale"
	ln, err := bindUnix(stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close() // unlink-on-close is off: the file stays, stale
	if _, err := os.Lstat(stale); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Listen("unix:" + stale); err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	// A regular file is not touched.
	plain := n.sock + ".file"
	os.WriteFile(plain, []byte("x"), 0o600)
	if _, err := s2.Listen("unix:" + plain); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listening over a regular file: %v", err)
	}
	s2.Close()
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Fatalf("socket file left after Close: %v", err)
	}
	if _, err := os.Lstat(plain); err != nil {
		t.Fatalf("regular file removed: %v", err)
	}
	n.s.Close()
	if _, err := os.Lstat(n.sock); !os.IsNotExist(err) {
		t.Fatalf("socket file left after Close: %v", err)
	}
}

func TestTCPLoopbackOnly(t *testing.T) {
	n := newNode(t, nodeOpts{})
	if _, err := n.s.Listen("tcp:0.0.0.0:0"); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Fatalf("non-loopback TCP: %v", err)
	}
	if _, err := n.s.Listen("udp:x"); err == nil {
		t.Fatal("unknown scheme accepted")
	}
	addr, err := n.s.Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cl, err := DialAddr(ctx, "tcp:"+addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if rs := queryStatus(t, cl); rs.Status != "running" || !rs.Running {
		t.Fatalf("query-status over TCP: %+v", rs)
	}
	if len(n.s.Addrs()) != 2 {
		t.Fatalf("Addrs: %v", n.s.Addrs())
	}
}

func TestQueryCommandsAndVersion(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)
	var list []struct{ Name string }
	json.Unmarshal(run(t, cl, "query-commands", nil), &list)
	var names []string
	for _, c := range list {
		names = append(names, c.Name)
	}
	for _, want := range []string{"migrate", "migrate-incoming", "migrate-set-capabilities", "query-migrate-capabilities",
		"migrate-set-parameters", "query-migrate-parameters", "query-migrate", "migrate_cancel", "migrate-continue",
		"migrate-start-postcopy", "migrate-pause", "migrate-recover", "query-status", "quit", "query-migctl-machine", "qmp_capabilities"} {
		if !slices.Contains(names, want) {
			t.Errorf("query-commands lacks %s", want)
		}
	}
	var v Version
	json.Unmarshal(run(t, cl, "query-version", nil), &v)
	if v.QEMU.Major != 10 || v.QEMU.Minor != 2 || v.Package != "migctl" {
		t.Fatalf("query-version: %+v", v)
	}
	if e := fails(t, cl, "query-version", map[string]any{"x": 1}); !strings.Contains(e.Desc, "'x' is unexpected") {
		t.Fatal(e)
	}
}

func TestCapabilities(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)
	var list []CapabilityStatus
	json.Unmarshal(run(t, cl, "query-migrate-capabilities", nil), &list)
	sp := testSpec(t)
	if len(list) != len(sp.Capabilities) {
		t.Fatalf("query-migrate-capabilities: %d entries, want %d", len(list), len(sp.Capabilities))
	}
	for i, c := range sp.Capabilities {
		if list[i].Capability != c.Name || list[i].State {
			t.Fatalf("entry %d = %+v, want %s off (enum order)", i, list[i], c.Name)
		}
	}
	run(t, cl, "migrate-set-capabilities", caps("events", true, "return-path", true))
	json.Unmarshal(run(t, cl, "query-migrate-capabilities", nil), &list)
	on := map[string]bool{}
	for _, c := range list {
		on[c.Capability] = c.State
	}
	if !on["events"] || !on["return-path"] || on["multifd"] {
		t.Fatalf("after set: %v", on)
	}
	for _, tc := range []struct {
		args any
		desc string
	}{
		{caps("zero-blocks", true), "'capabilities[0].capability' does not accept value 'zero-blocks'"},
		{map[string]any{"capabilities": []any{map[string]any{"capability": "events"}}}, "'capabilities[0].state' is missing"},
		{map[string]any{"capabilities": []any{map[string]any{"state": true}}}, "'capabilities[0].capability' is missing"},
		{map[string]any{"capabilities": []any{map[string]any{"capability": "events", "state": true, "x": 1}}}, "'capabilities[0].x' is unexpected"},
		{map[string]any{"capabilities": "events"}, "'capabilities', expected: array"},
		{map[string]any{}, "'capabilities' is missing"},
		// all or nothing: a conflict refuses the whole request
		{caps("events", false, "multifd", true, "xbzrle", true), "xbzrle"},
	} {
		if e := fails(t, cl, "migrate-set-capabilities", tc.args); !strings.Contains(e.Desc, tc.desc) {
			t.Errorf("%v: %q, want %q", tc.args, e.Desc, tc.desc)
		}
	}
	if cfg := n.c.Config(); !cfg.Caps["events"] || cfg.Caps["multifd"] {
		t.Fatalf("a refused request changed capabilities: %v", cfg.Caps)
	}
}

func TestParameters(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)
	var params map[string]any
	json.Unmarshal(run(t, cl, "query-migrate-parameters", nil), &params)
	sp := testSpec(t)
	for _, p := range sp.Parameters {
		v, ok := params[p.Name]
		if p.Name == paramBitmapMapping {
			if ok {
				t.Errorf("%s shown before it was set", p.Name)
			}
			continue
		}
		if !ok {
			t.Errorf("query-migrate-parameters lacks %s", p.Name)
			continue
		}
		switch {
		case p.Name == paramCPRExec:
			if _, ok := v.([]any); !ok {
				t.Errorf("%s = %#v, want an array", p.Name, v)
			}
		case p.Type == "bool":
			if _, ok := v.(bool); !ok {
				t.Errorf("%s = %#v, want a bool", p.Name, v)
			}
		case p.Type == "string" || p.Type == "enum":
			if _, ok := v.(string); !ok {
				t.Errorf("%s = %#v, want a string", p.Name, v)
			}
		default:
			if _, ok := v.(float64); !ok {
				t.Errorf("%s = %#v, want a number", p.Name, v)
			}
		}
	}
	if params["downtime-limit"] != 300.0 || params["multifd-compression"] != "none" || params["tls-creds"] != "" {
		t.Fatalf("defaults: %v", params)
	}
	run(t, cl, "migrate-set-parameters", map[string]any{"downtime-limit": 500, "cpu-throttle-tailslow": true,
		"tls-creds": nil, "multifd-compression": "zstd", "block-bitmap-mapping": []any{map[string]any{"node-name": "n"}},
		"cpr-exec-command": []string{"/bin/qemu", "-x"}, "max-bandwidth": uint64(1) << 40})
	json.Unmarshal(run(t, cl, "query-migrate-parameters", nil), &params)
	if params["downtime-limit"] != 500.0 || params["cpu-throttle-tailslow"] != true || params["multifd-compression"] != "zstd" ||
		params["max-bandwidth"] != float64(uint64(1)<<40) {
		t.Fatalf("after set: %v", params)
	}
	if bm, _ := json.Marshal(params["block-bitmap-mapping"]); string(bm) != `[{"node-name":"n"}]` {
		t.Fatalf("block-bitmap-mapping: %s", bm)
	}
	if cmd, _ := json.Marshal(params["cpr-exec-command"]); string(cmd) != `["/bin/qemu","-x"]` {
		t.Fatalf("cpr-exec-command: %s", cmd)
	}
	for _, tc := range []struct {
		args any
		desc string
	}{
		{map[string]any{"downtime-limit": 3000000}, "downtime-limit"},
		{map[string]any{"multifd-compression": "lz4"}, "'multifd-compression' does not accept value 'lz4'"},
		{map[string]any{"compress-level": 1}, "'compress-level' is unexpected"},
		{map[string]any{"cpu-throttle-tailslow": 1}, "'cpu-throttle-tailslow', expected: boolean"},
		{map[string]any{"tls-hostname": 5}, "'tls-hostname', expected: string"},
		{map[string]any{"multifd-channels": 256}, "multifd-channels"},
		// all or nothing: the good member is not applied either
		{map[string]any{"downtime-limit": 700, "max-cpu-throttle": 5, "cpu-throttle-initial": 50}, "max-cpu-throttle"},
	} {
		if e := fails(t, cl, "migrate-set-parameters", tc.args); !strings.Contains(e.Desc, tc.desc) {
			t.Errorf("%v: %q, want %q", tc.args, e.Desc, tc.desc)
		}
	}
	if v := n.c.Param("downtime-limit"); v != "500" {
		t.Fatalf("a refused request changed downtime-limit to %s", v)
	}
}

var mainChannel = map[string]any{"channel-type": "main", "addr": map[string]any{"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "1"}}

func TestCommandErrors(t *testing.T) {
	src := newNode(t, nodeOpts{})
	dst := newNode(t, nodeOpts{dest: true})
	cs, cd := src.client(t), dst.client(t)

	if got := string(run(t, cs, "query-migrate", nil)); got != "{}" {
		t.Fatalf("query-migrate before any migration: %s", got)
	}
	if rs := queryStatus(t, cs); rs != (RunState{Status: "running", Running: true}) {
		t.Fatalf("source query-status: %+v", rs)
	}
	if rs := queryStatus(t, cd); rs != (RunState{Status: "inmigrate"}) {
		t.Fatalf("destination query-status: %+v", rs)
	}
	for _, tc := range []struct {
		cl         *Client
		cmd        string
		args       any
		desc       string
		commandNot bool
	}{
		{cs, "migrate", map[string]any{}, "One of 'uri' or 'channels'", false},
		{cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:1", "channels": []any{}}, "mutually exclusive", false},
		{cs, "migrate", map[string]any{"uri": "tcp:127.0.0.1:1", "resume": true}, "Cannot resume if there is no paused migration", false},
		{cs, "migrate", map[string]any{"uri": "bogus:x"}, "unknown migration protocol", false},
		{cs, "migrate", map[string]any{"channels": []any{mainChannel, map[string]any{"channel-type": "cpr", "addr": map[string]any{"transport": "socket", "type": "unix", "path": "/tmp/cpr.sock"}}}}, "a channel of type cpr needs parameter mode cpr-transfer", false},
		{cs, "migrate", map[string]any{"channels": []any{mainChannel, mainChannel}}, "Channel list has more than one main entry", false},
		{cs, "migrate", map[string]any{"channels": []any{1}}, "Invalid parameter type for 'channels[0]', expected: object", false},
		{cd, "migrate-incoming", map[string]any{"channels": []any{mainChannel, mainChannel}}, "Channel list must have only one entry, for type 'main'", false},
		{cs, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"}, "'-incoming' was not specified", false},
		{cd, "migrate", map[string]any{"uri": "tcp:127.0.0.1:1"}, "waiting for an incoming migration", false},
		{cs, "migrate-continue", map[string]any{"state": "pre-switchover"}, "Migration not in expected state: none", false},
		{cs, "migrate-continue", map[string]any{"state": "bogus"}, "'state' does not accept value 'bogus'", false},
		{cs, "migrate-continue", map[string]any{}, "'state' is missing", false},
		{cs, "migrate-start-postcopy", nil, "Enable postcopy with migrate_set_capability before the start of migration", false},
		{cs, "migrate-pause", nil, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state", false},
		{cs, "migrate-recover", map[string]any{"uri": "tcp:127.0.0.1:1"}, "Migrate recover can only be run when postcopy is paused.", false},
		{cs, "migrate-recover", nil, "'uri' is missing", false},
		{cs, "query-migctl-machine", map[string]any{"history": 1000}, "at most", false},
		{cs, "no-such", nil, "The command no-such has not been found", true},
	} {
		e := fails(t, tc.cl, tc.cmd, tc.args)
		if !strings.Contains(e.Desc, tc.desc) || (e.Class == ClassCommandNotFound) != tc.commandNot {
			t.Errorf("%s %v: %+v, want %q", tc.cmd, tc.args, e, tc.desc)
		}
	}
	// Cancel with nothing running is harmless.
	run(t, cs, "migrate_cancel", nil)
	run(t, cs, "migrate-cancel", nil)
	if st, _ := src.c.State("outgoing"); st != "none" {
		t.Fatalf("cancel without migration moved the source to %s", st)
	}

	// A second migrate-incoming is refused with QEMU's words.
	uri := listen(t, cd, map[string]any{"exit-on-error": false})
	if e := fails(t, cd, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"}); !strings.Contains(e.Desc, "already been started") {
		t.Fatalf("second migrate-incoming: %v", e)
	}
	// query-migctl-machine shows both machines.
	var mi MachineInfo
	json.Unmarshal(run(t, cd, "query-migctl-machine", map[string]any{"history": 4}), &mi)
	if mi.Incoming.State != "listening" || mi.Incoming.Status != "setup" || !mi.Incoming.ConfigMutable ||
		mi.Incoming.Transport != "tcp" || !slices.Contains(mi.Incoming.Permitted, "connect") || len(mi.Incoming.History) == 0 ||
		mi.Outgoing.State != "none" {
		t.Fatalf("query-migctl-machine: %+v", mi)
	}
	if h := mi.Incoming.History[len(mi.Incoming.History)-1]; h.To != "listening" || h.Trigger != "listen" {
		t.Fatalf("last transition: %+v", h)
	}
	if _, err := time.Parse(time.RFC3339Nano, mi.Incoming.History[0].Time); err != nil {
		t.Fatal(err)
	}
	// Cancel on a listening destination cancels it.
	run(t, cd, "migrate_cancel", nil)
	_ = uri
	dst.h.Close() // waits for the loader goroutine
	if st, _ := dst.c.State("incoming"); st != "cancelled" {
		t.Fatalf("destination after migrate_cancel while listening: %s", st)
	}
	if e := fails(t, cd, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"}); !strings.Contains(e.Desc, "shutting down") {
		t.Fatalf("migrate-incoming after host close: %v", e)
	}
}

func TestWindowClosedOverQMP(t *testing.T) {
	dst := newNode(t, nodeOpts{dest: true})
	cl := dst.client(t)
	uri := listen(t, cl, map[string]any{"exit-on-error": false})
	if info := queryMigrate(t, cl); info.Status != "setup" {
		t.Fatalf("listening destination: status %q", info.Status)
	}
	e := fails(t, cl, "migrate-set-capabilities", caps("multifd", true))
	if !strings.Contains(e.Desc, "multifd") || !strings.Contains(e.Desc, "tcp") || !strings.Contains(e.Desc, strings.TrimPrefix(uri, "tcp:")) {
		t.Fatalf("multifd after listen: %q, want it to name multifd and the tcp listener %s", e.Desc, uri)
	}
	if dst.c.Config().Caps["multifd"] {
		t.Fatal("multifd switched on despite the refusal")
	}
	// Capabilities unrelated to the listener may still change (the
	// destination's configuration is mutable until the source connects).
	run(t, cl, "migrate-set-capabilities", caps("events", true))
}

func TestQuit(t *testing.T) {
	n := newNode(t, nodeOpts{})
	rc := dialRaw(t, n.sock)
	rc.negotiate()
	rc.send(`{"execute":"quit","id":"bye"}`)
	if r := rc.reply(); r.Error != nil || string(r.ID) != `"bye"` {
		t.Fatalf("quit: %+v", r)
	}
	select {
	case <-n.s.Done():
	case <-time.After(testTimeout):
		t.Fatal("Done not closed after quit")
	}
	n.s.Close()
	if _, err := os.Lstat(n.sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
	if _, err := rc.r.ReadByte(); err == nil {
		t.Fatal("connection still open after Close")
	}
}

func TestSlowEventReaderIsDropped(t *testing.T) {
	n := newNode(t, nodeOpts{server: Options{QueueLen: 8, WriteTimeout: time.Minute}})
	good := n.client(t)
	run(t, good, "migrate-set-capabilities", caps("events", true))
	// The slow client is one end of a pipe that nobody reads after the
	// handshake: every write blocks, so its queue fills up.
	srvEnd, cliEnd := net.Pipe()
	defer cliEnd.Close()
	n.s.ServeConn(srvEnd, Owner)
	r := bufio.NewReader(cliEnd)
	r.ReadBytes('\n')
	go cliEnd.Write([]byte(`{"execute":"qmp_capabilities"}`))
	r.ReadBytes('\n')
	// Four failed migrations: 12 events for a queue of 8.
	for range 4 {
		run(t, good, "migrate", map[string]any{"uri": "tcp:127.0.0.1:" + closedPort(t)})
		waitStatus(t, good, "failed")
	}
	// The slow client was dropped: its pipe reads EOF once the buffered
	// event is consumed; the good client and the server carry on.
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, cliEnd)
		done <- err
	}()
	select {
	case <-done:
	case <-time.After(testTimeout):
		t.Fatal("slow client was not dropped")
	}
	if info := queryMigrate(t, good); info.Status != "failed" {
		t.Fatalf("good client: %+v", info)
	}
}
