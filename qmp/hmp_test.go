package qmp

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/internal/intent"
)

// hmp runs one HMP command line and returns its output.
func hmp(t *testing.T, cl *Client, line string) string {
	t.Helper()
	var out string
	if err := json.Unmarshal(run(t, cl, "human-monitor-command", map[string]any{"command-line": line}), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// QEMU's HMP text for the run state and the listings, from
// monitor/hmp-cmds.c and hmp-commands*.hx: each line ends in CRLF, as
// QEMU's monitor writes them.
func TestHMPStatusAndHelp(t *testing.T) {
	src := newNode(t, nodeOpts{})
	dst := newNode(t, nodeOpts{dest: true})
	s, d := src.client(t), dst.client(t)
	for _, c := range []struct {
		cl         *Client
		line, want string
	}{
		{s, "info status", "VM status: running\r\n"},
		{d, "info status", "VM status: paused (inmigrate)\r\n"},
		{s, "stop", ""},
		{s, "info status", "VM status: paused\r\n"},
		{s, "c", ""},
		{s, "info status", "VM status: running\r\n"},
		{s, "bogus", "unknown command: 'bogus'\r\n"},
		{s, "info bogus", "unknown command: 'info bogus'\r\n"},
		{s, "", ""},
	} {
		if got := hmp(t, c.cl, c.line); got != c.want {
			t.Errorf("%q: got %q, want %q", c.line, got, c.want)
		}
	}
	help := hmp(t, s, "help")
	for _, want := range []string{"info [subcommand] -- show various information about the system state\r\n", "cont|c  -- resume emulation\r\n"} {
		if !strings.Contains(help, want) {
			t.Errorf("help lacks %q:\n%s", want, help)
		}
	}
	// qmp-shell -H completes "info X" from the second word of each line.
	info := hmp(t, s, "info")
	for _, want := range []string{"info migrate  -- show migration status\r\n", "info migrate_capabilities  -- ", "info migrate_parameters  -- ", "info status  -- "} {
		if !strings.Contains(info, want) {
			t.Errorf("info lacks %q:\n%s", want, info)
		}
	}
	if e := fails(t, s, "human-monitor-command", map[string]any{}); !strings.Contains(e.Desc, "command-line") {
		t.Errorf("no command-line: %q", e.Desc)
	}
	if out := hmp(t, s, "migrate_continue pre-switchover"); !strings.HasPrefix(out, "Error: ") || !strings.HasSuffix(out, "\r\n") {
		t.Errorf("migrate_continue with nothing paused: %q, want an Error: line", out)
	}
}

// info migrate_capabilities and info migrate_parameters: QEMU's
// "name: value" lines with its units, QEMU's defaults before anything is
// set (qapi/migration.json, migration/options.c).
func TestHMPCapabilitiesAndParameters(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)
	caps := strings.Split(strings.TrimSuffix(hmp(t, cl, "info migrate_capabilities"), "\r\n"), "\r\n")
	if len(caps) != len(testSpec(t).Capabilities) || caps[0] != "xbzrle: off" {
		t.Fatalf("info migrate_capabilities: %d lines, first %q; want one per capability, xbzrle first", len(caps), caps[0])
	}
	run(t, cl, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}})
	if out := hmp(t, cl, "info migrate_capabilities"); !strings.Contains(out, "\r\nevents: on\r\n") {
		t.Errorf("events on is not shown:\n%s", out)
	}
	params := hmp(t, cl, "info migrate_parameters")
	want := []string{
		"announce-initial: 50 ms",
		"announce-max: 550 ms",
		"announce-rounds: 5",
		"announce-step: 100 ms",
		"throttle-trigger-threshold: 50",
		"cpu-throttle-initial: 20",
		"cpu-throttle-increment: 10",
		"cpu-throttle-tailslow: off",
		"max-cpu-throttle: 99",
		"tls-creds: ''",
		"tls-hostname: ''",
		"max-bandwidth: 134217728 bytes/second",
		"avail-switchover-bandwidth: 0 bytes/second",
		"downtime-limit: 300 ms",
	}
	lines := strings.Split(params, "\r\n")
	if len(lines) < len(want) {
		t.Fatalf("info migrate_parameters:\n%s", params)
	}
	for i, w := range want {
		if lines[i] != w {
			t.Errorf("line %d: got %q, want %q", i+1, lines[i], w)
		}
	}
	for _, w := range []string{"\r\nxbzrle-cache-size: 67108864 bytes\r\n", "\r\nmultifd-compression: none\r\n", "\r\nvcpu-dirty-limit: 1 MB/s\r\n", "\r\nmode: normal\r\n"} {
		if !strings.Contains(params, w) {
			t.Errorf("info migrate_parameters lacks %q", w)
		}
	}
	if strings.Contains(params, "multifd-zstd-level") {
		t.Errorf("info migrate_parameters shows multifd-zstd-level, which QEMU's does not")
	}
}

// info migrate on a listening destination and on a source after a
// migration: QEMU's lines, in QEMU's order.
func TestHMPInfoMigrate(t *testing.T) {
	src := newNode(t, nodeOpts{})
	dst := newNode(t, nodeOpts{dest: true})
	s, d := src.client(t), dst.client(t)
	if out := hmp(t, s, "info migrate"); out != "" {
		t.Errorf("info migrate before any migration: %q, want nothing (QEMU prints only its globals)", out)
	}
	run(t, d, "migrate-set-capabilities", caps("events", true))
	run(t, s, "migrate-set-capabilities", caps("events", true))
	uri := listen(t, d, map[string]any{"exit-on-error": false})
	out := hmp(t, d, "info migrate")
	if want := "Migration status: setup\r\ntotal time: 0 ms\r\nsocket address: [\r\n\t" + uri + "\r\n]\r\n"; out != want {
		t.Errorf("listening destination:\n got %q\nwant %q", out, want)
	}
	run(t, s, "migrate-set-parameters", map[string]any{"max-bandwidth": 0})
	run(t, s, "migrate", map[string]any{"uri": uri})
	waitStatus(t, s, "completed")
	out = hmp(t, s, "info migrate")
	order := []string{"Migration status: completed", "total time: ", "downtime: ", "setup: ", "transferred ram: ", "throughput: ",
		"remaining ram: 0 kbytes", "total ram: ", "duplicate: ", "normal: ", "normal bytes: ", "dirty sync count: ",
		"page size: 4 kbytes", "multifd bytes: 0 kbytes", "pages-per-second: "}
	lines := strings.Split(out, "\r\n")
	i := 0
	for _, l := range lines {
		if i < len(order) && strings.HasPrefix(l, order[i]) {
			i++
		}
	}
	if i != len(order) {
		t.Errorf("info migrate on the completed source: found %d of %d lines in order (next %q):\n%s", i, len(order), order[min(i, len(order)-1)], out)
	}
	if !regexp.MustCompile(`\r\ntransferred ram: [1-9][0-9]* kbytes\r\n`).MatchString(out) {
		t.Errorf("no transferred ram:\n%s", out)
	}
	if strings.Contains(out, "expected downtime") {
		t.Errorf("a completed migration shows expected downtime (QEMU shows downtime):\n%s", out)
	}
}

// x-migctl-query-settings says which settings can change now: all of them
// before a migration; while one runs, only live parameters (intent.Mutable
// written by hand, QEMU's migration_is_running()).
func TestQuerySettings(t *testing.T) {
	src := newNode(t, nodeOpts{})
	dst := newNode(t, nodeOpts{dest: true})
	s, d := src.client(t), dst.client(t)
	get := func() SettingsInfo {
		var si SettingsInfo
		if err := json.Unmarshal(run(t, s, "x-migctl-query-settings", nil), &si); err != nil {
			t.Fatal(err)
		}
		return si
	}
	find := func(si SettingsInfo, name string) ParameterInfo {
		for _, p := range si.Parameters {
			if p.Name == name {
				return p
			}
		}
		t.Fatalf("no parameter %s", name)
		return ParameterInfo{}
	}
	si := get()
	if len(si.Capabilities) != len(testSpec(t).Capabilities) || !si.Capabilities[0].Mutable || si.Capabilities[0].Effect == "" {
		t.Fatalf("idle source: %+v", si.Capabilities[0])
	}
	if p := find(si, "downtime-limit"); p.Value != "300" || p.Unit != "ms" || !p.Live || !p.Mutable {
		t.Errorf("downtime-limit: %+v, want 300 ms, live, mutable", p)
	}
	run(t, d, "migrate-set-capabilities", caps("events", true))
	run(t, s, "migrate-set-capabilities", caps("events", true))
	uri := listen(t, d, map[string]any{"exit-on-error": false})
	run(t, s, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 20})
	run(t, s, "migrate", map[string]any{"uri": uri})
	waitStatus(t, s, "active")
	si = get()
	if want := intent.Mutable["outgoing"]["active"]; si.Capabilities[0].Mutable != want {
		t.Errorf("capability %s while active: mutable %v, want %v", si.Capabilities[0].Name, si.Capabilities[0].Mutable, want)
	}
	if p := find(si, "max-bandwidth"); !p.Mutable || p.Value != "1048576" {
		t.Errorf("max-bandwidth (live) while active: %+v", p)
	}
	if p := find(si, "multifd-channels"); p.Mutable {
		t.Errorf("multifd-channels (not live) mutable while active: %+v", p)
	}
	run(t, s, "migrate-set-parameters", map[string]any{"max-bandwidth": 0})
	waitStatus(t, s, "completed")
}

// FuzzHMPCommandLine: any command line gets an answer (the monitor's
// text, CRLF-terminated lines) or a QMP error, never a panic; and every
// answer is valid UTF-8 JSON once encoded.
func FuzzHMPCommandLine(f *testing.F) {
	for _, s := range []string{"info migrate", "info", "help info", "help", "?", "c", "stop", "migrate_continue pre-switchover",
		"info migrate_parameters", "info  status  extra", "\x00", "info \xff", strings.Repeat("info ", 2000)} {
		f.Add(s)
	}
	n := newNode(f, nodeOpts{})
	f.Fuzz(func(t *testing.T, line string) {
		raw, _ := json.Marshal(line)
		var ret any
		var err error
		done := make(chan struct{})
		go func() {
			defer close(done)
			ret, _, err = cmdHMP(n.s, nil, newArgs(map[string]json.RawMessage{"command-line": raw}))
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%q: no answer within 10 s", line)
		}
		if err != nil {
			var seen string // what the server got: invalid UTF-8 became U+FFFD
			_ = json.Unmarshal(raw, &seen)
			if len(seen) <= hmpMaxCommandLine {
				t.Fatalf("%.80q…: error %v for a line within the limit", line, err)
			}
			return
		}
		out, ok := ret.(string)
		if !ok {
			t.Fatalf("%q: return %T", line, ret)
		}
		if out != "" && !strings.HasSuffix(out, "\r\n") {
			t.Fatalf("%q: output %q does not end in CRLF", line, out)
		}
		if b := encodeReply(out, nil); !json.Valid(b) {
			t.Fatalf("%q: reply %q is not JSON", line, b)
		}
	})
}
