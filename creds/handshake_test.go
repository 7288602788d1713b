package creds

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/migctl/migctl/creds/credstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testTimeout = 20 * time.Second

func boolp(b bool) *bool { return &b }

// world is a CA, another CA nobody trusts, and certificates from each.
type world struct {
	ca, rogue      *credstest.CA
	server, client *credstest.Pair
	clientDN       string
}

func newWorld(t *testing.T) *world {
	w := &world{ca: credstest.NewCA(t, "migctl test CA"), rogue: credstest.NewCA(t, "rogue CA")}
	w.server = w.ca.Server(t, "127.0.0.1", "dst.example")
	w.client = w.ca.Client(t, "C", "GB", "O", "Example Org", "CN", "src.example")
	w.clientDN = "C=GB,O=Example Org,CN=src.example" // QEMU's form: certificate order, no spaces
	return w
}

func load(t *testing.T, o X509Options) *X509 {
	t.Helper()
	c, err := LoadX509(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// outcome is what each side of one connection saw.
type outcome struct {
	server, client error
	peerDN         string // the DN the server saw, when it accepted
}

// connect runs one connection over loopback TCP: the server sniffs the
// first bytes, refuses a mismatch, runs its handshake and writes "ok";
// the client runs its handshake and reads the server's "ok" (with TLS 1.3
// that read is where a client learns the server refused its certificate).
// clientTLS nil means a plaintext client that sends the stream's magic;
// serverTLS nil a plaintext server.
// side is one end's TLS setup; nil means plaintext.
type side struct {
	creds *X509
	authz Authorizer // server
	host  string     // client
}

func connect(t *testing.T, serverTLS, clientTLS *side) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var out outcome
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := ln.Accept()
		if err != nil {
			out.server = err
			return
		}
		defer conn.Close()
		kind, rc, err := Sniff(ctx, conn)
		if err != nil {
			out.server = err
			return
		}
		head := []byte{}
		if kind != KindTLS {
			head = make([]byte, SniffLen)
			_, _ = io.ReadFull(rc, head)
		}
		if err := Expect(kind, head, serverTLS != nil); err != nil {
			out.server = err
			return
		}
		if serverTLS == nil {
			_, out.server = rc.Write([]byte("ok"))
			return
		}
		cfg, err := serverTLS.creds.ServerConfig(serverTLS.authz)
		if err != nil {
			out.server = err
			return
		}
		tc, err := ServerHandshake(ctx, rc, cfg)
		if err != nil {
			out.server = err
			return
		}
		if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
			out.peerDN, _ = DN(pc[0])
		}
		if _, err := tc.Write([]byte("ok")); err != nil {
			out.server = Classify(err)
		}
		_ = tc.Close()
	}()

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	if clientTLS == nil {
		var hdr [8]byte
		binary.BigEndian.PutUint32(hdr[:], StreamMagic)
		binary.BigEndian.PutUint32(hdr[4:], 3)
		_, _ = conn.Write(hdr[:])
		buf := make([]byte, 2)
		_, out.client = io.ReadFull(conn, buf)
	} else {
		cfg, err := clientTLS.creds.ClientConfig(clientTLS.host)
		if err != nil {
			t.Fatal(err)
		}
		tc, err := ClientHandshake(ctx, conn, cfg)
		if err != nil {
			out.client = err
		} else {
			buf := make([]byte, 2)
			if _, err := io.ReadFull(tc, buf); err != nil {
				out.client = Classify(err)
			} else if string(buf) != "ok" {
				out.client = errors.New("server said " + string(buf))
			}
		}
	}
	conn.Close()
	<-done
	return out
}

// want describes an expected failure: the error's type (by a check), and
// words its message must contain.
type want struct {
	is    func(error) bool
	words string
}

func (w *want) check(t *testing.T, side string, err error) {
	t.Helper()
	if w == nil {
		if err != nil {
			t.Errorf("%s: unexpected error: %v", side, err)
		}
		return
	}
	if err == nil || !w.is(err) || !strings.Contains(err.Error(), w.words) {
		t.Errorf("%s: got %T %v\nwant an error containing %q of the expected type", side, err, err, w.words)
	}
}

func certErr(r Reason) func(error) bool {
	return func(err error) bool {
		var ce *CertificateError
		return errors.As(err, &ce) && ce.Reason == r
	}
}

func rejected(alert string) func(error) bool {
	return func(err error) bool {
		var pe *PeerRejectedError
		return errors.As(err, &pe) && pe.Alert == alert
	}
}

func isAuthz(err error) bool {
	var ae *AuthzError
	return errors.As(err, &ae)
}

func isMismatch(localTLS bool, peer Kind) func(error) bool {
	return func(err error) bool {
		var me *MismatchError
		return errors.As(err, &me) && me.LocalTLS == localTLS && me.Peer == peer
	}
}

// TestHandshakes: real TLS 1.3 handshakes over loopback, each case failing
// (or not) on both sides for the reason named in its message.
func TestHandshakes(t *testing.T) {
	w := newWorld(t)
	srvDir := credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil)
	cliDir := credstest.Dir(t, []*credstest.CA{w.ca}, nil, w.client)
	srvCreds := load(t, X509Options{ID: "tls0", Dir: srvDir, Endpoint: Server})
	srv := func(authz Authorizer) *side { return &side{creds: srvCreds, authz: authz} }
	cli := func(dir, host string) *side {
		return &side{creds: load(t, X509Options{ID: "tls0", Dir: dir, Endpoint: Client}), host: host}
	}
	list := func(policy Policy, rules ...Rule) Authorizer {
		l, err := NewList("auth0", policy, rules)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}

	// A client whose certificate comes from a CA the server does not
	// trust (its own ca-cert.pem has both, so it loads).
	rogueClientDir := credstest.Dir(t, []*credstest.CA{w.ca, w.rogue}, nil, w.rogue.Client(t, "CN", "mallory"))
	// A client that trusts only the rogue CA, so not the server's.
	trustsRogueDir := credstest.Dir(t, []*credstest.CA{w.rogue}, nil, w.rogue.Client(t, "CN", "alice"))
	noCertDir := credstest.Dir(t, []*credstest.CA{w.ca}, nil, nil)
	// Expired certificates are loaded with sanity-check off: QEMU's
	// sanity check (and LoadX509's) refuses its own expired certificate.
	expiredClient := &side{creds: load(t, X509Options{ID: "tls0", Endpoint: Client, SanityCheck: boolp(false),
		Dir: credstest.Dir(t, []*credstest.CA{w.ca}, nil, w.ca.Issue(t, credstest.Expired(credstest.Options{RawSubject: w.client.Cert.RawSubject})))}),
		host: "127.0.0.1"}
	expiredServer := &side{creds: load(t, X509Options{ID: "tls0", Endpoint: Server, SanityCheck: boolp(false),
		Dir: credstest.Dir(t, []*credstest.CA{w.ca}, w.ca.Issue(t, credstest.Expired(credstest.Options{IPs: w.server.Cert.IPAddresses})), nil)})}
	revokedDir := credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil)
	w.ca.CRL(t, revokedDir, w.client.Cert)
	revoking := &side{creds: load(t, X509Options{ID: "tls0", Dir: revokedDir, Endpoint: Server})}
	lax := &side{creds: load(t, X509Options{ID: "tls0", Dir: srvDir, Endpoint: Server, VerifyPeer: boolp(false)})}

	cases := []struct {
		name           string
		server, client *side
		srvErr, cliErr *want
		dn             string
	}{
		{name: "mutual x509", server: srv(nil), client: cli(cliDir, "127.0.0.1"), dn: w.clientDN},
		{name: "mutual x509 by DNS name", server: srv(nil), client: cli(cliDir, "dst.example"), dn: w.clientDN},
		{name: "client certificate from an unknown CA", server: srv(nil), client: cli(rogueClientDir, "127.0.0.1"),
			srvErr: &want{certErr(UnknownAuthority), "The certificate hasn't got a known issuer: the peer's certificate (CN=mallory)"},
			cliErr: &want{rejected("unknown certificate authority"), "the peer does not trust the CA that signed this side's certificate"}},
		{name: "server certificate from an unknown CA", server: srv(nil), client: cli(trustsRogueDir, "127.0.0.1"),
			cliErr: &want{certErr(UnknownAuthority), "hasn't got a known issuer"},
			srvErr: &want{rejected("bad certificate"), "the peer refused this side's certificate"}},
		{name: "hostname mismatch", server: srv(nil), client: cli(cliDir, "other.example"),
			cliErr: &want{certErr(HostnameMismatch), "Certificate does not match the hostname other.example: the peer's certificate (C=GB,O=migctl tests,CN=127.0.0.1) is for dst.example, 127.0.0.1; set tls-hostname"},
			srvErr: &want{rejected("bad certificate"), "refused the handshake (bad certificate)"}},
		{name: "expired client certificate", server: srv(nil), client: expiredClient,
			srvErr: &want{certErr(Expired), "The certificate has expired: the peer's certificate (C=GB,O=Example Org,CN=src.example) expired at"},
			cliErr: &want{rejected("expired certificate"), "this side's certificate has expired"}},
		{name: "expired server certificate", server: expiredServer, client: cli(cliDir, "127.0.0.1"),
			cliErr: &want{certErr(Expired), "The certificate has expired"},
			srvErr: &want{rejected("bad certificate"), "bad certificate"}},
		{name: "client without a certificate", server: srv(nil), client: cli(noCertDir, "127.0.0.1"),
			srvErr: &want{certErr(NoCertificate), "No certificate peers: the client sent no certificate"},
			cliErr: &want{rejected("certificate required"), "put client-cert.pem and client-key.pem"}},
		{name: "client without a certificate, verify-peer off", server: lax, client: cli(noCertDir, "127.0.0.1")},
		{name: "revoked client certificate", server: revoking, client: cli(cliDir, "127.0.0.1"),
			srvErr: &want{certErr(Revoked), "The certificate has been revoked: the peer's certificate (C=GB,O=Example Org,CN=src.example) is listed in this side's ca-crl.pem"},
			cliErr: &want{rejected("bad certificate"), "bad certificate"}},
		{name: "authz exact allow", server: srv(list(Deny, Rule{Match: "C=GB,O=Example Org,CN=src.example", Policy: Allow})),
			client: cli(cliDir, "127.0.0.1"), dn: w.clientDN},
		{name: "authz exact deny (RFC 4514 order is not QEMU's)", server: srv(list(Deny, Rule{Match: "CN=src.example,O=Example Org,C=GB", Policy: Allow})),
			client: cli(cliDir, "127.0.0.1"),
			srvErr: &want{isAuthz, "TLS x509 authz check for C=GB,O=Example Org,CN=src.example is denied: authz object 'auth0'"},
			cliErr: &want{rejected("bad certificate"), "authz check"}},
		{name: "authz glob allow", server: srv(list(Deny, Rule{Match: "C=GB,O=Example Org,CN=*.example", Policy: Allow, Format: Glob})),
			client: cli(cliDir, "127.0.0.1"), dn: w.clientDN},
		{name: "authz glob deny before a default allow", server: srv(list(Allow, Rule{Match: "*CN=src.*", Policy: Deny, Format: Glob})),
			client: cli(cliDir, "127.0.0.1"),
			srvErr: &want{isAuthz, "authz check for C=GB,O=Example Org,CN=src.example is denied"},
			cliErr: &want{rejected("bad certificate"), "bad certificate"}},
		{name: "authz-simple allow", server: srv(&Simple{ID: "s", Identity: w.clientDN}), client: cli(cliDir, "127.0.0.1"), dn: w.clientDN},
		{name: "plaintext client to a TLS server", server: srv(nil), client: nil,
			srvErr: &want{isMismatch(true, KindStream), "TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext"},
			cliErr: &want{func(err error) bool {
				return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isReset(err)
			}, ""}},
		{name: "TLS client to a plaintext server", server: nil, client: cli(cliDir, "127.0.0.1"),
			srvErr: &want{isMismatch(false, KindTLS), "TLS not configured: the peer started a TLS handshake (a TLS ClientHello) but tls-creds is not set here"},
			cliErr: &want{isMismatch(true, KindUnknown), "TLS handshake failed: the peer closed the connection without answering the TLS ClientHello"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := connect(t, tc.server, tc.client)
			tc.srvErr.check(t, "server", out.server)
			tc.cliErr.check(t, "client", out.client)
			if tc.dn != "" && out.peerDN != tc.dn {
				t.Errorf("server saw peer DN %q, want %q", out.peerDN, tc.dn)
			}
		})
	}
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}
