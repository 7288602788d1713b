package qmp

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/creds/credstest"
	"github.com/migctl/migctl/machine"
)

func loadCreds(t *testing.T, dir string, ep creds.Endpoint, verify bool) *creds.X509 {
	t.Helper()
	x, err := creds.LoadX509(creds.X509Options{ID: "ctl", Dir: dir, Endpoint: ep, VerifyPeer: &verify})
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func clientTLS(t *testing.T, dir string) *tls.Config {
	t.Helper()
	cfg, err := loadCreds(t, dir, creds.Client, true).ClientConfig("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// A TCP control socket with TLS client authentication: a client whose
// certificate the CA signed and the authz list allows is an Owner (exec:
// reaches the host); anyone else is refused at the handshake, before any
// command; no warning is logged for it.
func TestTLSControl(t *testing.T) {
	ca, other := credstest.NewCA(t, "control CA"), credstest.NewCA(t, "other CA")
	srvDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1"), nil)
	alice := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "C", "GB", "CN", "alice"))
	bob := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "C", "GB", "CN", "bob"))
	eve := credstest.Dir(t, []*credstest.CA{ca, other}, nil, other.Client(t, "C", "GB", "CN", "alice"))
	anon := credstest.Dir(t, []*credstest.CA{ca}, nil, nil)
	authz, err := creds.NewList("ctl-authz", creds.Deny, []creds.Rule{{Match: "C=GB,CN=alice", Policy: creds.Allow}})
	if err != nil {
		t.Fatal(err)
	}

	c, err := machine.New(testSpec(t), machine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := &recHost{calls: make(chan string, 4)}
	log := &lockedBuffer{}
	s := NewServer(c, h, Options{Logger: slog.New(slog.NewTextHandler(log, nil)), NegotiationTimeout: 2 * time.Second})
	defer func() { s.Close(); c.Close() }()
	ts := &trustServer{s: s, h: h}
	srv := loadCreds(t, srvDir, creds.Server, true)
	addr, err := s.ListenWith("tcp:127.0.0.1:0", ListenOptions{TLS: srv, Authz: authz})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(log.String(), "no client authentication") {
		t.Fatalf("a warning for a socket with client authentication:\n%s", log)
	}
	tcp := "tcp:" + addr.String()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()

	cl, err := DialTLS(ctx, tcp, clientTLS(t, alice))
	if err != nil {
		t.Fatalf("alice: %v", err)
	}
	defer cl.Close()
	run(t, cl, "migrate", map[string]any{"uri": "exec:true"})
	ts.called(t, "migrate exec:true")

	for _, c := range []struct{ name, dir, want string }{
		{"bob (authz denies)", bob, "the peer refused the handshake"},
		{"eve (other CA)", eve, "the peer refused the handshake"},
		{"no certificate", anon, "certificate required"},
	} {
		cl, err := DialTLS(ctx, tcp, clientTLS(t, c.dir))
		if err == nil {
			cl.Close()
			t.Fatalf("%s: connected", c.name)
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// A plaintext client that sends a command gets no greeting and no
	// reply: it is dropped.
	raw, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.Write([]byte(`{"execute":"qmp_capabilities"}{"execute":"migrate","arguments":{"uri":"exec:true"}}`))
	raw.SetReadDeadline(time.Now().Add(testTimeout))
	if b, err := io.ReadAll(raw); len(b) > 0 && bytes.Contains(b, []byte("QMP")) {
		t.Fatalf("a plaintext client was greeted: %q (%v)", b, err)
	}
	ts.noCall(t)
	for _, want := range []string{"TLS client authenticated", `dn="C=GB,CN=alice"`, "TLS client refused", "sent no TLS ClientHello"} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
}

func TestTLSControlRefusesWeakCredentials(t *testing.T) {
	ca := credstest.NewCA(t, "control CA")
	srvDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1"), nil)
	cliDir := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "CN", "x"))
	c, err := machine.New(testSpec(t), machine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(c, noopHost{}, Options{})
	defer func() { s.Close(); c.Close() }()
	for _, tc := range []struct {
		name string
		addr string
		x    *creds.X509
		want string
	}{
		{"verify-peer off", "tcp:127.0.0.1:0", loadCreds(t, srvDir, creds.Server, false), "verify-peer=off"},
		{"client endpoint", "tcp:127.0.0.1:0", loadCreds(t, cliDir, creds.Client, true), "needs endpoint=server"},
		{"unix socket", "unix:" + filepath.Join(t.TempDir(), "s"), loadCreds(t, srvDir, creds.Server, true), "TLS is for tcp:"},
	} {
		if _, err := s.ListenWith(tc.addr, ListenOptions{TLS: tc.x}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	authz, _ := creds.NewList("a", creds.Allow, nil)
	if _, err := s.ListenWith("tcp:127.0.0.1:0", ListenOptions{Authz: authz}); err == nil || !strings.Contains(err.Error(), "needs TLS credentials") {
		t.Errorf("authz without TLS: %v", err)
	}
}
