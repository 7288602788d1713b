package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/creds/credstest"
)

// What must never cross the wire in the clear under TLS, per direction,
// written here from the formats' documentation (docs/stream.md, QEMU's
// migration/savevm.c and multifd.h), not taken from the code under test.
// Each marker is eight bytes or more, so that ciphertext cannot contain one
// by chance (a 4-byte pattern would, about once in 2^32 positions: once a
// few hundred migrations of this size).
var (
	// Source → destination.
	clearToDest = map[string][]byte{
		"stream header (QEVM magic, version 3)":     {'Q', 'E', 'V', 'M', 0, 0, 0, 3},
		"multifd initial packet (magic, version 1)": {0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1},
		"commit trailer GO (MGCT, code 2)":          {'M', 'G', 'C', 'T', 0, 0, 0, 2},
	}
	// Destination → source (the return path).
	clearToSource = map[string][]byte{
		"return-path HELLO text": []byte("switchover-commit/1"),
	}
)

// wireDir is what one direction of one relayed connection carried: its
// first bytes and which plaintext markers passed. Its goroutine owns it
// until the relay's WaitGroup says it is done.
type wireDir struct {
	head  []byte          // the first 5 bytes (a TLS record header's size)
	n     int64           // bytes relayed
	clear map[string]bool // markers seen in the clear
	tail  []byte          // the last bytes of the previous read, for markers across reads
}

// relay is a loopback TCP proxy in front of a destination: every
// connection it accepts is relayed to target in both directions (a FIN
// half-closes the other side, as a TLS close_notify then FIN must reach
// the peer), and each direction is scanned as it passes.
type relay struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu    sync.Mutex    // guards conns and open
	conns [][2]*wireDir // per connection in accept order: [0] to the destination, [1] to the source
	open  []net.Conn    // every socket, closed by stop
}

func newRelay(t *testing.T, target string) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, target: target}
	t.Cleanup(r.stop)
	r.wg.Add(1)
	go r.accept()
	return r
}

// port is the relay's port, for the source's tcp: address.
func (r *relay) port() int { return r.ln.Addr().(*net.TCPAddr).Port }

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.DialTimeout("tcp", r.target, 10*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		d := [2]*wireDir{{clear: map[string]bool{}}, {clear: map[string]bool{}}}
		r.mu.Lock()
		r.conns = append(r.conns, d)
		r.open = append(r.open, c, u)
		r.mu.Unlock()
		r.wg.Add(2)
		go r.pipe(u, c, d[0], clearToDest)
		go r.pipe(c, u, d[1], clearToSource)
	}
}

// pipe copies from → to, scanning for markers, and half-closes to at EOF.
func (r *relay) pipe(to, from net.Conn, d *wireDir, markers map[string][]byte) {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 {
			b := buf[:n]
			if len(d.head) < 5 {
				d.head = append(d.head, b[:min(n, 5-len(d.head))]...)
			}
			d.n += int64(n)
			win := append(d.tail, b...)
			for name, m := range markers {
				if bytes.Contains(win, m) {
					d.clear[name] = true
				}
			}
			d.tail = append(d.tail[:0], win[max(0, len(win)-31):]...) // markers are shorter than 32 bytes
			if _, werr := to.Write(b); werr != nil {
				to.Close()
				from.Close()
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				to.(*net.TCPConn).CloseWrite()
			} else {
				to.Close()
			}
			return
		}
	}
}

// stop closes the listener and every socket and waits for the goroutines.
func (r *relay) stop() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.open {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// settle waits (bounded) until every relayed connection ended on its own,
// both ways — the sides close their channels when a migration is over —
// and returns what they carried; after the bound it stops the relay and
// fails.
func (r *relay) settle(t *testing.T) [][2]*wireDir {
	t.Helper()
	r.ln.Close()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		r.stop()
		<-done
		t.Errorf("a migration channel was still open 30 s after both sides completed")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.conns
}

// isTLSRecord reports whether head opens a TLS handshake record: content
// type 22 (handshake), legacy record version 3.1 to 3.3 (RFC 8446 §5.1:
// a ClientHello may say 0x0301, everything else 0x0303).
func isTLSRecord(head []byte) bool {
	return len(head) >= 3 && head[0] == 0x16 && head[1] == 0x03 && head[2] >= 0x01 && head[2] <= 0x03
}

// Every channel of a TLS migration between two serve processes, seen
// through a proxy: each connection (the main channel, whose reverse
// direction is the return path, and each multifd channel) opens with a TLS
// handshake record in both directions, and no marker of the stream, the
// multifd channels, the commit trailer or the return path crosses in the
// clear. The same migrations without tls-creds show the markers, so the
// proxy's scan can fail.
func TestServeTLSOnTheWire(t *testing.T) {
	ca := credstest.NewCA(t, "migration CA")
	serverDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1"), nil)
	clientDir := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "CN", "src.example"))
	for _, tc := range []struct {
		name    string
		tls     bool
		multifd int
		// The markers the plaintext migration must show, per direction.
		wantClearToDest, wantClearToSource []string
	}{
		{name: "TLS", tls: true},
		{name: "TLS multifd", tls: true, multifd: 3},
		{name: "plaintext", wantClearToDest: []string{"stream header (QEVM magic, version 3)", "commit trailer GO (MGCT, code 2)"},
			wantClearToSource: []string{"return-path HELLO text"}},
		{name: "plaintext multifd", multifd: 2, wantClearToDest: []string{"stream header (QEVM magic, version 3)", "multifd initial packet (magic, version 1)", "commit trailer GO (MGCT, code 2)"},
			wantClearToSource: []string{"return-path HELLO text"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			guest := "--guest=size=16M,dirty-rate=4M,seed=21"
			src := startServe(t, "src", guest)
			dst := startServe(t, "dst", guest, "--destination")
			dst.ok(`{"execute":"stop"}`)
			if tc.tls {
				src.ok(addX509("client", clientDir, ""))
				src.ok(setParams(`"tls-creds":"tls0"`))
				dst.ok(addX509("server", serverDir, ""))
				dst.ok(setParams(`"tls-creds":"tls0"`))
			}
			if tc.multifd > 0 {
				for _, p := range []*serveProc{src, dst} {
					p.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"multifd","state":true}]}}`)
					p.ok(setParams(fmt.Sprintf(`"multifd-channels":%d`, tc.multifd)))
				}
			}
			dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
			r := newRelay(t, "127.0.0.1:"+listenPort(t, dst.info()))
			src.ok(setParams(`"max-bandwidth":0,"downtime-limit":2000`))
			src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%d"}}`, r.port()))
			for _, p := range []*serveProc{src, dst} {
				if end := p.waitEnd(); end != "completed" {
					t.Fatalf("the migration ended %s, want completed: %v", end, p.info()["error-desc"])
				}
			}
			if s, d := src.digest(), dst.digest(); s != d {
				t.Fatalf("digests differ: source %s, destination %s", s, d)
			}
			conns := r.settle(t)
			if len(conns) != 1+tc.multifd {
				t.Fatalf("%d connections crossed the proxy, want %d (main + %d multifd)", len(conns), 1+tc.multifd, tc.multifd)
			}
			// The pages went over the multifd channels (half the 16 MiB
			// guest at least), so the check saw them.
			if tc.multifd > 0 {
				var sum int64
				for _, c := range conns[1:] {
					sum += c[0].n
				}
				if sum < 8<<20 {
					t.Errorf("the multifd channels carried %d bytes, want at least 8 MiB of the guest's pages", sum)
				}
			}
			seen := [2]map[string]bool{{}, {}}
			for i, c := range conns {
				for dir, d := range c {
					way := [2]string{"source → destination", "destination → source"}[dir]
					// A multifd channel is one-way in plaintext (QEMU's
					// destination never writes to it); under TLS its
					// server answers the handshake.
					if d.n == 0 {
						if dir == 1 && i > 0 && !tc.tls {
							continue
						}
						t.Errorf("connection %d carried nothing %s", i, way)
						continue
					}
					if tc.tls && !isTLSRecord(d.head) {
						t.Errorf("connection %d %s starts with % x, not a TLS handshake record (16 03 01..03)", i, way, d.head)
					}
					for m := range d.clear {
						seen[dir][m] = true
						if tc.tls {
							t.Errorf("connection %d carries the %s in the clear %s", i, m, way)
						}
					}
				}
			}
			for dir, want := range [2][]string{tc.wantClearToDest, tc.wantClearToSource} {
				for _, m := range want {
					if !seen[dir][m] {
						t.Errorf("plaintext migration: the %s never crossed the proxy: the scan sees nothing", m)
					}
				}
			}
		})
	}
}
