package qmp

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
)

// hostileSource connects to a listening destination and sends a stream
// header and a handshake whose guest ID is id, as a migration peer that
// controls what it announces can.
func hostileSource(t *testing.T, uri, id string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(uri, "tcp:"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	enc := stream.NewEncoder(conn)
	if err := enc.WriteHeader("hostile"); err != nil {
		t.Fatal(err)
	}
	if err := enc.WriteHandshake(&stream.Handshake{PageSize: 4096, GuestID: id,
		Capabilities: map[string]bool{}, Parameters: map[string]string{}, RAMBlocks: map[string]uint64{}}); err != nil {
		t.Fatal(err)
	}
	if err := enc.Flush(); err != nil {
		t.Fatal(err)
	}
	// Wait for the destination to hang up: it refused at connect.
	var b [4096]byte
	for {
		if _, err := conn.Read(b[:]); err != nil {
			return
		}
	}
}

// Issue 12, "what is wrong" 4: a peer's 900 KB guest ID became a 900 KB
// error-desc, which go-qemu's client cannot read ("token too long"), and
// escape sequences in it reached terminals. The desc must be bounded and
// printable, and still name what differs.
func TestPeerTextIsBoundedAndPrintable(t *testing.T) {
	dst := newNode(t, nodeOpts{dest: true})
	cl := dst.client(t)
	uri := listen(t, cl, map[string]any{"exit-on-error": false})
	id := "\x1b]0;owned\x07\x1b[31m" + strings.Repeat("A", 900<<10) + "\u202e"
	hostileSource(t, uri, id)
	waitFailed(t, cl)

	mon := newMonitor(t, dst.sock) // go-qemu: dies on a reply line over 64 KiB
	var q struct {
		Return MigrationInfo `json:"return"`
	}
	if err := json.Unmarshal(mon.run(`{"execute":"query-migrate"}`), &q); err != nil {
		t.Fatal(err)
	}
	desc := q.Return.ErrorDesc
	checkPrintable(t, "query-migrate error-desc", desc)
	if !strings.Contains(desc, "guest") || !strings.Contains(desc, `\x1b`) {
		t.Fatalf("error-desc does not name the guest ID or shows no escape for ESC: %.300q", desc)
	}
	var m struct {
		Return MachineInfo `json:"return"`
	}
	if err := json.Unmarshal(mon.run(`{"execute":"query-migctl-machine","arguments":{"history":32}}`), &m); err != nil {
		t.Fatal(err)
	}
	checkPrintable(t, "query-migctl-machine error-desc", m.Return.Incoming.ErrorDesc)
	for _, h := range m.Return.Incoming.History {
		checkPrintable(t, "query-migctl-machine history", h.Detail)
	}
}

// checkPrintable fails when s is longer than MaxDesc or carries a byte a
// terminal would act on.
func checkPrintable(t *testing.T, what, s string) {
	t.Helper()
	if len(s) > MaxDesc {
		t.Fatalf("%s is %d bytes, more than MaxDesc (%d)", what, len(s), MaxDesc)
	}
	if !utf8.ValidString(s) {
		t.Fatalf("%s is not valid UTF-8: %.200q", what, s)
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == '\u202e' {
			t.Fatalf("%s carries %U: %.200q", what, r, s)
		}
	}
}

func waitFailed(t *testing.T, cl *Client) {
	t.Helper()
	run(t, cl, "migrate-set-capabilities", caps("events", true))
	if queryMigrate(t, cl).Status == "failed" {
		return
	}
	waitStatus(t, cl, "failed")
}

// query-migrate's error-desc is bounded and printable whatever a side's
// error says, on both sides (the source's may quote a destination's
// failure reason, the destination's a source's announcement).
func TestMigrationInfoErrorDescIsSafe(t *testing.T) {
	hostile := "\x1b[31m" + strings.Repeat("R", 100<<10) + "\xff"
	for _, tc := range []struct {
		name    string
		in, out machine.Status
	}{
		{"destination", machine.Status{Report: spec.ReportFinal, QMPStatus: "failed", Error: hostile}, machine.Status{Report: spec.ReportNone}},
		{"source", machine.Status{Report: spec.ReportNone}, machine.Status{Report: spec.ReportFinal, QMPStatus: "failed", Error: hostile}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info := migrationInfo(tc.in, tc.out, time.Now())
			if info.ErrorDesc == "" || !strings.HasPrefix(info.ErrorDesc, `\x1b[31mRRR`) {
				t.Fatalf("error-desc %.100q: want the error, escaped", info.ErrorDesc)
			}
			checkPrintable(t, "error-desc", info.ErrorDesc)
		})
	}
}

// query-migctl-machine shows a side's error and history details bounded
// and printable, whatever reason a failure was recorded with.
func TestMachineInfoIsSafe(t *testing.T) {
	c, err := machine.New(testSpec(t), machine.Options{Incoming: true})
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(c, noopHost{}, Options{})
	t.Cleanup(func() { s.Close(); c.Close() })
	ctx := context.Background()
	hostile := "\x1b[31m" + strings.Repeat("M", 100<<10)
	ep := &guards.Endpoint{Transport: "tcp", URI: "tcp:127.0.0.1:1"}
	for _, step := range []struct {
		tr machine.Trigger
		a  *machine.Args
	}{{machine.TriggerIncoming, &machine.Args{Endpoint: ep}}, {machine.TriggerListen, nil}, {machine.TriggerFail, &machine.Args{Reason: hostile}}} {
		if _, err := s.c.Fire(ctx, spec.Incoming, step.tr, step.a); err != nil {
			t.Fatal(err)
		}
	}
	out := feed(s, []byte(`{"execute":"query-migctl-machine","arguments":{"history":32}}`), true)
	if len(out) != 1 {
		t.Fatalf("replies: %q", out)
	}
	var r struct{ Return MachineInfo }
	if err := json.Unmarshal(out[0], &r); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(r.Return.Incoming.ErrorDesc, `\x1b[31mMMM`) {
		t.Fatalf("error-desc %.100q", r.Return.Incoming.ErrorDesc)
	}
	checkPrintable(t, "error-desc", r.Return.Incoming.ErrorDesc)
	for _, h := range r.Return.Incoming.History {
		checkPrintable(t, "history detail", h.Detail)
	}
}
