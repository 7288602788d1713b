package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The core's contract across two `migctl serve` processes driven over QMP
// (issue 7, items 1–5): each test reproduces what was wrong and checks
// QEMU's behaviour.

const smallGuest = "--guest=size=8M,dirty-rate=4M,seed=11"

func capsJSON(kv ...any) string {
	var list []string
	for i := 0; i < len(kv); i += 2 {
		list = append(list, fmt.Sprintf(`{"capability":%q,"state":%v}`, kv[i], kv[i+1]))
	}
	return `{"execute":"migrate-set-capabilities","arguments":{"capabilities":[` + strings.Join(list, ",") + `]}}`
}

// closedPort returns a loopback TCP port nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	return port
}

// Item 1: once an incoming migration ended — completed, failed or
// cancelled — the destination takes capability and frozen-parameter
// changes again, as QEMU does.
func TestDestinationReconfigurableAfterItEnded(t *testing.T) {
	for _, end := range []string{"completed", "failed", "cancelled"} {
		t.Run(end, func(t *testing.T) {
			dst := startServe(t, "dst", smallGuest, "--destination")
			dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
			port := listenPort(t, dst.info())
			switch end {
			case "completed", "failed":
				src := startServe(t, "src", smallGuest)
				if end == "failed" { // a must-match mismatch fails both sides at connect
					src.ok(capsJSON("return-path", true))
				}
				src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)
				src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
			case "cancelled":
				dst.ok(`{"execute":"migrate_cancel"}`)
			}
			dst.waitStatus(end)
			dst.ok(capsJSON("events", true, "pause-before-switchover", true))
			dst.ok(`{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4}}`)
			var params map[string]any
			json.Unmarshal(dst.ok(`{"execute":"query-migrate-parameters"}`), &params)
			if fmt.Sprint(params["multifd-channels"]) != "4" {
				t.Fatalf("multifd-channels after the change: %v", params["multifd-channels"])
			}
		})
	}
}

// Item 2: a migrate-incoming whose transport cannot be opened fails and
// may be retried; QEMU consumes -incoming only once it listens.
func TestIncomingRetryAfterTransportError(t *testing.T) {
	dst := startServe(t, "dst", smallGuest, "--destination")
	dst.refused(`{"execute":"migrate-incoming","arguments":{"uri":"file:/nonexistent/dir/x"}}`, "/nonexistent/dir/x")
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dst.refused(fmt.Sprintf(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:%s"}}`, busy.Addr()), "address already in use")
	if st, ok := dst.info()["status"]; ok {
		t.Fatalf("a failed migrate-incoming left status %v, want none ({})", st)
	}
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}`)
	if st := dst.info()["status"]; st != "setup" {
		t.Fatalf("after the retry: status %v, want setup (listening)", st)
	}
	// Once it listens, -incoming is consumed (QEMU's wording).
	dst.refused(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}`, "The incoming migration has already been started")
}

// Item 3: a side's transport is forgotten when its migration ends: after a
// failed exec: migration (exec has no return path) the source can switch
// return-path on again, as QEMU checks the transport only at migrate.
func TestEndedMigrationTransportForgotten(t *testing.T) {
	src := startServe(t, "src", smallGuest)
	src.ok(`{"execute":"migrate","arguments":{"uri":"exec:false"}}`)
	src.waitStatus("failed")
	src.ok(capsJSON("return-path", true))
	// ...and judged against the next transport when it is named.
	src.refused(`{"execute":"migrate","arguments":{"uri":"exec:cat >/dev/null"}}`, "return-path", "exec")
}

// Item 4: tls-creds can never be accepted and then ignored: it is
// honoured (issue 12), so a destination that already listens refuses one
// naming no credentials, and a source that accepted it while idle (a
// string until a migration uses it, as in QEMU) refuses to migrate
// without them, each with the reason. libvirt's always-on set (late-block-activate on the destination,
// pause-before-switchover and events on both) is accepted — the first as
// vacuous, the second honoured — and a migration with it completes.
func TestSettingsHonouredRefusedOrVacuous(t *testing.T) {
	src := startServe(t, "src", smallGuest)
	dst := startServe(t, "dst", smallGuest, "--destination")
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	dst.refused(`{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls0"}}`, "tls-creds", "TLS", "No TLS credentials with id 'tls0'")
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls0"}}`)
	port := listenPort(t, dst.info())
	src.refused(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port), "tls-creds", "No TLS credentials with id 'tls0'")
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"tls-creds":""}}`)
	dst.ok(`{"execute":"migrate-set-parameters","arguments":{"tls-creds":""}}`) // clearing it is fine, as libvirt does

	dst.ok(capsJSON("late-block-activate", true))
	src.ok(capsJSON("pause-before-switchover", true))
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("pre-switchover")
	src.ok(`{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}`)
	src.waitStatus("completed")
	dst.waitStatus("completed")
	var st struct {
		Status string `json:"status"`
	}
	json.Unmarshal(dst.ok(`{"execute":"query-status"}`), &st)
	if st.Status != "running" {
		t.Fatalf("destination run state %q after completion", st.Status)
	}
}

// explainRow is one configuration judged by `migctl explain` and by a real
// migrate or migrate-incoming; want is written by hand from QEMU's rules
// and migctl's declared limits (transitions.yaml), never computed.
type explainRow struct {
	side      string // outgoing or incoming
	uri       string // %s is replaced by a unique temporary path
	caps      []string
	params    map[string]any
	runState  string // "" for the side's natural start; postmigrate needs a completed migration first
	want      bool   // allowed
	rule      string // for a refusal: a rule that must be named by explain
	aboutRule string
}

// Item 5: `migctl explain` is the machine's own judgement: on every row its
// verdict, the hand-written one and a real migctl serve's agree. When a
// later issue implements a capability refused today by
// migctl/not-implemented, that issue flips the row.
func TestExplainAgreesWithTheMachine(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "saved.mig")
	if err := os.WriteFile(existing, []byte("not a stream"), 0o600); err != nil {
		t.Fatal(err)
	}
	closed := "tcp:127.0.0.1:" + closedPort(t)
	rows := []explainRow{
		// outgoing
		{side: "outgoing", uri: closed, want: true},
		{side: "outgoing", uri: closed, caps: []string{"multifd"}, want: true}, // implemented by the data-plane work (issue 8)
		{side: "outgoing", uri: closed, caps: []string{"multifd"}, params: map[string]any{"multifd-compression": "qatzip"}, rule: "migctl/no-hw-compression"},
		{side: "outgoing", uri: "exec:false", caps: []string{"multifd"}, rule: "multifd/needs-multi-channel"},
		{side: "outgoing", uri: closed, caps: []string{"xbzrle"}, rule: "migctl/not-implemented"},
		{side: "outgoing", uri: "file:" + filepath.Join(dir, "a.mig"), caps: []string{"mapped-ram"}, want: true}, // implemented by the data-plane work (issue 8)
		{side: "outgoing", uri: "file:" + filepath.Join(dir, "b.mig"), caps: []string{"multifd"}, rule: "multifd/file-needs-mapped-ram"},
		{side: "outgoing", uri: "file:" + filepath.Join(dir, "c.mig"), caps: []string{"multifd", "mapped-ram"}, params: map[string]any{"direct-io": true}, want: true},
		{side: "outgoing", uri: closed, caps: []string{"mapped-ram"}, rule: "mapped-ram/transports"},
		{side: "outgoing", uri: "exec:false", caps: []string{"return-path"}, rule: "return-path/needs-transport/return-path"},
		{side: "outgoing", uri: "unix:" + filepath.Join(dir, "nobody.sock"), caps: []string{"return-path"}, want: true},
		{side: "outgoing", uri: closed, caps: []string{"return-path", "switchover-ack"}, want: true},
		{side: "outgoing", uri: closed, caps: []string{"switchover-ack"}, rule: "switchover-ack/requires/return-path"},
		{side: "outgoing", uri: closed, caps: []string{"pause-before-switchover"}, want: true},
		{side: "outgoing", uri: closed, caps: []string{"events", "late-block-activate"}, want: true},
		{side: "outgoing", uri: closed, caps: []string{"auto-converge"}, want: true},
		{side: "outgoing", uri: closed, caps: []string{"postcopy-ram"}, want: true}, // implemented by postcopy (issue 11)
		{side: "outgoing", uri: "rdma:127.0.0.1:1", caps: []string{"xbzrle"}, rule: "rdma/no-xbzrle"},
		{side: "outgoing", uri: "rdma:127.0.0.1:1", caps: []string{"rdma-pin-all"}, want: true}, // implemented by the rdma: transport (issue 10)
		{side: "outgoing", uri: closed, caps: []string{"rdma-pin-all"}, rule: "rdma-pin-all/transports"},
		// TLS runs on two-way sockets (issue 12); one-way transports and
		// rdma: (which QEMU would run in the clear) are refused.
		{side: "outgoing", uri: "exec:false", params: map[string]any{"tls-creds": "tls0", "tls-hostname": "dst"}, rule: "migctl/tls-needs-two-way"},
		{side: "outgoing", uri: "rdma:127.0.0.1:1", params: map[string]any{"tls-creds": "tls0"}, rule: "migctl/rdma-no-tls"},
		// postcopy's preempt and recovery channels carry no TLS yet.
		{side: "outgoing", uri: closed, caps: []string{"postcopy-ram"}, params: map[string]any{"tls-creds": "tls0"}, rule: "migctl/postcopy-no-tls"},
		{side: "outgoing", uri: closed, params: map[string]any{"mode": "cpr-reboot"}, rule: "migctl/mode-normal-only"},
		{side: "outgoing", uri: closed, params: map[string]any{"mode": "cpr-exec"}, rule: "mode/cpr-exec-needs-command"},
		{side: "outgoing", uri: closed, params: map[string]any{"zero-page-detection": "none"}, want: true},
		{side: "outgoing", uri: closed, params: map[string]any{"multifd-compression": "zstd"}, want: true},
		{side: "outgoing", uri: closed, params: map[string]any{"max-cpu-throttle": 10}, rule: "max-cpu-throttle/at-least-initial"},
		{side: "outgoing", uri: closed, caps: []string{"background-snapshot"}, rule: "migctl/not-implemented"},
		{side: "outgoing", uri: closed, caps: []string{"validate-uuid"}, want: true}, // implemented by the security work (issue 12)
		{side: "outgoing", uri: "exec:false", caps: []string{"auto-converge", "pause-before-switchover"}, want: true},
		{side: "outgoing", uri: closed, runState: "inmigrate", rule: "guest/waiting-for-incoming"},
		{side: "outgoing", uri: closed, runState: "postmigrate", rule: "guest/postmigrate"},
		// incoming
		{side: "incoming", uri: "tcp:127.0.0.1:0", want: true},
		{side: "incoming", uri: "rdma:127.0.0.1:0", caps: []string{"mapped-ram"}, rule: "mapped-ram/transports"},
		{side: "incoming", uri: "rdma:127.0.0.1:0", want: true},                           // the destination runs --rdma-provider soft (issue 10)
		{side: "incoming", uri: "tcp:127.0.0.1:0", caps: []string{"multifd"}, want: true}, // implemented by the data-plane work (issue 8)
		{side: "incoming", uri: "file:" + existing, want: true},
		{side: "incoming", uri: "file:" + existing, caps: []string{"mapped-ram"}, want: true}, // implemented by the data-plane work (issue 8)
		{side: "incoming", uri: "unix:" + filepath.Join(dir, "in%s.sock"), caps: []string{"return-path"}, want: true},
		{side: "incoming", uri: "tcp:127.0.0.1:0", caps: []string{"background-snapshot"}, rule: "background-snapshot/not-incoming"},
		// Postcopy is implemented (issue 11), for a destination whose guest
		// runs in its own process (--guest …,postcopy=on) only.
		{side: "incoming", uri: "tcp:127.0.0.1:0", caps: []string{"postcopy-ram", "postcopy-preempt"}, rule: "postcopy-ram/needs-guest-process"},
		{side: "incoming", uri: "exec:cat " + existing, caps: []string{"return-path"}, rule: "return-path/needs-transport/return-path"},
		{side: "incoming", uri: "file:" + existing, params: map[string]any{"tls-creds": "tls0"}, rule: "migctl/tls-needs-two-way"},
		{side: "incoming", uri: "tcp:127.0.0.1:0", caps: []string{"return-path", "switchover-ack"}, want: true},
		{side: "incoming", uri: "tcp:127.0.0.1:0", caps: []string{"late-block-activate", "events"}, want: true},
		{side: "incoming", uri: "tcp:127.0.0.1:0", runState: "running", rule: "guest/no-incoming"},
	}
	refused, allowed := 0, 0
	var src *serveProc // reused by the outgoing rows (a refused or failed migrate leaves it reusable)
	for i, r := range rows {
		uri := strings.ReplaceAll(r.uri, "%s", fmt.Sprint(i))
		name := fmt.Sprintf("%02d %s %s caps=%v params=%v %s", i, r.side, uri, r.caps, r.params, r.runState)
		// explain
		args := []string{"explain", "--side", r.side, "--transport", uri}
		for _, c := range r.caps {
			args = append(args, "--cap", c)
		}
		for k, v := range r.params {
			args = append(args, "--param", fmt.Sprintf("%s=%v", k, v))
		}
		if r.runState != "" {
			args = append(args, "--run-state", r.runState)
		}
		out, errOut, code := run(t, args...)
		explained := code == 0
		if code > 1 {
			t.Fatalf("%s: explain exit %d: %s %s", name, code, out, errOut)
		}
		if !r.want && !strings.Contains(out, "REFUSED  "+r.rule) {
			t.Errorf("%s: explain does not name rule %s:\n%s", name, r.rule, out)
		}
		// the real thing
		var p *serveProc
		switch {
		case r.side == "incoming" && r.runState == "":
			args := []string{smallGuest, "--destination"}
			if strings.HasPrefix(uri, "rdma:") {
				args = append(args, "--rdma-provider", "soft") // verbs has no device here
			}
			p = startServe(t, fmt.Sprintf("dst%d", i), args...)
		case r.side == "incoming":
			p = startServe(t, fmt.Sprintf("src%d", i), smallGuest) // a source process: no -incoming
		case r.runState == "inmigrate":
			p = startServe(t, fmt.Sprintf("dst%d", i), smallGuest, "--destination")
		case r.runState == "postmigrate":
			p = startServe(t, fmt.Sprintf("src%d", i), smallGuest)
			dst := startServe(t, fmt.Sprintf("dst%d", i), smallGuest, "--destination")
			dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}`)
			p.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)
			p.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, listenPort(t, dst.info())))
			p.waitStatus("completed")
		default:
			if src == nil {
				src = startServe(t, "src", smallGuest)
			}
			p = src
		}
		real := realVerdict(t, p, r, uri)
		if p == src {
			resetSource(t, src)
		}
		if explained != r.want || real != r.want {
			t.Errorf("%s: want allowed=%v, explain says %v, the real %s says %v\nexplain:\n%s", name, r.want, explained, r.side, real, out)
		}
		if r.want {
			allowed++
		} else {
			refused++
		}
	}
	if refused < 10 || allowed < 10 || len(rows) < 30 {
		t.Fatalf("the table needs at least 30 rows, 10 refused and 10 allowed: %d rows, %d refused, %d allowed", len(rows), refused, allowed)
	}
}

// realVerdict sets the row's capabilities and parameters and starts the
// migration on p; it reports whether nothing was refused.
func realVerdict(t *testing.T, p *serveProc, r explainRow, uri string) bool {
	t.Helper()
	if len(r.caps) > 0 {
		var kv []any
		for _, c := range r.caps {
			kv = append(kv, c, true)
		}
		if _, err := p.run(capsJSON(kv...)); err != nil {
			return false
		}
	}
	if len(r.params) > 0 {
		b, _ := json.Marshal(r.params)
		if _, err := p.run(`{"execute":"migrate-set-parameters","arguments":` + string(b) + `}`); err != nil {
			return false
		}
	}
	cmd := "migrate"
	if r.side == "incoming" {
		cmd = "migrate-incoming"
	}
	b, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": map[string]any{"uri": uri}})
	_, err := p.run(string(b))
	return err == nil
}

// resetSource ends whatever the shared source started and puts its
// configuration back to the defaults the next row expects.
func resetSource(t *testing.T, p *serveProc) {
	t.Helper()
	p.ok(`{"execute":"migrate_cancel"}`)
	for {
		st, _ := p.info()["status"].(string)
		if st == "completed" {
			// A save to a file may complete before the cancel: the guest
			// waits in postmigrate until cont, as QEMU's does.
			p.ok(`{"execute":"cont"}`)
			break
		}
		if st == "" || st == "failed" || st == "cancelled" {
			break
		}
		p.waitStatusChange()
	}
	var caps []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	json.Unmarshal(p.ok(`{"execute":"query-migrate-capabilities"}`), &caps)
	var off []any
	for _, c := range caps {
		if c.State && c.Capability != "events" {
			off = append(off, c.Capability, false)
		}
	}
	if len(off) > 0 {
		p.ok(capsJSON(off...))
	}
	p.ok(`{"execute":"migrate-set-parameters","arguments":{"tls-creds":"","mode":"normal","zero-page-detection":"multifd","multifd-compression":"none","max-cpu-throttle":99,"direct-io":false}}`)
}

// waitStatusChange waits for the next MIGRATION event (bounded).
func (p *serveProc) waitStatusChange() {
	p.t.Helper()
	select {
	case <-p.changed:
	case <-time.After(60 * time.Second):
		p.t.Fatal("no MIGRATION event within 60 s")
	}
}
