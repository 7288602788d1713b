package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// serveProc is a `migctl serve` process and a go-qemu monitor on it.
type serveProc struct {
	t    *testing.T
	cmd  *exec.Cmd
	sock string
	mon  *goqmp.SocketMonitor
	// banner is serve's first line ("serving QMP on …").
	banner string

	mu       sync.Mutex
	statuses []string
	changed  chan struct{}
	drained  chan struct{}
}

// startServe starts `migctl serve` in its own process and connects
// go-qemu's SocketMonitor — a QMP client nobody here wrote — to it.
func startServe(t *testing.T, name string, args ...string) *serveProc {
	t.Helper()
	return startServeBin(t, binary, name, args...)
}

// startServeBin is startServe with another migctl binary.
func startServeBin(t *testing.T, bin, name string, args ...string) *serveProc {
	t.Helper()
	sock := filepath.Join(t.TempDir(), name+".sock")
	cmd := exec.Command(bin, append([]string{"serve", "--qmp", "unix:" + sock}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	// A guest process (--guest …,postcopy=on) inherits stderr and may
	// outlive a killed serve: Wait stops copying from it after this.
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &serveProc{t: t, cmd: cmd, sock: sock, changed: make(chan struct{}, 1), drained: make(chan struct{})}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	banner, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.Contains(banner, "serving QMP") {
		t.Fatalf("%s: serve said %q (%v); stderr: %s", name, banner, err, stderr.String())
	}
	p.banner = banner
	p.mon, err = goqmp.NewSocketMonitor("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.mon.Connect(); err != nil {
		t.Fatal(err)
	}
	evs, err := p.mon.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.drained)
		for ev := range evs {
			if ev.Event == "MIGRATION" {
				p.mu.Lock()
				p.statuses = append(p.statuses, fmt.Sprint(ev.Data["status"]))
				p.mu.Unlock()
				select {
				case p.changed <- struct{}{}:
				default:
				}
			}
		}
	}()
	t.Cleanup(func() { p.mon.Disconnect(); <-p.drained })
	if !slices.Contains(args, "--reattach") { // a reattached serve has them on, its configuration frozen
		p.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}`)
	}
	return p
}

// run executes a command and returns the reply's "return" or the error.
func (p *serveProc) run(cmd string) (json.RawMessage, error) {
	out, err := p.mon.Run([]byte(cmd))
	if err != nil {
		return nil, err
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, err
	}
	return r.Return, nil
}

func (p *serveProc) ok(cmd string) json.RawMessage {
	p.t.Helper()
	r, err := p.run(cmd)
	if err != nil {
		p.t.Fatalf("%s: %v", cmd, err)
	}
	return r
}

// refused runs cmd and checks it fails with a text naming every want.
func (p *serveProc) refused(cmd string, want ...string) {
	p.t.Helper()
	_, err := p.run(cmd)
	if err == nil {
		p.t.Fatalf("%s: accepted, want a refusal naming %q", cmd, want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			p.t.Errorf("%s: refusal %q does not name %q", cmd, err, w)
		}
	}
}

func (p *serveProc) waitStatus(want string) []string {
	p.t.Helper()
	timer := time.NewTimer(60 * time.Second)
	defer timer.Stop()
	for {
		p.mu.Lock()
		seen := slices.Clone(p.statuses)
		p.mu.Unlock()
		if slices.Contains(seen, want) {
			return seen
		}
		select {
		case <-p.changed:
		case <-timer.C:
			p.t.Fatalf("no MIGRATION %s (seen %v)", want, seen)
		}
	}
}

func (p *serveProc) info() map[string]any {
	p.t.Helper()
	var m map[string]any
	if err := json.Unmarshal(p.ok(`{"execute":"query-migrate"}`), &m); err != nil {
		p.t.Fatal(err)
	}
	return m
}

func listenPort(t *testing.T, info map[string]any) string {
	t.Helper()
	addrs, _ := info["socket-address"].([]any)
	if len(addrs) == 0 {
		t.Fatalf("query-migrate has no socket-address: %v", info)
	}
	a := addrs[0].(map[string]any)
	return fmt.Sprint(a["port"])
}

// A full migration between two `migctl serve` processes driven only over
// QMP by go-qemu, with the capability-change window closed on both sides.
func TestServeProcessesOverQMP(t *testing.T) {
	guest := "--guest=size=32M,dirty-rate=16M,seed=3"
	src := startServe(t, "src", guest)
	dst := startServe(t, "dst", guest, "--destination")

	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	// (a) the window, while listening: refused at once, naming both.
	dst.refused(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}`, "mapped-ram", "tcp")
	port := listenPort(t, dst.info())

	// Slow the source so it can be caught running.
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":8388608}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("active")
	// (c) while running: capabilities and frozen parameters refused with the
	// state named; live parameters still apply.
	src.refused(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":true}]}}`, "xbzrle", "active")
	src.refused(`{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4}}`, "multifd-channels", "active")
	dst.waitStatus("active")
	dst.refused(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":true}]}}`, "xbzrle")
	dst.ok(`{"execute":"migrate-set-parameters","arguments":{"downtime-limit":100}}`)
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)

	srcSeen := src.waitStatus("completed")
	dstSeen := dst.waitStatus("completed")
	for _, c := range []struct {
		side string
		seen []string
		want []string
	}{{"source", srcSeen, []string{"setup", "active", "device", "completed"}}, {"destination", dstSeen, []string{"setup", "active", "completed"}}} {
		i := 0
		for _, s := range c.seen {
			if i < len(c.want) && s == c.want[i] {
				i++
			}
		}
		if i != len(c.want) {
			t.Errorf("%s: MIGRATION events %v, want %v in order", c.side, c.seen, c.want)
		}
	}
	if st := src.info()["status"]; st != "completed" {
		t.Fatalf("source query-migrate status %v", st)
	}
}

// (b) A must-match capability that differs fails the migration on both
// sides at connect, with the reason in error-desc; the source keeps
// running.
func TestServeCapabilityMismatchOverQMP(t *testing.T) {
	guest := "--guest=size=16M,dirty-rate=8M,seed=4"
	src := startServe(t, "src", guest)
	dst := startServe(t, "dst", guest, "--destination")
	src.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":true}]}}`)
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	port := listenPort(t, dst.info())
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("failed")
	dst.waitStatus("failed")
	for name, p := range map[string]*serveProc{"source": src, "destination": dst} {
		desc := fmt.Sprint(p.info()["error-desc"])
		for _, want := range []string{"return-path", "source has it on", "destination has it off"} {
			if !strings.Contains(desc, want) {
				t.Errorf("%s error-desc %q does not name %q", name, desc, want)
			}
		}
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	json.Unmarshal(src.ok(`{"execute":"query-status"}`), &st)
	if !st.Running {
		t.Errorf("source guest not running after the failure: %+v", st)
	}
}

// The CLI end to end across processes: two `migctl serve`, `migctl
// incoming`, `migctl migrate` with progress, and `migctl status -o json`
// showing completed on both sides.
func TestServeCLIAcrossProcesses(t *testing.T) {
	guest := "--guest=size=32M,dirty-rate=16M,seed=5"
	src := startServe(t, "src", guest)
	dst := startServe(t, "dst", guest, "--destination")
	out, errOut, code := run(t, "incoming", "-s", dst.sock, "tcp:127.0.0.1:0")
	if code != 0 || !strings.Contains(out, "listening on tcp:127.0.0.1:") {
		t.Fatalf("incoming: exit %d, %q %q", code, out, errOut)
	}
	uri := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "listening on "))
	out, errOut, code = run(t, "migrate", "-s", src.sock, uri, "--param", "max-bandwidth=0")
	if code != 0 {
		t.Fatalf("migrate: exit %d\n%s\n%s", code, out, errOut)
	}
	if !strings.Contains(out+errOut, "completed") {
		t.Errorf("migrate printed no completion:\n%s\n%s", out, errOut)
	}
	for name, p := range map[string]*serveProc{"source": src, "destination": dst} {
		p.waitStatus("completed")
		out, _, code := run(t, "status", "-s", p.sock, "-o", "json")
		var info map[string]any
		if code != 0 || json.Unmarshal([]byte(out), &info) != nil || info["status"] != "completed" {
			t.Errorf("%s: status -o json exit %d: %s", name, code, out)
		}
	}
}

// serve -S is QEMU's -S: a source's guest does not run until cont; a
// destination's stays paused when its migration arrives, until cont
// (issue 9, item 2).
func TestServePaused(t *testing.T) {
	guest := "--guest=size=16M,dirty-rate=8M,seed=5"
	src := startServe(t, "src", guest, "-S")
	dst := startServe(t, "dst", guest+",prealloc=on", "--destination", "-S")
	status := func(p *serveProc) string {
		var rs struct {
			Status  string `json:"status"`
			Running bool   `json:"running"`
		}
		if err := json.Unmarshal(p.ok(`{"execute":"query-status"}`), &rs); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%s/%v", rs.Status, rs.Running)
	}
	if got := status(src); got != "prelaunch/false" {
		t.Fatalf("source with -S: %s, want prelaunch/false", got)
	}
	if got := status(dst); got != "inmigrate/false" {
		t.Fatalf("destination with -S: %s, want inmigrate/false", got)
	}
	src.ok(`{"execute":"cont"}`)
	if got := status(src); got != "running/true" {
		t.Fatalf("source after cont: %s", got)
	}
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}`)
	info := dst.info()
	// prealloc=on: the destination prepared its memory before it served,
	// and says how long that took apart from the migration.
	if ms, ok := info["x-migctl-prepare-ms"].(float64); !ok || ms < 0 {
		t.Fatalf("a prepared destination's query-migrate has no x-migctl-prepare-ms: %v", info)
	}
	port := listenPort(t, info)
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("completed")
	dst.waitStatus("completed")
	if got := status(dst); got != "paused/false" {
		t.Fatalf("destination with -S after its migration: %s, want paused/false", got)
	}
	dst.ok(`{"execute":"cont"}`)
	if got := status(dst); got != "running/true" {
		t.Fatalf("destination after cont: %s", got)
	}
}
