package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/machine"
)

// TestConcurrentClients: 100 clients at once, well-behaved and not, while
// a migration runs. Each gets its answer or is dropped alone; the
// migration completes and the server keeps serving.
func TestConcurrentClients(t *testing.T) {
	// All 100 connect before most of them negotiate: allow that many to
	// wait (the default, 16, would drop the ones that waited longest).
	src := newNode(t, nodeOpts{server: Options{MaxPending: 100}})
	cs := src.client(t)
	run(t, cs, "migrate-set-capabilities", caps("events", true))
	run(t, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 16 << 20})
	_, cd, uri := newDest(t, false)
	run(t, cs, "migrate", map[string]any{"uri": uri})
	waitStatus(t, cs, "active")

	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 100 {
		wg.Go(func() {
			if err := misbehave(i, src.sock); err != nil {
				errs <- fmt.Errorf("client %d (kind %d): %w", i, i%5, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	checkOrder(t, "source", waitStatus(t, cs, "completed"), []string{"completed"})
	waitStatus(t, cd, "completed")
	// The guest graph moves to postmigrate just after the migration's
	// completed (as in QEMU, where migration_iteration_finish sets the
	// run state after the status): wait for that move before asking.
	machineEvents(t, cs, "guest", "postmigrate")
	if rs := queryStatus(t, cs); rs.Status != "postmigrate" {
		t.Fatalf("source after the storm: %+v", rs)
	}
}

// misbehave is one client of TestConcurrentClients; kind i%5 picks what
// it does.
func misbehave(i int, sock string) error {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if i%5 == 0 { // a proper client
		cl, err := DialAddr(ctx, "unix:"+sock)
		if err != nil {
			return err
		}
		defer cl.Close()
		for _, cmd := range []string{"query-migrate", "query-status", "query-migctl-machine", "query-migrate-parameters"} {
			if _, err := cl.Execute(ctx, cmd, nil); err != nil {
				return fmt.Errorf("%s: %w", cmd, err)
			}
		}
		return nil
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	r := bufio.NewReader(conn)
	if _, err := r.ReadBytes('\n'); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	switch i % 5 {
	case 1: // garbage: a parse error, then the connection still works
		conn.Write([]byte(`{{{]]] {"execute":"qmp_capabilities","id":1}`))
		for _, want := range []string{"JSON parse error", `"id":1`} {
			l, err := r.ReadBytes('\n')
			if err != nil || !bytes.Contains(l, []byte(want)) {
				return fmt.Errorf("want %q, got %q (%v)", want, l, err)
			}
		}
	case 2: // hangs up in the middle of a command
		conn.Write([]byte(`{"execute":"qmp_capabilities"}{"execute":"query-mi`))
	case 3: // oversized: an error, then the server hangs up
		done := make(chan struct{})
		go func() {
			defer close(done)
			conn.Write([]byte(`{"execute":"x","arguments":{"a":"` + strings.Repeat("a", DefaultMaxRequest) + `"}}`))
		}()
		l, err := r.ReadBytes('\n')
		if err != nil || !bytes.Contains(l, []byte("exceeds")) {
			return fmt.Errorf("oversized: got %q (%v)", l, err)
		}
		if _, err := r.ReadByte(); err == nil {
			return fmt.Errorf("still connected after an oversized request")
		}
		conn.Close()
		<-done
	case 4: // sends commands and leaves without reading the replies
		conn.Write([]byte(`{"execute":"qmp_capabilities"}{"execute":"query-migrate-parameters"}{"execute":"query-migrate"}`))
	}
	return nil
}

// TestClientRawAndConcurrent checks the client's id correlation.
func TestClientRawAndConcurrent(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	line, err := cl.Raw(ctx, []byte(`{"execute":"query-status","id":{"mine":1}}`))
	if err != nil || string(line) != `{"return":{"status":"running","running":true},"id":{"mine":1}}` {
		t.Fatalf("Raw with id: %s %v", line, err)
	}
	line, err = cl.Raw(ctx, []byte(`{"execute":"nope"}`))
	if err != nil || !bytes.Contains(line, []byte("CommandNotFound")) {
		t.Fatalf("Raw without id: %s %v", line, err)
	}
	if _, err := cl.Raw(ctx, []byte(`[1]`)); err == nil {
		t.Fatal("Raw accepted a non-object")
	}
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			cmd := []string{"query-status", "query-migrate", "query-version", "query-migrate-capabilities"}[i%4]
			ret, err := cl.Execute(ctx, cmd, nil)
			if err != nil {
				t.Error(err)
				return
			}
			// Each reply is the one for its own command.
			ok := map[string]bool{
				"query-status":               bytes.Contains(ret, []byte(`"running"`)),
				"query-migrate":              string(ret) == "{}",
				"query-version":              bytes.Contains(ret, []byte(`"qemu"`)),
				"query-migrate-capabilities": bytes.HasPrefix(ret, []byte(`[{"capability":"xbzrle"`)),
			}[cmd]
			if !ok {
				t.Errorf("%s got %s", cmd, ret)
			}
		})
	}
	wg.Wait()
	var qe *Error
	if _, err := cl.Execute(ctx, "migrate", map[string]any{"uri": 1}); !asQMP(err, &qe) || qe.Class != ClassGenericError {
		t.Fatalf("error reply: %v", err)
	}
	n.s.Close()
	<-cl.Done()
	if _, err := cl.Execute(ctx, "query-status", nil); err == nil {
		t.Fatal("Execute after the server closed succeeded")
	}
	if _, ok := <-cl.Events(); ok {
		t.Fatal("Events not closed with the connection")
	}
}

func asQMP(err error, qe **Error) bool {
	e, ok := err.(*Error)
	*qe = e
	return ok
}

// noopHost answers every Host call without doing anything.
type noopHost struct{}

func (noopHost) Migrate(context.Context, string, []string) error        { return nil }
func (noopHost) Incoming(context.Context, string, []string, bool) error { return nil }
func (noopHost) Cancel(context.Context) error                           { return nil }
func (noopHost) Continue(context.Context, string) error                 { return nil }
func (noopHost) Stop(context.Context) error                             { return nil }
func (noopHost) Cont(context.Context) error                             { return nil }
func (noopHost) Resolve(context.Context, string, bool) error            { return nil }
func (noopHost) Yank(context.Context) error                             { return nil }
func (noopHost) StartPostcopy(context.Context) error                    { return nil }
func (noopHost) Pause(context.Context) error                            { return nil }
func (noopHost) Recover(context.Context, string) error                  { return nil }
func (noopHost) Resume(context.Context, string, []string) error         { return nil }

// FuzzRequest feeds arbitrary bytes to the request decoder and the command
// dispatcher (with a real controller and a host that does nothing): no
// panic, every message one CRLF-terminated JSON object that is a reply.
func FuzzRequest(f *testing.F) {
	for _, s := range []string{
		`{"execute":"qmp_capabilities"}{"execute":"query-migrate","id":1}`,
		`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"},"id":"x"}`,
		`{"execute":"migrate-incoming","arguments":{"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"inet","host":"0","port":"4446"}}],"exit-on-error":false}}`,
		`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"multifd","state":true}]}}`,
		`{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4,"downtime-limit":500,"tls-creds":null}}`,
		`{"execute":"query-migctl-machine","arguments":{"history":3}}`,
		`{"exec-oob":"migrate-pause","id":[1,{"a":null}]}`,
		`}{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}`,
		`[[[[[[[[[[]]]]]]]]]] "str" 12 nul {"execute":"quit"}`,
		`{"execute":"migrate-set-parameters","arguments":{"block-bitmap-mapping":[{"node-name":"a"}],"cpr-exec-command":["a","b"]}}`,
		"{\"execute\":\"query-status\",\"id\":\"\\u00e9\xff\"}",
		`{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"a0","rules":[{"match":"CN=*","policy":"allow","format":"glob"}]}}`,
		`{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t0","dir":"/etc"}}{"execute":"object-del","arguments":{"id":"a0"}}`,
		`{"execute":"qom-list","arguments":{"path":"/objects"}}{"execute":"qom-list","arguments":{"path":"/machine"}}`,
		`{"execute":"getfd","arguments":{"fdname":"x"}}{"execute":"closefd","arguments":{"fdname":"x"}}`,
		`{"execute":"migrate","arguments":{"uri":"exec:id"}}{"execute":"migrate-incoming","arguments":{"uri":"fd:3"}}`,
		`{"execute":"query-uuid"}`,
	} {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	sp := testSpec(f)
	c, err := machine.New(sp, machine.Options{})
	if err != nil {
		f.Fatal(err)
	}
	s := NewServer(c, noopHost{}, Options{MaxRequest: 4 << 10})
	f.Cleanup(func() { s.Close(); c.Close() })
	f.Fuzz(func(t *testing.T, data []byte, negotiated bool) {
		cl := &client{s: s}
		cl.negotiated.Store(negotiated)
		var out [][]byte
		_ = s.serveStream(bytes.NewReader(data), cl, func(b []byte) bool {
			out = append(out, b)
			return true
		})
		for _, m := range out {
			if !bytes.HasSuffix(m, []byte("\r\n")) || bytes.Count(m, []byte("\n")) != 1 {
				t.Fatalf("message not one CRLF line: %q", m)
			}
			var r struct {
				Return json.RawMessage
				Error  *Error
			}
			if err := json.Unmarshal(m, &r); err != nil {
				t.Fatalf("message not JSON: %q: %v", m, err)
			}
			if (r.Return == nil) == (r.Error == nil) {
				t.Fatalf("message is neither a return nor an error: %q", m)
			}
			if r.Error != nil && (r.Error.Desc == "" || (r.Error.Class != ClassGenericError && r.Error.Class != ClassCommandNotFound && r.Error.Class != ClassDeviceNotFound)) {
				t.Fatalf("bad error: %q", m)
			}
		}
	})
}

func TestFramer(t *testing.T) {
	in := ` {"a":"}{\"]"} [1,[2]]  123 "s\"}" tru{"b":{}}` + "\n" + `{"c":1`
	fr := newFramer(strings.NewReader(in), 100)
	var got []string
	for {
		v, err := fr.next()
		if err != nil {
			if err != io.ErrUnexpectedEOF {
				t.Fatalf("end: %v", err)
			}
			break
		}
		got = append(got, string(v))
	}
	// After [1,[2]] (not an object) the framer skips to the next '{'.
	want := []string{`{"a":"}{\"]"}`, `[1,[2]]`, `{"b":{}}`}
	if !slices.Equal(got, want) {
		t.Fatalf("framed %q\nwant %q", got, want)
	}
	fr = newFramer(strings.NewReader(strings.Repeat("[", 2000)+strings.Repeat("]", 2000)+`{"x":1}`), 1<<20)
	if _, err := fr.next(); err == nil || !strings.Contains(err.Error(), "nesting") {
		t.Fatalf("deep nesting: %v", err)
	}
	if v, err := fr.next(); err != nil || string(v) != `{"x":1}` {
		t.Fatalf("after deep nesting: %q %v", v, err)
	}
	fr = newFramer(strings.NewReader(`{"a":"`+strings.Repeat("x", 200)+`"}`), 100)
	if _, err := fr.next(); err != errTooLarge {
		t.Fatalf("oversized: %v", err)
	}
}

// BenchmarkQueryMigrateDuringLoad measures query-migrate round trips over
// the unix socket of a destination while it loads a migration (p50-µs,
// p99-µs), and on an idle destination in the same run (idle-p99-µs).
func BenchmarkQueryMigrateDuringLoad(b *testing.B) {
	cfg := guest.Config{Size: 32 << 20, DirtyRate: 4 << 20, Seed: 3, VRAM: -1}
	var idle, load []time.Duration
	ctx := context.Background()
	rtt := func(cl *Client) time.Duration {
		t0 := time.Now()
		if _, err := cl.Execute(ctx, "query-migrate", nil); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	b.StopTimer()
	for len(load) < b.N {
		src := newNode(b, nodeOpts{guest: &cfg})
		dst := newNode(b, nodeOpts{dest: true, guest: &cfg})
		cs, cd, probe := src.client(b), dst.client(b), dst.client(b)
		if len(idle) == 0 {
			for range min(b.N, 2000) {
				idle = append(idle, rtt(probe))
			}
		}
		run(b, cd, "migrate-set-capabilities", caps("events", true))
		uri := listen(b, cd, map[string]any{"exit-on-error": false})
		// 16 MiB/s: the destination loads for about two seconds.
		run(b, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 16 << 20})
		run(b, cs, "migrate", map[string]any{"uri": uri})
		waitStatus(b, cd, "active")
		b.StartTimer()
		loading := true
		for loading && len(load) < b.N {
			load = append(load, rtt(probe))
			select {
			case <-cd.Events():
				st, _ := dst.c.State("incoming")
				loading = st == "active"
			default:
			}
		}
		b.StopTimer()
		run(b, cs, "migrate_cancel", nil)
		cs.Close()
		cd.Close()
		probe.Close()
		src.close()
		dst.close()
	}
	pct := func(d []time.Duration, p float64) float64 {
		slices.Sort(d)
		return float64(d[int(float64(len(d)-1)*p)].Nanoseconds()) / 1e3
	}
	b.ReportMetric(pct(load, 0.50), "p50-µs")
	b.ReportMetric(pct(load, 0.99), "p99-µs")
	b.ReportMetric(pct(idle, 0.99), "idle-p99-µs")
}
