package fault

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// guard bounds every wait of these tests: nothing here should take more
// than a fraction of it, so reaching it means the behaviour is missing.
const guard = 10 * time.Second

// pair is a proxy with one link: client is the connecting side, server the
// upstream side.
type pair struct {
	p              *Proxy
	client, server net.Conn
}

// upstream is a listener whose accepted connections arrive on conns.
type upstream struct {
	ln    net.Listener
	conns chan net.Conn
}

func newUpstream(t *testing.T, network string) *upstream {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "up.sock")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{ln: ln, conns: make(chan net.Conn, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(u.conns)
				return
			}
			u.conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for c := range u.conns {
			c.Close()
		}
	})
	return u
}

func (u *upstream) next(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-u.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(guard):
		t.Fatal("no connection reached upstream")
		return nil
	}
}

func proxyAddr(t *testing.T, network string) string {
	if network == "unix" {
		return filepath.Join(t.TempDir(), "proxy.sock")
	}
	return "127.0.0.1:0"
}

func newPair(t *testing.T, network string, opts Options) *pair {
	t.Helper()
	u := newUpstream(t, network)
	p, err := Listen(network, proxyAddr(t, network), DialAddr(network, u.ln.Addr().String()), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	c, err := net.Dial(network, p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &pair{p: p, client: c, server: u.next(t)}
}

// readN reads exactly n bytes within the guard.
func readN(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(guard))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func write(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	_ = c.SetWriteDeadline(time.Now().Add(guard))
	if _, err := c.Write(b); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// ended reads from c within the guard and fails unless the stream has
// ended (EOF or a reset), with no byte before the end.
func ended(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(guard))
	var b [64]byte
	n, err := c.Read(b[:])
	if n > 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: read %d bytes, err %v; want the stream ended", what, n, err)
	}
}

// nothingPending fails if c has bytes to read right now.
func nothingPending(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now())
	var b [64]byte
	n, err := c.Read(b[:])
	if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: read %d bytes (%q), err %v; want nothing pending", what, n, b[:n], err)
	}
	_ = c.SetReadDeadline(time.Time{})
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestForward: bytes cross intact both ways over tcp and unix, at once in
// both directions, and a half-close passes through while the other way
// keeps flowing.
func TestForward(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			pr := newPair(t, network, Options{})
			fl := &chunkLog{dir: Forward, changed: make(chan struct{})}
			bl := &chunkLog{dir: Backward, changed: make(chan struct{})}
			pr.p.onChunk = func(d Dir, n int) { fl.add(d, n); bl.add(d, n) }
			fwd, back := random(t, 1<<20), random(t, 1<<20)
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); pr.client.Write(fwd) }()
			go func() { defer wg.Done(); pr.server.Write(back) }()
			if got := readN(t, pr.server, len(fwd)); !bytes.Equal(got, fwd) {
				t.Fatal("forward bytes differ")
			}
			if got := readN(t, pr.client, len(back)); !bytes.Equal(got, back) {
				t.Fatal("backward bytes differ")
			}
			wg.Wait()
			// What was read may not be counted yet (the proxy's Add
			// follows its write): wait for the proxy's records.
			fl.wait(t, len(fwd))
			bl.wait(t, len(back))
			if pr.p.Forwarded(Forward) != int64(len(fwd)) || pr.p.Forwarded(Backward) != int64(len(back)) {
				t.Fatalf("Forwarded = %d, %d; want %d each", pr.p.Forwarded(Forward), pr.p.Forwarded(Backward), len(fwd))
			}
			if err := pr.client.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			ended(t, pr.server, "server after the client's half-close")
			write(t, pr.server, []byte("still"))
			if got := readN(t, pr.client, 5); string(got) != "still" {
				t.Fatalf("backward after the half-close: %q", got)
			}
		})
	}
}

// TestCut: both ends see their stream end at once; a new connection is
// refused (closed before anything reaches upstream) until Heal, after
// which connections forward again.
func TestCut(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			u := newUpstream(t, network)
			p, err := Listen(network, proxyAddr(t, network), DialAddr(network, u.ln.Addr().String()), Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			c, err := net.Dial(network, p.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s := u.next(t)
			write(t, c, []byte("x"))
			readN(t, s, 1)
			p.Cut()
			ended(t, c, "client after Cut")
			ended(t, s, "server after Cut")

			// The proxy accepts and resets it: over TCP the reset may
			// already reach the connect (ECONNRESET), which is as ended.
			c2, err := net.Dial(network, p.Addr().String())
			switch {
			case err == nil:
				defer c2.Close()
				ended(t, c2, "a connection made after Cut")
			case !errors.Is(err, unix.ECONNRESET):
				t.Fatal(err)
			}
			select {
			case extra := <-u.conns:
				extra.Close()
				t.Fatal("a connection made after Cut reached upstream")
			default:
			}

			p.Heal()
			c3, err := net.Dial(network, p.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c3.Close()
			s3 := u.next(t)
			write(t, c3, []byte("healed"))
			if got := readN(t, s3, 6); string(got) != "healed" {
				t.Fatalf("after Heal: %q", got)
			}
		})
	}
}

// TestStall: a stall holds what the proxy read in each direction and
// forwards nothing until Heal, then everything held arrives intact.
func TestStall(t *testing.T) {
	pr := newPair(t, "tcp", Options{})
	holding := make(chan Dir, 4)
	pr.p.onHold = func(d Dir) { holding <- d }
	pr.p.Stall()
	write(t, pr.client, []byte("hello"))
	write(t, pr.server, []byte("back"))
	seen := map[Dir]bool{}
	for len(seen) < 2 {
		select {
		case d := <-holding:
			seen[d] = true
		case <-time.After(guard):
			t.Fatalf("the proxy did not hold both directions (held %v): the stall forwarded them", seen)
		}
	}
	if pr.p.Held(Forward) != 5 || pr.p.Held(Backward) != 4 {
		t.Fatalf("Held = %d, %d; want 5, 4", pr.p.Held(Forward), pr.p.Held(Backward))
	}
	nothingPending(t, pr.server, "server during the stall")
	nothingPending(t, pr.client, "client during the stall")
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	if err := pr.p.Drain(gone); !errors.Is(err, context.Canceled) {
		t.Fatalf("Drain during the stall = %v, want it to wait (here: its context's end)", err)
	}
	pr.p.Heal()
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	defer cancel()
	if err := pr.p.Drain(ctx); err != nil {
		t.Fatalf("Drain after Heal: %v", err)
	}
	if pr.p.Forwarded(Forward) != 5 || pr.p.Forwarded(Backward) != 4 {
		t.Fatalf("after Drain, Forwarded = %d, %d; want 5, 4 (everything held delivered)", pr.p.Forwarded(Forward), pr.p.Forwarded(Backward))
	}
	if got := readN(t, pr.server, 5); string(got) != "hello" {
		t.Fatalf("after Heal: %q", got)
	}
	if got := readN(t, pr.client, 4); string(got) != "back" {
		t.Fatalf("after Heal: %q", got)
	}
	if pr.p.Held(Forward) != 0 || pr.p.Held(Backward) != 0 {
		t.Fatalf("Held after Heal = %d, %d", pr.p.Held(Forward), pr.p.Held(Backward))
	}
}

// TestCorrupt: the first byte of the next chunk in the chosen direction
// is flipped, once; the other direction is untouched.
func TestCorrupt(t *testing.T) {
	for _, d := range []Dir{Forward, Backward} {
		t.Run(d.String(), func(t *testing.T) {
			pr := newPair(t, "unix", Options{})
			from, to := pr.client, pr.server
			other, otherTo := pr.server, pr.client
			if d == Backward {
				from, to, other, otherTo = other, otherTo, from, to
			}
			pr.p.Corrupt(d)
			write(t, other, []byte("abcdef"))
			if got := readN(t, otherTo, 6); string(got) != "abcdef" {
				t.Fatalf("the other direction was changed: %q", got)
			}
			write(t, from, []byte("abcdef"))
			if got := readN(t, to, 6); string(got) != "\x9ebcdef" {
				t.Fatalf("corrupted chunk = %q, want the first byte flipped", got)
			}
			write(t, from, []byte("abcdef"))
			if got := readN(t, to, 6); string(got) != "abcdef" {
				t.Fatalf("the chunk after = %q, want it intact (Corrupt acts once)", got)
			}
		})
	}
}

// chunkLog records the proxy's writes in one direction (onChunk; dir's
// zero value is Forward).
// The server can read a write's bytes before the pump records it, so the
// test waits for the record, not for the bytes.
type chunkLog struct {
	dir                    Dir
	mu                     sync.Mutex
	largest, chunks, total int
	changed                chan struct{} // closed and replaced on every write
}

func (l *chunkLog) add(d Dir, n int) {
	if d != l.dir {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.largest, l.chunks, l.total = max(l.largest, n), l.chunks+1, l.total+n
	close(l.changed)
	l.changed = make(chan struct{})
}

// wait returns the largest write and the number of writes once total
// bytes were recorded, and resets the largest.
func (l *chunkLog) wait(t *testing.T, total int) (largest, chunks int) {
	t.Helper()
	timer := time.NewTimer(guard)
	defer timer.Stop()
	for {
		l.mu.Lock()
		if l.total >= total {
			largest, chunks = l.largest, l.chunks
			l.largest = 0
			l.mu.Unlock()
			return largest, chunks
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			t.Fatalf("the proxy recorded fewer than %d bytes written", total)
		}
	}
}

// TestTrickle: no write larger than N while trickling, all bytes intact;
// after Heal chunks are large again.
func TestTrickle(t *testing.T) {
	pr := newPair(t, "tcp", Options{})
	log := &chunkLog{changed: make(chan struct{})}
	pr.p.onChunk = log.add
	pr.p.Trickle(3, time.Millisecond)
	msg := random(t, 100)
	write(t, pr.client, msg)
	if got := readN(t, pr.server, len(msg)); !bytes.Equal(got, msg) {
		t.Fatal("trickled bytes differ")
	}
	if largest, chunks := log.wait(t, len(msg)); largest > 3 || chunks < 34 {
		t.Fatalf("trickle 3: largest write %d over %d writes; want at most 3 bytes each", largest, chunks)
	}
	pr.p.Heal()
	big := random(t, 256<<10)
	go pr.client.Write(big)
	if got := readN(t, pr.server, len(big)); !bytes.Equal(got, big) {
		t.Fatal("bytes after Heal differ")
	}
	if largest, _ := log.wait(t, len(msg)+len(big)); largest <= 3 {
		t.Fatalf("after Heal the largest write was %d bytes: still trickling", largest)
	}
}

// TestCloseWakesTrickle: a direction waiting out a long trickle interval
// is woken by Close.
func TestCloseWakesTrickle(t *testing.T) {
	pr := newPair(t, "tcp", Options{})
	first := make(chan struct{}, 1)
	pr.p.onChunk = func(Dir, int) {
		select {
		case first <- struct{}{}:
		default:
		}
	}
	pr.p.Trickle(1, time.Hour)
	write(t, pr.client, []byte("0123456789"))
	select {
	case <-first:
	case <-time.After(guard):
		t.Fatal("nothing forwarded")
	}
	closeWithin(t, pr.p)
}

// TestCloseWakesStall: a stalled direction is woken by Close, and both
// ends see their stream end.
func TestCloseWakesStall(t *testing.T) {
	pr := newPair(t, "unix", Options{})
	holding := make(chan Dir, 4)
	pr.p.onHold = func(d Dir) { holding <- d }
	pr.p.Stall()
	write(t, pr.client, []byte("held"))
	select {
	case <-holding:
	case <-time.After(guard):
		t.Fatal("not held")
	}
	closeWithin(t, pr.p)
	ended(t, pr.client, "client after Close")
	ended(t, pr.server, "server after Close")
}

func closeWithin(t *testing.T, p *Proxy) {
	t.Helper()
	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(guard):
		// The test's cleanup would wait for the same goroutines: end here.
		panic("Close did not return: a wait in the proxy is not reachable by Close")
	}
}

// TestResetOneWay: the reset direction's receiver sees EOF and the
// sender's later bytes vanish without error, while the other direction
// keeps flowing.
func TestResetOneWay(t *testing.T) {
	for _, d := range []Dir{Forward, Backward} {
		t.Run(d.String(), func(t *testing.T) {
			pr := newPair(t, "tcp", Options{})
			from, to := pr.client, pr.server
			if d == Backward {
				from, to = to, from
			}
			log := &chunkLog{dir: d, changed: make(chan struct{})}
			pr.p.onChunk = log.add
			write(t, from, []byte("before"))
			readN(t, to, 6)
			// The receiver can read the bytes before the proxy counted
			// them (its write returned, its Add not yet run).
			log.wait(t, 6)
			pr.p.ResetOneWay(d)
			ended(t, to, "the receiver of the reset direction")
			write(t, from, []byte("lost"))
			for i := range 3 { // the other way still flows, more than once
				write(t, to, []byte("back"))
				if got := readN(t, from, 4); string(got) != "back" {
					t.Fatalf("round %d of the other direction: %q", i, got)
				}
			}
			if got := pr.p.Forwarded(d); got != 6 {
				t.Fatalf("Forwarded(%s) = %d, want 6: bytes after the reset were forwarded", d, got)
			}
		})
	}
}

// TestIOTimeout: a peer that does not read is cut after IOTimeout, so a
// blocked write of the proxy is bounded even without Close.
func TestIOTimeout(t *testing.T) {
	pr := newPair(t, "unix", Options{IOTimeout: 50 * time.Millisecond})
	errc := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			_ = pr.client.SetWriteDeadline(time.Now().Add(guard))
			if _, err := pr.client.Write(buf); err != nil {
				errc <- err
				return
			}
		}
	}()
	select {
	case err := <-errc:
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the client's write hung for %v: the proxy never cut the non-reading peer", guard)
		}
	case <-time.After(2 * guard):
		t.Fatal("the client's write never ended")
	}
	drained(t, pr.server, "the peer that did not read")
}

// drained reads c until its stream ends, within the guard.
func drained(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(guard))
	if _, err := io.Copy(io.Discard, c); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: the stream did not end", what)
	}
}

// TestDialBounded: an upstream that never answers is given up after
// DialTimeout (the accepted connection is closed), and Close ends a dial in
// flight.
func TestDialBounded(t *testing.T) {
	hang := func(ctx context.Context) (net.Conn, error) { <-ctx.Done(); return nil, ctx.Err() }
	p, err := Listen("tcp", "127.0.0.1:0", hang, Options{DialTimeout: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ended(t, c, "a connection whose upstream never answered")
	c.Close()
	p.Close()

	p, err = Listen("tcp", "127.0.0.1:0", hang, Options{DialTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	c, err = net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	closeWithin(t, p)
	ended(t, c, "a connection whose dial Close ended")
}

// TestLinkSocketpairs: pairs handed over (as descriptors passed with
// SCM_RIGHTS are) forward and take faults like accepted ones.
func TestLinkSocketpairs(t *testing.T) {
	pairConn := func() (net.Conn, net.Conn) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		var cs [2]net.Conn
		for i, fd := range fds {
			f := os.NewFile(uintptr(fd), "socketpair")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			cs[i] = c
			t.Cleanup(func() { c.Close() })
		}
		return cs[0], cs[1]
	}
	src, srcEnd := pairConn()
	dst, dstEnd := pairConn()
	p := New(Options{})
	defer p.Close()
	p.Link(srcEnd, dstEnd)
	write(t, src, []byte("page"))
	if got := readN(t, dst, 4); string(got) != "page" {
		t.Fatalf("forward: %q", got)
	}
	p.ResetOneWay(Backward)
	ended(t, src, "the source after the backward reset")
	write(t, src, []byte("more"))
	if got := readN(t, dst, 4); string(got) != "more" {
		t.Fatalf("forward after the backward reset: %q", got)
	}
	p.Cut()
	ended(t, dst, "the destination after Cut")
	if n := p.Links(); n != 0 {
		t.Fatalf("Links after Cut = %d", n)
	}
}

// TestWaitLinked: WaitLinked returns once a link exists — not when the
// client's connect was merely accepted (its upstream still dialling) — and
// keeps counting links that ended; Close wakes a waiter.
func TestWaitLinked(t *testing.T) {
	u := newUpstream(t, "tcp")
	gate := make(chan struct{})
	dialer := func(ctx context.Context) (net.Conn, error) {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", u.ln.Addr().String())
	}
	p, err := Listen("tcp", "127.0.0.1:0", dialer, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	done, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.WaitLinked(done, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitLinked before the upstream was dialled = %v, want context.Canceled", err)
	}
	close(gate)
	ctx, stop := context.WithTimeout(context.Background(), guard)
	defer stop()
	if err := p.WaitLinked(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if n := p.Links(); n != 1 {
		t.Fatalf("WaitLinked returned with %d links open, want 1", n)
	}
	u.next(t)
	p.Cut()
	if err := p.WaitLinked(done, 1); err != nil {
		t.Fatalf("WaitLinked after the link was cut = %v: a link that ended still counts", err)
	}

	errc := make(chan error, 1)
	go func() { errc <- p.WaitLinked(context.Background(), 2) }()
	closeWithin(t, p)
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("WaitLinked after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(guard):
		t.Fatal("Close did not wake WaitLinked")
	}
}
