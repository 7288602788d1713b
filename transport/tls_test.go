package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/creds/credstest"
)

// tlsPair is one TLS channel over a real socket: the source's end (cli)
// and the destination's (srv), handshaken with certificates made for the
// test.
type tlsPair struct {
	cli, srv Conn
	rawSrv   Conn // the destination's socket under TLS
}

func tlsConfigs(t *testing.T) (client, server *tls.Config) {
	t.Helper()
	ca := credstest.NewCA(t, "transport test CA")
	srvDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1", "localhost"), nil)
	cliDir := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "CN", "src"))
	sx, err := creds.LoadX509(creds.X509Options{ID: "s", Dir: srvDir, Endpoint: creds.Server})
	if err != nil {
		t.Fatal(err)
	}
	cx, err := creds.LoadX509(creds.X509Options{ID: "c", Dir: cliDir})
	if err != nil {
		t.Fatal(err)
	}
	if server, err = sx.ServerConfig(nil); err != nil {
		t.Fatal(err)
	}
	if client, err = cx.ClientConfig("localhost"); err != nil {
		t.Fatal(err)
	}
	return client, server
}

func newTLSPair(t *testing.T, uri string) *tlsPair {
	t.Helper()
	ccfg, scfg := tlsConfigs(t)
	ctx, cancel := context.WithTimeout(context.Background(), promptly)
	defer cancel()
	l, err := Listen(ctx, mustParse(t, uri))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type accepted struct {
		raw, c Conn
		err    error
	}
	done := make(chan accepted, 1)
	go func() {
		raw, err := l.Accept(ctx)
		if err != nil {
			done <- accepted{err: err}
			return
		}
		head := make([]byte, 4)
		if _, err := io.ReadFull(raw, head); err != nil {
			raw.Close()
			done <- accepted{err: err}
			return
		}
		if k := creds.KindOf(head); k != creds.KindTLS {
			raw.Close()
			done <- accepted{err: errors.New("first bytes are " + k.String())}
			return
		}
		c, err := ServerTLS(ctx, raw, head, scfg)
		if err != nil {
			raw.Close()
		}
		done <- accepted{raw: raw, c: c, err: err}
	}()
	raw, err := Dial(ctx, l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	cli, err := ClientTLS(ctx, raw, ccfg)
	if err != nil {
		raw.Close()
		t.Fatal(err)
	}
	a := <-done
	if a.err != nil {
		cli.Close()
		t.Fatal(a.err)
	}
	p := &tlsPair{cli: cli, srv: a.c, rawSrv: a.raw}
	t.Cleanup(func() { p.cli.Close(); p.srv.Close() })
	for _, c := range []Conn{p.cli, p.srv} {
		if err := c.SetDeadline(time.Now().Add(2 * promptly)); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// A TLS channel is a Conn: bytes both ways, a half-close that ends the
// peer's reads with io.EOF after TLS's close_notify, the return path
// usable after it, TLS 1.3 underneath.
func TestTLSExchange(t *testing.T) {
	for _, uri := range []string{"tcp:127.0.0.1:0", "unix:" + filepath.Join(t.TempDir(), "tls.sock")} {
		t.Run(uri[:3], func(t *testing.T) {
			p := newTLSPair(t, uri)
			data := payload(3<<20 + 17)
			got := make(chan result, 1)
			go func() {
				b, err := io.ReadAll(p.srv)
				if err == nil {
					_, err = p.srv.Write([]byte("ack"))
				}
				if err == nil {
					err = p.srv.CloseWrite()
				}
				got <- result{data: b, err: err}
			}()
			if _, err := p.cli.Write(data); err != nil {
				t.Fatal(err)
			}
			if err := p.cli.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			ack, err := io.ReadAll(p.cli)
			if err != nil || string(ack) != "ack" {
				t.Fatalf("return path after CloseWrite: %q, %v", ack, err)
			}
			r := <-got
			if r.err != nil || !bytes.Equal(r.data, data) {
				t.Fatalf("destination read %d bytes (%v), want the %d sent", len(r.data), r.err, len(data))
			}
			for _, c := range []Conn{p.cli, p.srv} {
				st, ok := TLSState(c)
				if !ok || st.Version != tls.VersionTLS13 || !c.ReturnPath() {
					t.Fatalf("TLS state %v (version %#x), return path %v", ok, st.Version, c.ReturnPath())
				}
			}
		})
	}
}

// A peer whose socket ends without close_notify did not end its TLS
// session: the reader is told the data may be cut short, never a clean
// io.EOF (an attacker can cut a TCP connection at a record boundary).
func TestTLSTruncation(t *testing.T) {
	p := newTLSPair(t, "tcp:127.0.0.1:0")
	if _, err := p.cli.Write([]byte("some")); err != nil {
		t.Fatal(err)
	}
	p.cli.Close() // no close_notify
	b, err := io.ReadAll(p.srv)
	if string(b) != "some" || !errors.Is(err, ErrTruncated) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read %q, %v; want the bytes then ErrTruncated", b, err)
	}
}

// The engine's and the loader's interrupt: a past deadline ends a blocked
// read at once and fails the next write, yet a fresh deadline lets the
// farewell through, readable by the peer (crypto/tls would break the
// connection for good had the write met the past deadline).
func TestTLSInterruptThenFarewell(t *testing.T) {
	p := newTLSPair(t, "tcp:127.0.0.1:0")
	readErr := make(chan error, 1)
	go func() {
		_, err := p.cli.Read(make([]byte, 1))
		readErr <- err
	}()
	if err := p.cli.SetDeadline(time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("blocked read after a past deadline: %v", err)
		}
	case <-time.After(promptly):
		t.Fatal("a past deadline did not end the blocked read")
	}
	if _, err := p.cli.Write([]byte("late")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write after a past deadline: %v, want a deadline error", err)
	}
	if err := p.cli.SetDeadline(time.Now().Add(promptly)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.cli.Write([]byte("ABORT")); err != nil {
		t.Fatalf("farewell after a fresh deadline: %v", err)
	}
	if err := p.cli.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(p.srv)
	if string(b) != "ABORT" || err != nil {
		t.Fatalf("the peer read %q, %v; want the farewell and a clean end", b, err)
	}
}

// A write blocked in the socket (the peer does not read) is interrupted by
// a past deadline; crypto/tls cannot write on that connection again, and
// every later write says so rather than sending garbage.
func TestTLSInterruptedWriteBreaks(t *testing.T) {
	p := newTLSPair(t, "tcp:127.0.0.1:0")
	written := make(chan error, 1)
	go func() {
		// Far more than the socket buffers hold: the peer never reads.
		_, err := p.cli.Write(make([]byte, 256<<20))
		written <- err
	}()
	// The destination reads one byte, so the write is under way; it then
	// stops reading and the write blocks once the socket buffers are full.
	if _, err := p.srv.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if err := p.cli.SetDeadline(time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-written:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("interrupted write: %v", err)
		}
	case <-time.After(promptly):
		t.Fatal("a past deadline did not end the blocked write")
	}
	if err := p.cli.SetDeadline(time.Now().Add(promptly)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.cli.Write([]byte("ABORT")); !errors.Is(err, ErrTLSBroken) {
		t.Fatalf("write after an interrupted write: %v, want ErrTLSBroken", err)
	}
	if err := p.cli.CloseWrite(); !errors.Is(err, ErrTLSBroken) {
		t.Fatalf("CloseWrite after an interrupted write: %v, want ErrTLSBroken", err)
	}
}

// TLS needs the peer's answers: a one-way channel is refused before any
// byte is written.
func TestTLSNeedsTwoWay(t *testing.T) {
	ccfg, _ := tlsConfigs(t)
	path := filepath.Join(t.TempDir(), "save")
	c, err := Dial(context.Background(), mustParse(t, "file:"+path+",offset=1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ClientTLS(context.Background(), c, ccfg); !errors.Is(err, ErrNotTwoWay) {
		t.Fatalf("ClientTLS over file: %v, want ErrNotTwoWay", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != before.Size() {
		t.Fatalf("the file grew to %v bytes (%v) from %d: ClientTLS wrote to it", fi.Size(), err, before.Size())
	}
}
