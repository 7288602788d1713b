package main

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/creds/credstest"
)

// Mutual TLS on the migration channels between two `migctl serve`
// processes (issue 12), configured over QMP as QEMU is: object-add of
// tls-creds-x509 (and authz-list or authz-simple), then
// migrate-set-parameters tls-creds, tls-hostname, tls-authz. Every case
// either completes with equal digests or fails both sides with a reason
// naming the cause; the reasons are written here from creds' messages
// (which start with QEMU's wording), never computed.
func TestServeTLSMigration(t *testing.T) {
	ca := credstest.NewCA(t, "migration CA")
	rogue := credstest.NewCA(t, "rogue CA")
	serverDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1", "dst.example"), nil)
	clientDir := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "C", "GB", "O", "Example Org", "CN", "src.example"))
	const dn = "C=GB,O=Example Org,CN=src.example" // QEMU's (GnuTLS's) form: certificate order, no spaces
	expiredServer := credstest.Dir(t, []*credstest.CA{ca}, ca.Issue(t, credstest.Expired(credstest.Options{Subject: pkix.Name{CommonName: "127.0.0.1"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})), nil)
	rogueClient := credstest.Dir(t, []*credstest.CA{ca, rogue}, nil, rogue.Client(t, "CN", "mallory"))
	trustsRogue := credstest.Dir(t, []*credstest.CA{rogue}, nil, rogue.Client(t, "CN", "alice"))
	expired := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Issue(t, credstest.Expired(credstest.Options{Subject: pkix.Name{CommonName: "expired.example"}, Usage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})))
	for _, tc := range []struct {
		name     string
		src, dst []string // QMP commands before the migration
		srcWant  []string // "" parts: the migration completes
		dstWant  []string
	}{
		{name: "mutual x509",
			src: []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0"`)},
			dst: []string{addX509("server", serverDir, ""), setParams(`"tls-creds":"tls0"`)}},
		{name: "authz allow",
			src: []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0","tls-hostname":"dst.example"`)},
			dst: []string{addX509("server", serverDir, ""),
				`{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"` + dn + `","policy":"allow"}]}}`,
				setParams(`"tls-creds":"tls0","tls-authz":"auth0"`)}},
		{name: "authz-simple allow",
			src: []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0"`)},
			dst: []string{addX509("server", serverDir, ""),
				`{"execute":"object-add","arguments":{"qom-type":"authz-simple","id":"auth0","identity":"` + dn + `"}}`,
				setParams(`"tls-creds":"tls0","tls-authz":"auth0"`)}},
		{name: "authz-list glob deny",
			src: []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0"`)},
			dst: []string{addX509("server", serverDir, ""),
				`{"execute":"object-add","arguments":{"qom-type":"authz-list","id":"auth0","policy":"allow","rules":[{"match":"*CN=src.*","policy":"deny","format":"glob"}]}}`,
				setParams(`"tls-creds":"tls0","tls-authz":"auth0"`)},
			srcWant: []string{"TLS: the peer refused the handshake (bad certificate)"},
			dstWant: []string{"TLS x509 authz check for " + dn + " is denied", "'auth0'"}},
		// The same names in reverse (RFC 4514's order, as OpenSSL prints
		// it): QEMU compares the identity string exactly, so it is denied.
		{name: "authz deny",
			src: []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0"`)},
			dst: []string{addX509("server", serverDir, ""),
				`{"execute":"object-add","arguments":{"qom-type":"authz-simple","id":"auth0","identity":"CN=src.example,O=Example Org,C=GB"}}`,
				setParams(`"tls-creds":"tls0","tls-authz":"auth0"`)},
			srcWant: []string{"TLS: the peer refused the handshake (bad certificate)"},
			dstWant: []string{"TLS x509 authz check for " + dn + " is denied", "'auth0'"}},
		{name: "hostname mismatch",
			src:     []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0","tls-hostname":"other.example"`)},
			dst:     []string{addX509("server", serverDir, ""), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"Certificate does not match the hostname other.example", "dst.example, 127.0.0.1"},
			dstWant: []string{"TLS: the peer refused the handshake (bad certificate)"}},
		{name: "unknown CA",
			src:     []string{addX509("client", trustsRogue, ""), setParams(`"tls-creds":"tls0"`)},
			dst:     []string{addX509("server", serverDir, ""), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"The certificate hasn't got a known issuer"},
			dstWant: []string{"TLS: the peer refused the handshake (bad certificate)"}},
		// The source trusts both CAs, the destination only its own.
		{name: "unknown CA of the client certificate",
			src:     []string{addX509("client", rogueClient, ""), setParams(`"tls-creds":"tls0"`)},
			dst:     []string{addX509("server", serverDir, ""), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"TLS: the peer refused the handshake (unknown certificate authority)", "check the peer's ca-cert.pem"},
			dstWant: []string{"The certificate hasn't got a known issuer"}},
		{name: "expired certificate",
			src:     []string{addX509("client", expired, `,"sanity-check":false`), setParams(`"tls-creds":"tls0"`)},
			dst:     []string{addX509("server", serverDir, ""), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"TLS: the peer refused the handshake (expired certificate)"},
			dstWant: []string{"The certificate has expired"}},
		{name: "expired server certificate",
			src:     []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0"`)},
			dst:     []string{addX509("server", expiredServer, `,"sanity-check":false`), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"The certificate has expired"},
			// Go's TLS client answers any certificate it refuses with the
			// bad_certificate alert (its server says expired_certificate),
			// so the destination learns only that it was refused.
			dstWant: []string{"TLS: the peer refused the handshake (bad certificate)"}},
		{name: "plaintext source to a TLS destination",
			dst:     []string{addX509("server", serverDir, ""), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"destination: TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext"},
			dstWant: []string{"TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext"}},
		{name: "TLS source to a plaintext destination",
			src:     []string{addX509("client", clientDir, ""), setParams(`"tls-creds":"tls0"`)},
			srcWant: []string{"TLS handshake failed: the peer closed the connection without answering the TLS ClientHello"},
			dstWant: []string{"TLS not configured: the peer started a TLS handshake (a TLS ClientHello) but tls-creds is not set here"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			guest := "--guest=size=16M,dirty-rate=4M,seed=12"
			src := startServe(t, "src", guest)
			dst := startServe(t, "dst", guest, "--destination")
			dst.ok(`{"execute":"stop"}`) // stay paused on arrival, so its memory can be compared
			before := dst.digest()
			for _, c := range tc.src {
				src.ok(c)
			}
			for _, c := range tc.dst {
				dst.ok(c)
			}
			dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
			src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0,"downtime-limit":2000}}`)
			src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, listenPort(t, dst.info())))
			if tc.srcWant == nil {
				for _, p := range []*serveProc{src, dst} {
					if end := p.waitEnd(); end != "completed" {
						t.Fatalf("the migration ended %s, want completed: %v", end, p.info()["error-desc"])
					}
				}
				if s, d := src.digest(), dst.digest(); s != d {
					t.Fatalf("digests differ: source %s, destination %s", s, d)
				}
				return
			}
			for _, p := range []*serveProc{src, dst} {
				if end := p.waitEnd(); end != "failed" {
					t.Fatalf("the migration ended %s, want failed", end)
				}
			}
			for _, c := range []struct {
				side string
				p    *serveProc
				want []string
			}{{"source", src, tc.srcWant}, {"destination", dst, tc.dstWant}} {
				desc := fmt.Sprint(c.p.info()["error-desc"])
				for _, w := range c.want {
					if !strings.Contains(desc, w) {
						t.Errorf("%s error-desc %q\ndoes not say %q", c.side, desc, w)
					}
				}
			}
			if st := runState(t, src); st != "running" {
				t.Errorf("source guest %s after the failure, want running", st)
			}
			if after := dst.digest(); after != before {
				t.Errorf("the destination's memory changed (digest %s → %s)", before, after)
			}
		})
	}
}

// waitEnd waits (bounded) for the side's migration to end and returns how:
// completed, failed or cancelled — the first of them its MIGRATION events
// report.
func (p *serveProc) waitEnd() string {
	p.t.Helper()
	timer := time.NewTimer(60 * time.Second)
	defer timer.Stop()
	for {
		p.mu.Lock()
		seen := slices.Clone(p.statuses)
		p.mu.Unlock()
		for _, s := range seen {
			if s == "completed" || s == "failed" || s == "cancelled" {
				return s
			}
		}
		select {
		case <-p.changed:
		case <-timer.C:
			p.t.Fatalf("the migration did not end within 60 s (seen %v)", seen)
		}
	}
}

// addX509 is the QMP object-add of a tls-creds-x509 object tls0 reading
// dir; extra is more properties (`,"verify-peer":false`).
func addX509(endpoint, dir, extra string) string {
	b, _ := json.Marshal(dir)
	return fmt.Sprintf(`{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"tls0","endpoint":%q,"dir":%s%s}}`, endpoint, b, extra)
}

// setParams is migrate-set-parameters with kv as its arguments' members.
func setParams(kv string) string {
	return `{"execute":"migrate-set-parameters","arguments":{` + kv + `}}`
}

// Go's crypto/tls has no external pre-shared keys and migctl writes no
// TLS cryptography: object-add of tls-creds-psk is refused with that
// reason, as QMP's answer.
func TestServeTLSPSKRefused(t *testing.T) {
	p := startServe(t, "src", "--guest=size=8M,dirty-rate=0,seed=1")
	p.refused(`{"execute":"object-add","arguments":{"qom-type":"tls-creds-psk","id":"tls0","dir":"/tmp","endpoint":"client","username":"u"}}`,
		"tls-creds-psk is not supported", "Go's crypto/tls has no external pre-shared-key (PSK) support", "use tls-creds-x509")
}
