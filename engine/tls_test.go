package engine_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/creds/credstest"
	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// TLS on the data plane (issue 12): in-process source and destination over
// real sockets, with certificates made for the test.

// tlsEnd is one side with its own object registry (QMP's object-add), seen
// by its controller's guards as migctl serve wires it.
type tlsEnd struct {
	*end
	objs *creds.Objects
}

func newTLSEnd(t *testing.T, dest bool, cfg guest.Config) *tlsEnd {
	t.Helper()
	objs := creds.NewObjects()
	var g *guest.Builtin
	var err error
	if dest {
		g, err = guest.NewDestination(cfg)
	} else {
		g, err = guest.New(cfg)
	}
	if err != nil {
		t.Fatal(err)
	}
	c, err := machine.New(defaultSpec(t), machine.Options{
		Facts:    map[string]string{"page-size": "4096", "guest": g.ID()},
		Incoming: dest,
		Objects:  guardObjects(objs),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); g.Close() })
	if dest {
		stayPaused(t, c)
	} else if err := g.Start(); err != nil {
		t.Fatal(err)
	}
	if err := c.SetParameters(context.Background(), map[string]any{"max-bandwidth": 0, "downtime-limit": 2000}); err != nil {
		t.Fatal(err)
	}
	return &tlsEnd{end: &end{c: c, g: g}, objs: objs}
}

// guardObjects shows objs to a controller's guards (tls-objects), as
// migctl serve wires it (qmp.GuardObjects).
func guardObjects(objs *creds.Objects) func() map[string]guards.Object {
	return func() map[string]guards.Object {
		out := map[string]guards.Object{}
		for _, in := range objs.List() {
			out[in.ID] = guards.Object{Type: in.Type, Endpoint: string(in.Endpoint), VerifyPeer: in.VerifyPeer}
		}
		return out
	}
}

// add is QMP's object-add.
func (e *tlsEnd) add(t *testing.T, args string) {
	t.Helper()
	if err := e.objs.Add(json.RawMessage(args)); err != nil {
		t.Fatalf("object-add %s: %v", args, err)
	}
}

func (e *tlsEnd) set(t *testing.T, params map[string]any) {
	t.Helper()
	if err := e.c.SetParameters(context.Background(), params); err != nil {
		t.Fatal(err)
	}
}

func jsonStr(s string) string { b, _ := json.Marshal(s); return string(b) }

// pki is a CA, a CA nobody trusts, and directories of QEMU's
// tls-creds-x509 layout.
type pki struct {
	ca, rogue *credstest.CA
	server    string // server-cert for 127.0.0.1 and localhost, ca-cert
	client    string // client-cert C=GB,O=Example Org,CN=src.example
}

const clientDN = "C=GB,O=Example Org,CN=src.example" // QEMU's form: certificate order, no spaces

func newPKI(t testing.TB) *pki {
	p := &pki{ca: credstest.NewCA(t, "migration CA"), rogue: credstest.NewCA(t, "rogue CA")}
	p.server = credstest.Dir(t, []*credstest.CA{p.ca}, p.ca.Server(t, "127.0.0.1", "localhost"), nil)
	p.client = credstest.Dir(t, []*credstest.CA{p.ca}, nil, p.ca.Client(t, "C", "GB", "O", "Example Org", "CN", "src.example"))
	return p
}

// serverCreds and clientCreds are object-add arguments for tls0.
func serverCreds(dir string) string {
	return `{"qom-type":"tls-creds-x509","id":"tls0","endpoint":"server","dir":` + jsonStr(dir) + `}`
}

func clientCreds(dir string, extra string) string {
	return `{"qom-type":"tls-creds-x509","id":"tls0","endpoint":"client","dir":` + jsonStr(dir) + extra + `}`
}

// tlsMigrate runs one migration to listenURI (dialling through via when
// set) and returns both results.
func tlsMigrate(t *testing.T, src, dst *tlsEnd, listenURI string, via func(string) string) (engine.Result, loaders.Result) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, listenURI, loaders.Options{Creds: dst.objs})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	uri := in.Addr().String()
	if via != nil {
		uri = via(uri)
	}
	m, err := engine.Start(ctx, src.c, src.g, uri, engine.Options{Creds: src.objs})
	if err != nil {
		in.Abort("source refused")
		<-in.Done()
		t.Fatalf("migrate: %v", err)
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		_ = m.Cancel(context.Background())
		in.Abort("test timed out")
		<-m.Done()
		<-in.Done()
		t.Fatalf("the migration did not end in time: %v", err)
	}
	// A destination that never saw the source (its TLS handshake failed
	// at the source's end before any byte) keeps waiting: end it.
	select {
	case <-in.Done():
	case <-time.After(5 * time.Second):
		in.Abort("the source gave up")
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		t.Fatalf("the destination did not end in time: %v", err)
	}
	return sr, dr
}

// wire records what a proxy between source and destination saw on every
// connection from the source.
type wire struct {
	mu    sync.Mutex
	conns [][]byte // each connection's bytes from the source, in full
}

// proxy forwards every connection to target and records the source's
// bytes; it returns the tcp: URI to dial.
func (w *wire) proxy(t *testing.T, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	dst := strings.TrimPrefix(target, "tcp:")
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", dst)
			if err != nil {
				c.Close()
				return
			}
			w.mu.Lock()
			i := len(w.conns)
			w.conns = append(w.conns, nil)
			w.mu.Unlock()
			wg.Add(2)
			go func() { // destination → source
				defer wg.Done()
				io.Copy(c, u)
				c.(*net.TCPConn).CloseWrite()
			}()
			go func() { // source → destination, recorded
				defer wg.Done()
				var rec bytes.Buffer
				io.Copy(io.MultiWriter(u, &rec), c)
				u.(*net.TCPConn).CloseWrite()
				w.mu.Lock()
				w.conns[i] = rec.Bytes()
				w.mu.Unlock()
			}()
		}
	}()
	return "tcp:" + ln.Addr().String()
}

// Plaintext markers that must never cross the wire under TLS: the stream's
// header (QEVM magic and version 3), a multifd initial packet's magic and
// version, and the name of the handshake section. Eight bytes or more, so
// ciphertext cannot contain one by chance.
var markers = map[string][]byte{
	"QEVM header":           {'Q', 'E', 'V', 'M', 0, 0, 0, 3},
	"multifd initial magic": binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 0x11223344), 1),
	"handshake section":     []byte("migctl/handshake"),
}

// check asserts what each connection carried: every one starts with a TLS
// handshake record (0x16 0x03) and no plaintext marker appears (tls), or
// the markers do appear (plaintext: the check can fail).
func (w *wire) check(t *testing.T, tls bool, wantConns int) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.conns) != wantConns {
		t.Fatalf("%d connections crossed the proxy, want %d", len(w.conns), wantConns)
	}
	seen := map[string]bool{}
	for i, b := range w.conns {
		if tls && (len(b) < 2 || b[0] != 0x16 || b[1] != 0x03) {
			t.Errorf("connection %d starts with % x, not a TLS handshake record", i, b[:min(len(b), 8)])
		}
		for name, m := range markers {
			if bytes.Contains(b, m) {
				seen[name] = true
				if tls {
					t.Errorf("connection %d carries the %s in the clear", i, name)
				}
			}
		}
	}
	if !tls && len(seen) == 0 {
		t.Errorf("no plaintext marker seen on a plaintext migration: the check sees nothing")
	}
}

// The source's and the destination's memory after a migration.
func sameMemory(t *testing.T, src, dst *tlsEnd) {
	t.Helper()
	if s, d := checksum(t, src.g), checksum(t, dst.g); s != d {
		t.Fatalf("checksums differ: source %#x, destination %#x", s, d)
	}
}

func tlsGuest() guest.Config {
	return guest.Config{Size: 16 << 20, DirtyRate: 4 << 20, Seed: 7, ZeroFraction: 0.1}
}

// Mutual TLS: the migration completes with equal memory over tcp (through
// a proxy that sees only TLS records), over unix with tls-hostname, and
// with multifd, every channel wrapped. Without tls-creds the same proxy
// sees the plaintext markers.
func TestTLSMigration(t *testing.T) {
	p := newPKI(t)
	for _, tc := range []struct {
		name     string
		tls      bool
		multifd  int
		listen   string
		hostname string
	}{
		{name: "tcp", tls: true, listen: "tcp:127.0.0.1:0"},
		{name: "tcp plaintext", listen: "tcp:127.0.0.1:0"},
		{name: "unix", tls: true, listen: "unix:" + filepath.Join(t.TempDir(), "m.sock"), hostname: "localhost"},
		{name: "multifd", tls: true, multifd: 4, listen: "tcp:127.0.0.1:0"},
		{name: "multifd plaintext", multifd: 2, listen: "tcp:127.0.0.1:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := newTLSEnd(t, false, tlsGuest()), newTLSEnd(t, true, tlsGuest())
			if tc.tls {
				dst.add(t, serverCreds(p.server))
				src.add(t, clientCreds(p.client, ""))
				dst.set(t, map[string]any{"tls-creds": "tls0"})
				src.set(t, map[string]any{"tls-creds": "tls0", "tls-hostname": tc.hostname})
			}
			if tc.multifd > 0 {
				for _, e := range []*tlsEnd{src, dst} {
					if err := e.c.SetCapabilities(context.Background(), map[string]bool{"multifd": true}); err != nil {
						t.Fatal(err)
					}
					e.set(t, map[string]any{"multifd-channels": tc.multifd})
				}
			}
			var w wire
			var via func(string) string
			if strings.HasPrefix(tc.listen, "tcp:") {
				via = func(u string) string { return w.proxy(t, u) }
			}
			sr, dr := tlsMigrate(t, src, dst, tc.listen, via)
			if sr.Err != nil || dr.Err != nil {
				t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
			}
			sameMemory(t, src, dst)
			if tc.multifd > 0 && dr.Wire.MultifdPages == 0 {
				t.Fatalf("no page travelled on a multifd channel: %+v", dr.Wire)
			}
			if via != nil {
				w.check(t, tc.tls, 1+tc.multifd)
			}
		})
	}
}

// Every failure ends both sides, each with a reason naming the cause
// (table written from creds' messages, which start with QEMU's wording):
// the destination's own reason where a channel still exists to carry it,
// otherwise each side's view of the TLS handshake.
func TestTLSFailures(t *testing.T) {
	p := newPKI(t)
	rogueClient := credstest.Dir(t, []*credstest.CA{p.ca, p.rogue}, nil, p.rogue.Client(t, "CN", "mallory"))
	trustsRogue := credstest.Dir(t, []*credstest.CA{p.rogue}, nil, p.rogue.Client(t, "CN", "alice"))
	expiredClient := credstest.Dir(t, []*credstest.CA{p.ca}, nil,
		p.ca.Issue(t, credstest.Expired(credstest.Options{Subject: p.ca.Cert.Subject})))
	for _, tc := range []struct {
		name           string
		srcObj, dstObj string         // object-add arguments ("" none)
		srcP, dstP     map[string]any // parameters
		extra          []string       // more objects on the destination
		srcWant        []string
		dstWant        []string
	}{
		{name: "hostname mismatch",
			srcObj: clientCreds(p.client, ""), dstObj: serverCreds(p.server),
			srcP: map[string]any{"tls-creds": "tls0", "tls-hostname": "other.example"}, dstP: map[string]any{"tls-creds": "tls0"},
			srcWant: []string{"Certificate does not match the hostname other.example", "is for localhost, 127.0.0.1", "set tls-hostname"},
			dstWant: []string{"TLS: the peer refused the handshake (bad certificate)"}},
		{name: "server certificate from an unknown CA",
			srcObj: clientCreds(trustsRogue, ""), dstObj: serverCreds(p.server),
			srcP: map[string]any{"tls-creds": "tls0"}, dstP: map[string]any{"tls-creds": "tls0"},
			srcWant: []string{"The certificate hasn't got a known issuer", "CN=127.0.0.1"},
			dstWant: []string{"TLS: the peer refused the handshake (bad certificate)"}},
		{name: "client certificate from an unknown CA",
			srcObj: clientCreds(rogueClient, ""), dstObj: serverCreds(p.server),
			srcP: map[string]any{"tls-creds": "tls0"}, dstP: map[string]any{"tls-creds": "tls0"},
			srcWant: []string{"TLS: the peer refused the handshake (unknown certificate authority)"},
			dstWant: []string{"The certificate hasn't got a known issuer", "CN=mallory"}},
		{name: "expired client certificate",
			srcObj: clientCreds(expiredClient, `,"sanity-check":false`), dstObj: serverCreds(p.server),
			srcP: map[string]any{"tls-creds": "tls0"}, dstP: map[string]any{"tls-creds": "tls0"},
			srcWant: []string{"TLS: the peer refused the handshake (expired certificate)", "has expired"},
			dstWant: []string{"The certificate has expired", "expired at"}},
		{name: "authz deny",
			srcObj: clientCreds(p.client, ""), dstObj: serverCreds(p.server),
			extra:   []string{`{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"CN=src.example,O=Example Org,C=GB","policy":"allow"}]}`},
			srcP:    map[string]any{"tls-creds": "tls0"},
			dstP:    map[string]any{"tls-creds": "tls0", "tls-authz": "auth0"},
			srcWant: []string{"TLS: the peer refused the handshake (bad certificate)", "authz"},
			dstWant: []string{"TLS x509 authz check for " + clientDN + " is denied", "'auth0'"}},
		{name: "plaintext source to a TLS destination",
			dstObj: serverCreds(p.server), dstP: map[string]any{"tls-creds": "tls0"},
			srcWant: []string{"destination: TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext"},
			dstWant: []string{"TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext"}},
		{name: "TLS source to a plaintext destination",
			srcObj: clientCreds(p.client, ""), srcP: map[string]any{"tls-creds": "tls0"},
			srcWant: []string{"TLS handshake failed: the peer closed the connection without answering the TLS ClientHello"},
			dstWant: []string{"TLS not configured: the peer started a TLS handshake (a TLS ClientHello) but tls-creds is not set here"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst := newTLSEnd(t, false, tlsGuest()), newTLSEnd(t, true, tlsGuest())
			before := checksum(t, dst.g)
			for _, o := range append([]string{tc.dstObj}, tc.extra...) {
				if o != "" {
					dst.add(t, o)
				}
			}
			if tc.srcObj != "" {
				src.add(t, tc.srcObj)
			}
			if tc.srcP != nil {
				src.set(t, tc.srcP)
			}
			if tc.dstP != nil {
				dst.set(t, tc.dstP)
			}
			sr, dr := tlsMigrate(t, src, dst, "tcp:127.0.0.1:0", nil)
			if sr.State != "failed" || dr.State != "failed" {
				t.Fatalf("source %s (%v), destination %s (%v); want both failed", sr.State, sr.Err, dr.State, dr.Err)
			}
			for _, c := range []struct {
				side string
				err  error
				want []string
			}{{"source", sr.Err, tc.srcWant}, {"destination", dr.Err, tc.dstWant}} {
				for _, w := range c.want {
					if c.err == nil || !strings.Contains(c.err.Error(), w) {
						t.Errorf("%s: %v\nwant a reason containing %q", c.side, c.err, w)
					}
				}
			}
			if !src.g.Running() {
				t.Error("the source guest does not run after the failure")
			}
			if after := checksum(t, dst.g); after != before || dr.Stats.Normal != 0 {
				t.Errorf("pages reached the destination's guest (%d)", dr.Stats.Normal)
			}
		})
	}
}

// authz allows by exact DN (QEMU's form) and by glob; authz-simple too.
func TestTLSAuthzAllow(t *testing.T) {
	p := newPKI(t)
	for _, authz := range []string{
		`{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":` + jsonStr(clientDN) + `,"policy":"allow"}]}`,
		`{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"C=GB,O=Example Org,CN=*.example","policy":"allow","format":"glob"}]}`,
		`{"qom-type":"authz-simple","id":"auth0","identity":` + jsonStr(clientDN) + `}`,
	} {
		t.Run(strings.Split(authz, `"`)[3], func(t *testing.T) {
			src, dst := newTLSEnd(t, false, tlsGuest()), newTLSEnd(t, true, tlsGuest())
			dst.add(t, serverCreds(p.server))
			dst.add(t, authz)
			src.add(t, clientCreds(p.client, ""))
			dst.set(t, map[string]any{"tls-creds": "tls0", "tls-authz": "auth0"})
			src.set(t, map[string]any{"tls-creds": "tls0"})
			sr, dr := tlsMigrate(t, src, dst, "tcp:127.0.0.1:0", nil)
			if sr.Err != nil || dr.Err != nil {
				t.Fatalf("source %v, destination %v", sr.Err, dr.Err)
			}
			sameMemory(t, src, dst)
		})
	}
}

// A destination cancelled while it loads tells a TLS source why, inside
// the TLS connection (the interrupt's past deadline did not break the
// farewell), and the source keeps its guest.
func TestTLSDestinationCancelReachesSource(t *testing.T) {
	for _, tls := range []bool{true, false} {
		t.Run(fmt.Sprint("tls=", tls), func(t *testing.T) { destinationCancel(t, tls) })
	}
}

func destinationCancel(t *testing.T, tls bool) {
	p := newPKI(t)
	cfg := tlsGuest()
	cfg.Size = 64 << 20
	src, dst := newTLSEnd(t, false, cfg), newTLSEnd(t, true, cfg)
	if tls {
		dst.add(t, serverCreds(p.server))
		src.add(t, clientCreds(p.client, ""))
		dst.set(t, map[string]any{"tls-creds": "tls0"})
		src.set(t, map[string]any{"tls-creds": "tls0"})
	}
	// Slow enough that the cancel lands while pages flow.
	src.set(t, map[string]any{"max-bandwidth": 16 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sub := dst.c.Subscribe(4096)
	defer sub.Close()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{Creds: dst.objs})
	if err != nil {
		t.Fatal(err)
	}
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{Creds: src.objs})
	if err != nil {
		t.Fatal(err)
	}
	// The destination loads pages when the cancel comes.
	for loading := false; !loading; {
		select {
		case ev := <-sub.C():
			loading = ev.Kind == machine.EventStats && ev.Side == spec.Incoming && ev.Stats.Normal > 0
		case <-ctx.Done():
			t.Fatal("the destination never loaded a page")
		}
	}
	if err := in.Cancel(ctx, "operator says stop"); err != nil {
		t.Fatal(err)
	}
	sr, _ := m.Wait(ctx)
	dr, _ := in.Wait(ctx)
	if dr.State != "cancelled" {
		t.Fatalf("destination %s (%v)", dr.State, dr.Err)
	}
	if sr.State != "failed" || sr.Err == nil || !strings.Contains(sr.Err.Error(), "destination: ") || !strings.Contains(sr.Err.Error(), "operator says stop") {
		t.Fatalf("source %s: %v; want the destination's reason", sr.State, sr.Err)
	}
	if !src.g.Running() {
		t.Error("the source guest does not run after the failure")
	}
}
