package qmp

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/transport"
)

// TestPolicyCheck is the trust policy as a table: client privilege ×
// address → allowed, or refused with a reason that names what to change.
// The expectations are issue 12's: a client of an unauthenticated TCP
// socket gets network migrations, unix: and file: under --migration-dir
// and fd:NAME, never exec: and never an arbitrary path; the unix socket's
// owner and an authenticated TLS client keep everything.
func TestPolicyCheck(t *testing.T) {
	const dir = "/srv/mig"
	withDir, noDir := Policy{MigrationDir: dir}, Policy{}
	cases := []struct {
		pol    Policy
		priv   Privilege
		cmd    string
		uri    string
		refuse string // "" = allowed; else a substring of the refusal
	}{
		{withDir, LocalUser, "migrate", "tcp:10.0.0.2:4444", ""},
		{withDir, LocalUser, "migrate-incoming", "tcp:0:4444", ""},
		{withDir, LocalUser, "migrate", "rdma:10.0.0.2:4444", ""},
		{withDir, LocalUser, "migrate", "vsock:3:4444", ""},
		{withDir, LocalUser, "migrate", "fd:migfd", ""},
		{withDir, LocalUser, "migrate", "fd:7", "fd:7 names a descriptor by number"},
		{withDir, LocalUser, "migrate-incoming", "fd:0", "use fd:NAME"},
		{withDir, LocalUser, "migrate", "exec:id > /tmp/who", "exec: runs a shell command as the server's user"},
		{withDir, LocalUser, "migrate-incoming", "exec:cat /srv/mig/x", "exec: runs a shell command"},
		{withDir, LocalUser, "migrate", "file:/srv/mig/guest.mig", ""},
		{withDir, LocalUser, "migrate", "file:/srv/mig/sub/guest.mig,offset=4096", ""},
		{withDir, LocalUser, "migrate-incoming", "file:/srv/mig/guest.mig", ""},
		{withDir, LocalUser, "migrate", "file:/etc/passwd", "must lie under the migration directory /srv/mig"},
		{withDir, LocalUser, "migrate-incoming", "file:/root/.ssh/id_ed25519", "must lie under the migration directory"},
		{withDir, LocalUser, "migrate", "file:/srv/mig/../../etc/passwd", "without '..'"},
		{withDir, LocalUser, "migrate", "file:/srv/mig2/x", "must lie under"},
		{withDir, LocalUser, "migrate", "file:/srv/mig", "must lie under"},
		{withDir, LocalUser, "migrate", "file:/srv/mig/", "must lie under"},
		{withDir, LocalUser, "migrate", "file:/srv/mig//x", "must lie under"},
		{withDir, LocalUser, "migrate", "file:guest.mig", "absolute path"},
		{withDir, LocalUser, "migrate", "unix:/srv/mig/m.sock", ""},
		{withDir, LocalUser, "migrate-incoming", "unix:/srv/mig/m.sock", ""},
		{withDir, LocalUser, "migrate", "unix:/run/other.sock", "must lie under the migration directory"},
		{withDir, LocalUser, "migrate-incoming", "unix:/etc/x.sock", "must lie under"},
		{noDir, LocalUser, "migrate", "file:/srv/mig/guest.mig", "serve was started without --migration-dir"},
		{noDir, LocalUser, "migrate-incoming", "unix:/srv/mig/m.sock", "without --migration-dir"},
		{noDir, LocalUser, "migrate", "tcp:10.0.0.2:4444", ""},
		{noDir, LocalUser, "migrate", "fd:migfd", ""},
		{noDir, Owner, "migrate", "exec:id > /tmp/who", ""},
		{noDir, Owner, "migrate", "file:/etc/anything", ""},
		{noDir, Owner, "migrate-incoming", "unix:/anywhere/m.sock", ""},
		{withDir, Owner, "migrate", "fd:7", ""},
		{withDir, Owner, "migrate-incoming", "exec:cat /x", ""},
	}
	for _, c := range cases {
		a, err := transport.Parse(c.uri)
		if err != nil {
			t.Fatalf("%s: %v", c.uri, err)
		}
		err = c.pol.Check(c.priv, c.cmd, a)
		switch {
		case c.refuse == "" && err != nil:
			t.Errorf("%v %s %s (dir %q): refused: %v", c.priv, c.cmd, c.uri, c.pol.MigrationDir, err)
		case c.refuse != "" && err == nil:
			t.Errorf("%v %s %s (dir %q): allowed, want a refusal containing %q", c.priv, c.cmd, c.uri, c.pol.MigrationDir, c.refuse)
		case c.refuse != "":
			msg := err.Error()
			// Every refusal names the command and address, the rule, and
			// how to get the rights that allow it.
			for _, want := range []string{c.refuse, c.cmd + " " + c.uri, "unix control socket", "--qmp-tls-creds"} {
				if !strings.Contains(msg, want) {
					t.Errorf("%s %s: refusal %q does not contain %q", c.cmd, c.uri, msg, want)
				}
			}
		}
	}
}

func TestUnder(t *testing.T) {
	for _, c := range []struct {
		dir, path string
		want      bool
	}{
		{"/srv/mig", "/srv/mig/a", true},
		{"/srv/mig", "/srv/mig/a/b", true},
		{"/srv/mig", "/srv/mig", false},
		{"/srv/mig", "/srv/mig/", false},
		{"/srv/mig", "/srv/migx", false},
		{"/srv/mig", "/srv/mig/../x", false},
		{"/srv/mig", "/srv/mig/./a", false},
		{"/srv/mig", "srv/mig/a", false},
		{"/", "/a", true},
		{"/", "/", false},
	} {
		if got := Under(c.dir, c.path); got != c.want {
			t.Errorf("Under(%q, %q) = %v, want %v", c.dir, c.path, got, c.want)
		}
	}
}

// recHost records the Host calls that reach it.
type recHost struct {
	noopHost
	calls chan string
}

func (h *recHost) Migrate(_ context.Context, uri string, _ []string) error {
	h.calls <- "migrate " + uri
	return nil
}

func (h *recHost) Incoming(_ context.Context, uri string, _ []string, _ bool) error {
	h.calls <- "migrate-incoming " + uri
	return nil
}

// lockedBuffer is a log sink the server's goroutines may write to.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// trustServer is a server over a recording host, listening on a unix
// socket (Owner) and on loopback TCP without authentication (LocalUser),
// with a private migration directory.
type trustServer struct {
	s      *Server
	h      *recHost
	log    *lockedBuffer
	dir    string // the migration directory
	sock   string // unix socket
	tcp    string // tcp:127.0.0.1:PORT
	closed bool
}

func newTrustServer(t *testing.T, opts Options) *trustServer {
	t.Helper()
	c, err := machine.New(testSpec(t), machine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ts := &trustServer{h: &recHost{calls: make(chan string, 16)}, log: &lockedBuffer{}}
	base := t.TempDir()
	ts.dir = filepath.Join(base, "mig")
	if err := os.Mkdir(ts.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if ts.dir, err = CheckMigrationDir(ts.dir); err != nil {
		t.Fatal(err)
	}
	opts.MigrationDir = ts.dir
	opts.Logger = slog.New(slog.NewTextHandler(ts.log, nil))
	ts.s = NewServer(c, ts.h, opts)
	t.Cleanup(func() { ts.s.Close(); c.Close() })
	ts.sock = filepath.Join(base, "qmp.sock")
	if _, err := ts.s.Listen("unix:" + ts.sock); err != nil {
		t.Fatal(err)
	}
	addr, err := ts.s.Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.tcp = "tcp:" + addr.String()
	return ts
}

func dialQMP(t *testing.T, addr string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cl, err := DialAddr(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// noCall checks that the host was not called.
func (ts *trustServer) noCall(t *testing.T) {
	t.Helper()
	select {
	case c := <-ts.h.calls:
		t.Fatalf("the host was called: %s", c)
	default:
	}
}

// called checks that the host was called with want.
func (ts *trustServer) called(t *testing.T, want string) {
	t.Helper()
	select {
	case c := <-ts.h.calls:
		if c != want {
			t.Fatalf("host call %q, want %q", c, want)
		}
	default:
		t.Fatalf("the host was not called (want %q)", want)
	}
}

// The policy is applied per connection by the listener it came in on,
// before the host is called: the same request is refused on the TCP
// socket and carried out on the unix socket.
func TestTrustPerListener(t *testing.T) {
	ts := newTrustServer(t, Options{})
	if log := ts.log.String(); !strings.Contains(log, "has no client authentication: every local user can connect") {
		t.Fatalf("no startup warning for the TCP socket; log:\n%s", log)
	}
	remote, owner := dialQMP(t, ts.tcp), dialQMP(t, "unix:"+ts.sock)
	inDir := filepath.Join(ts.dir, "guest.mig")
	for _, c := range []struct{ cmd, uri, refuse string }{
		{"migrate", "exec:id > /tmp/who", "exec: runs a shell command"},
		{"migrate", "file:/tmp/elsewhere.mig", "must lie under the migration directory"},
		{"migrate", "unix:/tmp/elsewhere.sock", "must lie under the migration directory"},
		{"migrate-incoming", "file:/etc/shadow", "must lie under the migration directory"},
		{"migrate-incoming", "exec:cat /etc/shadow", "exec: runs a shell command"},
		{"migrate", "fd:3", "names a descriptor by number"},
	} {
		e := fails(t, remote, c.cmd, map[string]any{"uri": c.uri})
		if !strings.Contains(e.Desc, c.refuse) {
			t.Errorf("%s %s over TCP: %q does not say %q", c.cmd, c.uri, e.Desc, c.refuse)
		}
		ts.noCall(t)
	}
	// The channels form is judged address by address too.
	e := fails(t, remote, "migrate", map[string]any{"channels": []any{map[string]any{"channel-type": "main",
		"addr": map[string]any{"transport": "exec", "args": []string{"/bin/sh", "-c", "id"}}}}})
	if !strings.Contains(e.Desc, "exec: runs a shell command") {
		t.Errorf("channels with exec over TCP: %q", e.Desc)
	}
	ts.noCall(t)
	if log := ts.log.String(); !strings.Contains(log, "refused a migration address to a client of an unauthenticated TCP socket") {
		t.Errorf("refusals not logged:\n%s", log)
	}
	for _, c := range []struct{ cmd, uri string }{
		{"migrate", "tcp:127.0.0.1:1"},
		{"migrate", "file:" + inDir},
		{"migrate-incoming", "unix:" + filepath.Join(ts.dir, "m.sock")},
	} {
		run(t, remote, c.cmd, map[string]any{"uri": c.uri})
		ts.called(t, c.cmd+" "+c.uri)
	}
	// The unix socket's owner keeps everything.
	for _, c := range []struct{ cmd, uri string }{
		{"migrate", "exec:id > /tmp/who"},
		{"migrate", "file:/tmp/elsewhere.mig"},
		{"migrate-incoming", "exec:cat /etc/shadow"},
	} {
		run(t, owner, c.cmd, map[string]any{"uri": c.uri})
		ts.called(t, c.cmd+" "+c.uri)
	}
}

// A symbolic link inside the migration directory does not lead a
// LocalUser's path out of it.
func TestTrustSymlinks(t *testing.T) {
	ts := newTrustServer(t, Options{})
	remote := dialQMP(t, ts.tcp)
	outside := t.TempDir()
	if err := os.Symlink(filepath.Join(outside, "victim"), filepath.Join(ts.dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(ts.dir, "sub")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ uri, refuse string }{
		{"file:" + filepath.Join(ts.dir, "link"), "is a symbolic link"},
		{"file:" + filepath.Join(ts.dir, "sub", "x.mig"), "outside the migration directory"},
		{"unix:" + filepath.Join(ts.dir, "sub", "m.sock"), "outside the migration directory"},
	} {
		e := fails(t, remote, "migrate", map[string]any{"uri": c.uri})
		if !strings.Contains(e.Desc, c.refuse) {
			t.Errorf("%s: %q does not say %q", c.uri, e.Desc, c.refuse)
		}
		ts.noCall(t)
	}
}

func TestCheckMigrationDir(t *testing.T) {
	base := t.TempDir()
	mk := func(name string, mode os.FileMode) string {
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	private := mk("private", 0o700)
	if got, err := CheckMigrationDir(private); err != nil || got != private {
		t.Fatalf("private dir: %q, %v", got, err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(private, link); err != nil {
		t.Fatal(err)
	}
	if got, err := CheckMigrationDir(link); err != nil || got != private {
		t.Fatalf("a link to the private dir: %q, %v (want the resolved path)", got, err)
	}
	for _, c := range []struct {
		path, refuse string
	}{
		{mk("world", 0o777), "writable by its group or by others"},
		{mk("sticky", os.ModeSticky|0o777), "writable by its group or by others"},
		{mk("group", 0o770), "writable by its group or by others"},
		{filepath.Join(base, "missing"), "no such file"},
		{"", "empty"},
	} {
		if _, err := CheckMigrationDir(c.path); err == nil || !strings.Contains(err.Error(), c.refuse) {
			t.Errorf("%q: %v, want a refusal containing %q", c.path, err, c.refuse)
		}
	}
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o600)
	if _, err := CheckMigrationDir(file); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("a file: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("the directory owned by another user needs root to chown; skipped")
	}
	other := mk("other", 0o700)
	if err := os.Chown(other, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckMigrationDir(other); err == nil || !strings.Contains(err.Error(), "belongs to uid 65534") {
		t.Errorf("a directory of another user: %v", err)
	}
}

// A unix control socket is refused where another user could replace it.
func TestSocketDir(t *testing.T) {
	c, err := machine.New(testSpec(t), machine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(c, noopHost{}, Options{})
	defer func() { s.Close(); c.Close() }()
	base := t.TempDir()
	mk := func(name string, mode os.FileMode) string {
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		dir    string
		refuse string
	}{
		{mk("private", 0o700), ""},
		{mk("sticky", os.ModeSticky|0o777), ""},
		{mk("world", 0o777), "writable by its group or by others (mode 0777) and has no sticky bit"},
		{mk("group", 0o770), "writable by its group or by others (mode 0770)"},
	} {
		sock := filepath.Join(c.dir, "qmp.sock")
		_, err := s.Listen("unix:" + sock)
		switch {
		case c.refuse == "" && err != nil:
			t.Errorf("%s: %v", c.dir, err)
		case c.refuse != "" && (err == nil || !strings.Contains(err.Error(), c.refuse)):
			t.Errorf("%s: %v, want a refusal containing %q", c.dir, err, c.refuse)
		}
		if c.refuse != "" {
			if _, err := os.Lstat(sock); err == nil {
				t.Errorf("%s: a refused socket was created", c.dir)
			}
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("the directory owned by another user needs root to chown; skipped")
	}
	other := mk("other", 0o755)
	if err := os.Chown(other, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Listen("unix:" + filepath.Join(other, "qmp.sock")); err == nil || !strings.Contains(err.Error(), "belongs to uid 65534") {
		t.Errorf("a directory of another user: %v", err)
	}
}

// FuzzPolicyCheck: whatever address a client of an unauthenticated TCP
// socket sends, Check allows only the network transports, fd:NAME, and
// unix:/file: paths that are clean, absolute and strictly under the
// migration directory; it never panics, and an owner is always allowed.
func FuzzPolicyCheck(f *testing.F) {
	for _, s := range []string{"tcp:1.2.3.4:5", "exec:id", "file:/srv/mig/x", "file:/srv/mig/../x", "unix:/srv/mig//a",
		"fd:3", "fd:name", "vsock:1:2", "rdma:h:1", "file:/srv/mig/a,offset=0x10", "file:/srv/migx", "unix:relative"} {
		f.Add(s)
	}
	const dir = "/srv/mig"
	pol := Policy{MigrationDir: dir}
	f.Fuzz(func(t *testing.T, uri string) {
		a, err := transport.Parse(uri)
		if err != nil {
			return
		}
		if err := pol.Check(Owner, "migrate", a); err != nil {
			t.Fatalf("owner refused %q: %v", uri, err)
		}
		if pol.Check(LocalUser, "migrate", a) != nil {
			return
		}
		switch a.Scheme {
		case transport.SchemeTCP, transport.SchemeRDMA, transport.SchemeVsock:
		case transport.SchemeFD:
			if a.FDName == "" {
				t.Fatalf("fd:%d allowed to a local user", a.FD)
			}
		case transport.SchemeUnix, transport.SchemeFile:
			p := a.Path
			if !strings.HasPrefix(p, dir+"/") || filepath.Clean(p) != p || strings.Contains(p, "/../") || len(p) <= len(dir)+1 {
				t.Fatalf("%q allowed to a local user: path %q", uri, p)
			}
		default:
			t.Fatalf("%q (scheme %s) allowed to a local user", uri, a.Scheme)
		}
	})
}
