package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/creds/credstest"
	"github.com/migctl/migctl/qmp"
)

// syncBuffer collects a process's stderr while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// trustProc is a `migctl serve` with a unix socket (driven by go-qemu as
// its owner) and, when asked, a loopback TCP socket.
type trustProc struct {
	*serveProc
	tcp    string // tcp:127.0.0.1:PORT, or ""
	stderr *syncBuffer
}

// startServeArgs starts `migctl serve --qmp unix:… [--qmp tcp:127.0.0.1:0]
// ARGS…` from the binary bin and connects go-qemu to the unix socket.
func startServeArgs(t *testing.T, bin, name string, withTCP bool, args ...string) *trustProc {
	t.Helper()
	dir, err := os.MkdirTemp("", "migctl-serve-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, name+".sock")
	full := []string{"serve", "--qmp", "unix:" + sock}
	if withTCP {
		full = append(full, "--qmp", "tcp:127.0.0.1:0")
	}
	cmd := exec.Command(bin, append(full, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &trustProc{stderr: &syncBuffer{}}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	br := bufio.NewReader(out)
	for range 1 + btoi(withTCP) {
		banner, err := br.ReadString('\n')
		if err != nil || !strings.HasPrefix(banner, "serving QMP on ") {
			t.Fatalf("%s: serve said %q (%v); stderr: %s", name, banner, err, p.stderr)
		}
		if f := strings.Fields(banner); strings.HasPrefix(f[3], "tcp:") {
			p.tcp = f[3]
		}
	}
	go io.Copy(io.Discard, br)
	sp := &serveProc{t: t, cmd: cmd, sock: sock, changed: make(chan struct{}, 1), drained: make(chan struct{})}
	p.serveProc = sp
	sp.mon, err = goqmp.NewSocketMonitor("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := sp.mon.Connect(); err != nil {
		t.Fatal(err)
	}
	evs, err := sp.mon.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(sp.drained)
		for ev := range evs {
			if ev.Event == "MIGRATION" {
				sp.mu.Lock()
				sp.statuses = append(sp.statuses, fmt.Sprint(ev.Data["status"]))
				sp.mu.Unlock()
				select {
				case sp.changed <- struct{}{}:
				default:
				}
			}
		}
	}()
	t.Cleanup(func() { sp.mon.Disconnect(); <-sp.drained })
	sp.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}`)
	return p
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// asNobody runs bin with args as user nobody (setpriv) and returns its
// output and exit status.
func asNobody(t *testing.T, bin string, args ...string) (out string, code int) {
	t.Helper()
	c := exec.Command("setpriv", append([]string{"--reuid=nobody", "--regid=nogroup", "--clear-groups", bin}, args...)...)
	var o bytes.Buffer
	c.Stdout, c.Stderr = &o, &o
	err := c.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return o.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("setpriv: %v", err)
	}
	return o.String(), 0
}

// needRootAndSetpriv skips unless the test runs as root with setpriv, and
// returns a copy of the migctl binary that user nobody can run.
func needRootAndSetpriv(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("runs a client as user nobody, which needs root (setpriv); skipped: not root")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("runs a client as user nobody with setpriv (util-linux); skipped: setpriv not found")
	}
	if out, err := exec.Command("id", "-u", "nobody").Output(); err != nil || strings.TrimSpace(string(out)) == "" {
		t.Skip("needs the user nobody; skipped: no such user")
	}
	dir, err := os.MkdirTemp("", "migctl-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(binary)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "migctl")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// Issue 12, "what is wrong" 1: any local user drove the loopback TCP
// control socket, including exec: (a shell as the server's user), file:
// and unix: anywhere, and migrate-incoming file: (a read of any file).
// Run as user nobody against two `migctl serve` processes running as
// root, every one of those is refused with a reason that says what to
// change, and nothing happens; what the policy allows still works, and
// the unix socket's owner keeps everything.
func TestNobodyOverTCP(t *testing.T) {
	bin := needRootAndSetpriv(t)
	migDir, err := os.MkdirTemp("", "migctl-migdir-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(migDir) })
	outside := t.TempDir()
	victim := filepath.Join(outside, "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	pwned := filepath.Join(outside, "who")
	guest := "--guest=size=16M,dirty-rate=4M,seed=9"
	src := startServeArgs(t, bin, "src", true, guest, "--migration-dir", migDir)
	dst := startServeArgs(t, bin, "dst", true, guest, "--destination", "--migration-dir", migDir)
	for name, p := range map[string]*trustProc{"source": src, "destination": dst} {
		if !strings.Contains(p.stderr.String(), "every local user can connect") {
			t.Errorf("%s: no startup warning for the TCP socket; stderr:\n%s", name, p.stderr)
		}
	}

	qmpAsNobody := func(p *trustProc, req string) (string, int) {
		t.Helper()
		return asNobody(t, bin, "qmp", "-s", p.tcp, req)
	}
	// As nobody, the client can connect at all (the socket is on
	// loopback), and a harmless query works.
	if out, code := qmpAsNobody(src, `{"execute":"query-status"}`); code != 0 || !strings.Contains(out, `"running"`) {
		t.Fatalf("query-status as nobody: exit %d: %s", code, out)
	}
	for _, c := range []struct {
		p      *trustProc
		req    string
		refuse string
	}{
		{src, `{"execute":"migrate","arguments":{"uri":"exec:id > ` + pwned + `"}}`, "exec: runs a shell command as the server's user"},
		{src, `{"execute":"migrate","arguments":{"uri":"file:` + victim + `"}}`, "must lie under the migration directory " + migDir},
		{src, `{"execute":"migrate","arguments":{"uri":"unix:` + filepath.Join(outside, "m.sock") + `"}}`, "must lie under the migration directory"},
		{src, `{"execute":"migrate","arguments":{"uri":"file:` + migDir + `/../` + filepath.Base(outside) + `/victim"}}`, "without '..'"},
		{dst, `{"execute":"migrate-incoming","arguments":{"uri":"file:` + victim + `"}}`, "must lie under the migration directory"},
		{dst, `{"execute":"migrate-incoming","arguments":{"uri":"exec:cat ` + victim + `"}}`, "exec: runs a shell command"},
		{dst, `{"execute":"migrate-incoming","arguments":{"uri":"unix:` + filepath.Join(outside, "in.sock") + `"}}`, "must lie under the migration directory"},
		{dst, `{"execute":"migrate-incoming","arguments":{"uri":"fd:3"}}`, "register the descriptor with getfd"},
		{src, `{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t","dir":"/root"}}`, "object-add of tls-creds-x509 is refused"},
		{src, `{"execute":"closefd","arguments":{"fdname":"x"}}`, "closefd is refused"},
	} {
		out, code := qmpAsNobody(c.p, c.req)
		if code != 1 || !strings.Contains(out, c.refuse) || !strings.Contains(out, "unix control socket") {
			t.Errorf("as nobody: %s\nexit %d: %s\nwant a refusal saying %q and what to use instead", c.req, code, out, c.refuse)
		}
	}
	if _, err := os.Stat(pwned); err == nil {
		t.Fatal("the exec: command ran")
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Fatalf("the file outside the migration directory was touched: %q", b)
	}
	for name, p := range map[string]*trustProc{"source": src, "destination": dst} {
		if st := p.info()["status"]; st != nil {
			t.Fatalf("%s: a migration ran: %v", name, st)
		}
	}

	// Allowed: as nobody, migrate to a file under the migration directory.
	image := filepath.Join(migDir, "guest.mig")
	if out, code := qmpAsNobody(src, `{"execute":"migrate","arguments":{"uri":"file:`+image+`"}}`); code != 0 {
		t.Fatalf("migrate file: under --migration-dir as nobody: exit %d: %s", code, out)
	}
	src.waitStatus("completed")
	// The owner, over the unix socket, may use exec: anywhere.
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"exec:cat ` + image + `","exit-on-error":false}}`)
	dst.waitStatus("completed")
}

// serve's flags: limits and the trust options take effect, and wrong
// values are refused with what to change.
func TestServeFlags(t *testing.T) {
	guest := "--guest=size=8M,dirty-rate=0,seed=1"
	base := t.TempDir()
	world := filepath.Join(base, "world")
	os.Mkdir(world, 0o777)
	os.Chmod(world, 0o777)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--qmp-max-clients", "0"}, "--qmp-max-clients 0: want at least 1"},
		{[]string{"--qmp-max-pending", "0"}, "--qmp-max-pending 0: want at least 1"},
		{[]string{"--qmp-negotiation-timeout", "0s"}, "want a positive duration"},
		{[]string{"--migration-dir", world}, "writable by its group or by others"},
		{[]string{"--migration-dir", filepath.Join(base, "missing")}, "no such file"},
		{[]string{"--fd", "1"}, "standard input, output and error"},
		{[]string{"--fd", "9"}, "descriptor 9 is not open"},
		{[]string{"--qmp-tls-allow", "CN=*"}, "--qmp-tls-allow needs --qmp-tls-creds"},
		{[]string{"--qmp-tls-creds", base}, "applies to tcp: QMP addresses"},
		{[]string{"--qmp", "unix:" + filepath.Join(world, "s.sock")}, "has no sticky bit"},
	} {
		_, errOut, code := run(t, append([]string{"serve", "--qmp", "unix:" + filepath.Join(base, "ok.sock"), guest}, c.args...)...)
		if code == 0 || !strings.Contains(errOut, c.want) {
			t.Errorf("serve %v: exit %d, stderr %q, want %q", c.args, code, errOut, c.want)
		}
	}

	// --qmp-max-clients 2: the go-qemu monitor and one more; the third is
	// told so.
	p := startServeArgs(t, binary, "limits", false, guest, "--qmp-max-clients", "2")
	out, code := runOut(t, "qmp", "-s", p.sock, `{"execute":"query-status"}`)
	if code != 0 {
		t.Fatalf("second client: exit %d: %s", code, out)
	}
	hold, err := goqmp.NewSocketMonitor("unix", p.sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := hold.Connect(); err != nil {
		t.Fatal(err)
	}
	defer hold.Disconnect()
	out, code = runOut(t, "qmp", "-s", p.sock, `{"execute":"query-status"}`)
	if code == 0 || !strings.Contains(out, "too many QMP clients (limit 2)") {
		t.Fatalf("third client: exit %d: %s", code, out)
	}
}

// runOut runs the binary and returns stdout and stderr together.
func runOut(t *testing.T, args ...string) (string, int) {
	t.Helper()
	o, e, code := run(t, args...)
	return o + e, code
}

// A descriptor inherited at startup and declared with --fd is usable as
// fd:N, once.
func TestServeInheritedFD(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	cmd := exec.Command(binary, "serve", "--qmp", "unix:"+sock, "--guest=size=8M,dirty-rate=0,seed=1", "--fd", "3")
	cmd.ExtraFiles = []*os.File{w} // fd 3 in the child
	out, _ := cmd.StdoutPipe()
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if l, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatalf("serve: %q %v; stderr %s", l, err, &stderr)
	}
	if o, code := runOut(t, "qmp", "-s", sock, `{"execute":"migrate","arguments":{"uri":"fd:3"}}`); code != 0 {
		t.Fatalf("migrate fd:3: exit %d: %s", code, o)
	}
	// The stream arrives on the pipe: it starts with QEMU's magic.
	head := make([]byte, 4)
	if _, err := io.ReadFull(r, head); err != nil || string(head) != "QEVM" {
		t.Fatalf("read %q from the inherited pipe: %v", head, err)
	}
	go io.Copy(io.Discard, r)
	o, code := runOut(t, "qmp", "-s", sock, `{"execute":"migrate","arguments":{"uri":"fd:4"}}`)
	if code == 0 || !strings.Contains(o, "was not passed to migctl serve with --fd 4") {
		t.Fatalf("migrate fd:4: exit %d: %s", code, o)
	}
}

// serve --qmp-tls-creds: the tcp: socket takes only clients with a
// certificate signed by its CA (and matching --qmp-tls-allow), which may
// then do everything; no warning is printed for it.
func TestServeTLSControl(t *testing.T) {
	ca := credstest.NewCA(t, "control CA")
	srvDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1"), nil)
	ops := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "O", "ops", "CN", "alice"))
	dev := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "O", "dev", "CN", "bob"))
	p := startServeArgs(t, binary, "tls", true, "--guest=size=8M,dirty-rate=0,seed=1",
		"--qmp-tls-creds", srvDir, "--qmp-tls-allow", "O=ops,*", "--qmp-negotiation-timeout", "3s")
	if strings.Contains(p.stderr.String(), "every local user") {
		t.Fatalf("a warning for a socket with client certificates:\n%s", p.stderr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	clientCfg := func(dir string) *tls.Config {
		x, err := creds.LoadX509(creds.X509Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := x.ClientConfig("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	cl, err := qmp.DialTLS(ctx, p.tcp, clientCfg(ops))
	if err != nil {
		t.Fatalf("client allowed by --qmp-tls-allow: %v", err)
	}
	defer cl.Close()
	// An authenticated client keeps everything: exec: is not refused by
	// the trust policy (the migration itself runs and completes).
	out := filepath.Join(t.TempDir(), "image")
	if _, err := cl.Execute(ctx, "migrate", map[string]any{"uri": "exec:cat > " + out}); err != nil {
		t.Fatalf("exec: from an authenticated client: %v", err)
	}
	p.waitStatus("completed")
	if _, err := qmp.DialTLS(ctx, p.tcp, clientCfg(dev)); err == nil {
		t.Fatal("a client outside --qmp-tls-allow got in")
	}
	if o, code := runOut(t, "qmp", "-s", p.tcp, `{"execute":"query-status"}`); code == 0 {
		t.Fatalf("a plaintext client got in: %s", o)
	}
}
