package creds

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/migctl/migctl/creds/credstest"
)

// TestObjects: object-add's shapes as QEMU takes them, and QEMU's errors
// when a migration names them.
func TestObjects(t *testing.T) {
	w := newWorld(t)
	srvDir := credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil)
	cliDir := credstest.Dir(t, []*credstest.CA{w.ca}, nil, w.client)
	o := NewObjects()
	add := func(args string) error {
		t.Helper()
		return o.Add(json.RawMessage(args))
	}
	for _, args := range []string{
		`{"qom-type":"tls-creds-x509","id":"tls0","dir":` + jstr(srvDir) + `,"endpoint":"server","verify-peer":true}`,
		`{"qom-type":"tls-creds-x509","id":"tls1","dir":` + jstr(cliDir) + `}`,
		`{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"C=GB,*","policy":"allow","format":"glob"},{"match":"CN=x","policy":"deny"}]}`,
		`{"qom-type":"authz-simple","id":"auth1","identity":"C=GB,CN=a"}`,
	} {
		if err := add(args); err != nil {
			t.Fatalf("object-add %s: %v", args, err)
		}
	}
	if ids := strings.Join(o.IDs(), ","); ids != "auth0,auth1,tls0,tls1" {
		t.Fatalf("IDs %s", ids)
	}
	if c, err := o.Creds("tls0", Server); err != nil || c.ID() != "tls0" || !c.VerifyPeer() || c.Endpoint() != Server {
		t.Fatalf("Creds tls0: %v %v", c, err)
	}
	if c, err := o.Creds("tls1", Client); err != nil || c.Endpoint() != Client {
		t.Fatalf("Creds tls1 (endpoint defaults to client): %v %v", c, err)
	}
	if a, err := o.Authz("auth0"); err != nil || !a.IsAllowed("C=GB,CN=a") || a.IsAllowed("C=FR,CN=a") {
		t.Fatalf("Authz auth0: %v %v", a, err)
	}
	if a, err := o.Authz("auth1"); err != nil || !a.IsAllowed("C=GB,CN=a") {
		t.Fatalf("Authz auth1: %v %v", a, err)
	}

	refusals := []struct {
		err  error
		want string
	}{
		{add(`{"qom-type":"tls-creds-psk","id":"psk0","dir":"/x","username":"u","endpoint":"client"}`),
			"object type tls-creds-psk is not supported: Go's crypto/tls has no external pre-shared-key (PSK) support, and migctl does not implement TLS cryptography itself; use tls-creds-x509"},
		{add(`{"qom-type":"tls-creds-anon","id":"a0"}`), "object type tls-creds-anon is not supported"},
		{add(`{"qom-type":"authz-listfile","id":"a0","filename":"/x"}`), "object type authz-listfile is not supported: give the rules inline with authz-list"},
		{add(`{"qom-type":"memory-backend-ram","id":"m"}`), "Parameter 'qom-type' does not accept value 'memory-backend-ram'"},
		{add(`{"qom-type":"tls-creds-x509","id":"tls0","dir":` + jstr(srvDir) + `,"endpoint":"server"}`), "attempt to add duplicate property 'tls0' to object (type 'container')"},
		{add(`{"qom-type":"tls-creds-x509","id":"t","dir":` + jstr(srvDir) + `,"bogus":1}`), "Parameter 'bogus' is unexpected"},
		{add(`{"qom-type":"tls-creds-x509","id":"t","dir":5}`), "Invalid parameter type for 'dir', expected: string"},
		{add(`{"qom-type":"tls-creds-x509","id":"t","dir":` + jstr(srvDir) + `,"verify-peer":"yes"}`), "Invalid parameter type for 'verify-peer', expected: boolean"},
		{add(`{"qom-type":"tls-creds-x509","id":"t"}`), "Missing 'dir' property value"},
		{add(`{"qom-type":"tls-creds-x509","id":"t","dir":` + jstr(srvDir) + `,"priority":"NORMAL"}`), "property 'priority' is not supported"},
		{add(`{"qom-type":"tls-creds-x509","id":"t","dir":` + jstr(srvDir) + `,"passwordid":"sec0"}`), "property 'passwordid' is not supported"},
		{add(`{"qom-type":"tls-creds-x509","id":"t","dir":` + jstr(srvDir) + `,"endpoint":"both"}`), "Parameter 'endpoint' does not accept value 'both'"},
		{add(`{"qom-type":"authz-list","id":"z","rules":[{"match":"x"}]}`), "rules[0]: Parameter 'policy' is missing"},
		{add(`{"qom-type":"authz-list","id":"z","rules":[{"match":"x","policy":"allow","extra":1}]}`), "rules[0]: Parameter 'extra' is unexpected"},
		{add(`{"qom-type":"authz-simple","id":"z"}`), "Parameter 'identity' is missing"},
		{add(`{"qom-type":"authz-simple","id":"9z","identity":"x"}`), "Parameter 'id' expects an identifier"},
		{add(`{"id":"z"}`), "Parameter 'qom-type' is missing"},
		{add(`[]`), "object-add arguments must be a JSON object"},
		{errOnly(o.Creds("nope", Client)), "No TLS credentials with id 'nope'"},
		{errOnly(o.Creds("auth0", Client)), "Object with id 'auth0' is not TLS credentials"},
		{errOnly(o.Creds("tls0", Client)), "Expected TLS credentials for a client endpoint: tls-creds 'tls0' has endpoint=server"},
		{errOnly(o.Authz("nope")), "Cannot find QAuthZ object ID nope"},
		{errOnly(o.Authz("tls0")), "Object 'tls0' is not a QAuthZ subclass"},
		{o.Del("nope"), "object 'nope' not found"},
	}
	for i, r := range refusals {
		if r.err == nil || !strings.Contains(r.err.Error(), r.want) {
			t.Errorf("refusal %d: %v\nwant it to contain %q", i, r.err, r.want)
		}
	}
	psk := add(`{"qom-type":"tls-creds-psk","id":"psk0"}`)
	if !errors.Is(psk, ErrPSK) || !errors.Is(psk, ErrUnsupported) {
		t.Fatalf("tls-creds-psk: %v is not ErrPSK/ErrUnsupported", psk)
	}
	if err := o.Del("tls0"); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Creds("tls0", Server); err == nil {
		t.Fatal("deleted object still found")
	}
}

func errOnly[T any](_ T, err error) error { return err }

func jstr(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// TestLoadX509: QEMU's load-time checks (sanity-check on by default), each
// refusal naming the file and the fix.
func TestLoadX509(t *testing.T) {
	w := newWorld(t)
	expired := w.ca.Issue(t, credstest.Expired(credstest.Options{IPs: w.server.Cert.IPAddresses}))
	caAsLeaf := w.ca.Issue(t, credstest.Options{IsCA: true})
	clientOnly := w.ca.Client(t, "CN", "c")
	noKey := credstest.Dir(t, []*credstest.CA{w.ca}, nil, nil)
	os.WriteFile(filepath.Join(noKey, FileClientCert), w.client.CertPEM, 0o644)
	badCRL := credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil)
	w.rogue.CRL(t, badCRL)
	fifoDir := t.TempDir()
	if err := syscall.Mkfifo(filepath.Join(fifoDir, FileCACert), 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name string
		o    X509Options
		want string
	}{
		{"missing ca-cert.pem", X509Options{ID: "t", Dir: t.TempDir()}, "Unable to access credentials: open"},
		{"server without its certificate", X509Options{ID: "t", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, nil, nil), Endpoint: Server}, "server-cert.pem: Unable to access credentials"},
		{"client certificate without its key", X509Options{ID: "t", Dir: noKey}, "client-key.pem: the certificate and its key go together"},
		{"own certificate expired", X509Options{ID: "t", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, expired, nil), Endpoint: Server}, "The server certificate has expired (at"},
		{"own certificate is a CA", X509Options{ID: "t", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, caAsLeaf, nil), Endpoint: Server}, "The certificate basic constraints show a CA, but we need one for a server"},
		{"client certificate used by a server", X509Options{ID: "t", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, clientOnly, nil), Endpoint: Server}, "Certificate purpose does not allow use with a TLS server"},
		{"own certificate from another CA", X509Options{ID: "t", Dir: credstest.Dir(t, []*credstest.CA{w.rogue}, w.server, nil), Endpoint: Server}, "Our own certificate failed validation against"},
		{"CRL from another CA", X509Options{ID: "t", Dir: badCRL, Endpoint: Server}, "ca-crl.pem: Cannot load CRL: a CRL is not signed by any CA in ca-cert.pem"},
		{"a FIFO where ca-cert.pem should be", X509Options{ID: "t", Dir: fifoDir}, "ca-cert.pem: Unable to access credentials: not a regular file"},
	}
	for _, tc := range cases {
		_, err := LoadX509(tc.o)
		var le *LoadError
		if !errors.As(err, &le) || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "tls-creds-x509 't': ") {
			t.Errorf("%s: %v\nwant a LoadError containing %q", tc.name, err, tc.want)
		}
	}
	// With sanity-check off the expired certificate loads (the handshake
	// then fails), as in QEMU.
	if _, err := LoadX509(X509Options{ID: "t", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, expired, nil), Endpoint: Server, SanityCheck: boolp(false)}); err != nil {
		t.Fatalf("sanity-check=off: %v", err)
	}
}

// TestConfigs: what each endpoint's tls.Config asks for, and refusals.
func TestConfigs(t *testing.T) {
	w := newWorld(t)
	srv := load(t, X509Options{ID: "s", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil), Endpoint: Server})
	cli := load(t, X509Options{ID: "c", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, nil, w.client)})
	lax := load(t, X509Options{ID: "l", Dir: credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil), Endpoint: Server, VerifyPeer: boolp(false)})
	if _, err := cli.ClientConfig(""); err == nil || !strings.Contains(err.Error(), "No hostname available for TLS: set the migration parameter tls-hostname") {
		t.Errorf("client without a host name: %v", err)
	}
	if _, err := cli.ServerConfig(nil); err == nil || !strings.Contains(err.Error(), "Expected TLS credentials for a server endpoint") {
		t.Errorf("client creds as a server: %v", err)
	}
	if _, err := srv.ClientConfig("x"); err == nil || !strings.Contains(err.Error(), "Expected TLS credentials for a client endpoint") {
		t.Errorf("server creds as a client: %v", err)
	}
	if _, err := lax.ServerConfig(&Simple{ID: "a"}); err == nil || err.Error() != "tls-authz 'a' needs verify-peer=on in tls-creds 'l': the name in an unverified certificate proves nothing" {
		t.Errorf("authz without verify-peer: %v", err)
	}
	cfg, err := srv.ServerConfig(nil)
	if err != nil || cfg.MinVersion != 0x0304 || cfg.ClientAuth.String() != "RequireAndVerifyClientCert" || !cfg.SessionTicketsDisabled {
		t.Errorf("server config: %+v %v", cfg, err)
	}
	// A server that offers only TLS 1.2 is refused by the client.
	ccfg, err := cli.ClientConfig("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	old := &tls.Config{MaxVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*srv.cert}}
	a, b := socketPair(t)
	go func() { _ = tls.Server(a, old).Handshake(); a.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if _, err := ClientHandshake(ctx, b, ccfg); err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("client against a TLS 1.2 server: %v", err)
	}
	if h := Hostname("", "10.0.0.1"); h != "10.0.0.1" {
		t.Errorf("Hostname from the address: %q", h)
	}
	if h := Hostname("dst.example", "10.0.0.1"); h != "dst.example" {
		t.Errorf("tls-hostname wins: %q", h)
	}
}

// FuzzObjectsAdd: object-add's arguments from a client: no panic, and an
// object is either added under its id or refused with an error.
func FuzzObjectsAdd(f *testing.F) {
	for _, s := range []string{
		`{"qom-type":"authz-list","id":"a","policy":"allow","rules":[{"match":"*","policy":"deny","format":"glob"}]}`,
		`{"qom-type":"authz-simple","id":"b","identity":"CN=x"}`,
		`{"qom-type":"tls-creds-x509","id":"c","dir":"/nonexistent","endpoint":"server"}`,
		`{"qom-type":"tls-creds-psk","id":"d"}`,
		`{"qom-type":"authz-list","id":"e","rules":[null,{"match":5}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, args []byte) {
		o := NewObjects()
		err := o.Add(json.RawMessage(args))
		if ids := o.IDs(); (err == nil) != (len(ids) == 1) {
			t.Fatalf("Add: %v, objects %v", err, ids)
		}
	})
}
