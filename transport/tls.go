package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/creds"
)

// TLS channels. When a side's tls-creds parameter names credentials
// (package creds turns them into a *tls.Config), every channel of its
// migration is wrapped: the source calls ClientTLS on each channel it
// dials, the destination ServerTLS on each one it accepts, after reading
// its first bytes to tell a TLS ClientHello from a plaintext stream
// (creds.KindOf). The Conn they return carries the channel's bytes inside
// the TLS 1.3 connection and is still a Conn: Read, Write, CloseWrite,
// SetDeadline, ReturnPath and Addr keep their meaning, and the return path
// is the same TLS connection read the other way.
//
// What changes, and why:
//
//   - CloseWrite sends TLS's close_notify, then half-closes the socket. The
//     peer's Read returns io.EOF only after a close_notify: a connection
//     that ends without one (cut by the network, or by an attacker at a
//     record boundary) is ErrTruncated, not a clean end.
//   - Close closes the socket at once, without close_notify: Close never
//     waits for a peer (crypto/tls's own Close would wait up to 5 s to send
//     it).
//   - crypto/tls cannot write on a connection after one of its writes
//     failed, a timed-out write included: the record sequence is broken
//     (the record was sealed with the next sequence number whether or not
//     it reached the wire). A deadline in the past (how the engine and the
//     loader interrupt a cancelled or stalled migration before they write
//     their farewell ABORT or failure reason with a fresh deadline) ends
//     a blocked Read or Write at once, and a Write that starts after it
//     fails before it touches the TLS state, until a new deadline is set:
//     the farewell still goes out. A Write that was in progress when the
//     deadline passed breaks the connection for writing: every later Write
//     and CloseWrite returns an error wrapping ErrTLSBroken, and the peer
//     learns of the end only from the closed connection (ErrTruncated).
//   - No zero-copy: bytes are sealed in user space (the Conn does not
//     implement io.ReaderFrom or io.WriterTo), and RegularFile and the
//     one-way Committer never apply (TLS needs a two-way socket).

// ErrTruncated is wrapped by the error a TLS Conn's Read returns when the
// peer's socket ended without TLS's close_notify: what it sent may have
// been cut short. It wraps io.ErrUnexpectedEOF.
var ErrTruncated = fmt.Errorf("the peer's TLS connection ended without close_notify (the end of its TLS session), so what it sent may have been cut short: %w", io.ErrUnexpectedEOF)

// ErrTLSBroken is wrapped by the errors of a TLS Conn's Write and
// CloseWrite after one of its writes failed (a deadline passed while it
// wrote, or the socket broke): crypto/tls cannot write on that connection
// again.
var ErrTLSBroken = errors.New("an earlier write on this TLS connection failed, and crypto/tls cannot write on it again")

// ErrNotTwoWay is wrapped by ClientTLS and ServerTLS for a channel that
// does not carry bytes both ways (file:, exec:, a pipe or file fd:): a TLS
// handshake needs the peer's answers.
var ErrNotTwoWay = errors.New("TLS needs a channel that carries bytes both ways (tcp:, unix: or an fd: socket)")

// ClientTLS runs the client (source) side of a TLS handshake over c,
// bounded by ctx (a cancel or its deadline closes c), and returns the
// channel wrapped in the TLS connection. Errors are classified by
// creds.Classify (a *creds.CertificateError when this side refused the
// destination's certificate, a *creds.MismatchError when the peer hung up
// on the ClientHello: it does not use TLS). On error the caller still owns
// c and closes it.
//
// With TLS 1.3 the client finishes its handshake before the server has
// checked the client's certificate: a refusal of this side (unknown CA,
// expired, tls-authz) reaches it as a *creds.PeerRejectedError from a
// later Read.
func ClientTLS(ctx context.Context, c Conn, cfg *tls.Config) (Conn, error) {
	lo, err := newLower(c, nil)
	if err != nil {
		return nil, err
	}
	tc, err := creds.ClientHandshake(ctx, lo, cfg)
	if err != nil {
		return nil, err
	}
	return &tlsConn{tc: tc, under: c, lo: lo}, nil
}

// ServerTLS runs the server (destination) side of a TLS handshake over c,
// bounded by ctx, and returns the channel wrapped in the TLS connection.
// head holds the bytes the caller already read from c to tell TLS from
// plaintext (the start of the ClientHello); they are replayed first.
// Errors are classified by creds.Classify (a *creds.CertificateError or
// *creds.AuthzError when this side refused the source's certificate).
// On error the caller still owns c and closes it.
func ServerTLS(ctx context.Context, c Conn, head []byte, cfg *tls.Config) (Conn, error) {
	lo, err := newLower(c, head)
	if err != nil {
		return nil, err
	}
	tc, err := creds.ServerHandshake(ctx, lo, cfg)
	if err != nil {
		return nil, err
	}
	return &tlsConn{tc: tc, under: c, lo: lo}, nil
}

// TLSState returns the TLS connection state of a channel ClientTLS or
// ServerTLS returned, and false for any other Conn.
func TLSState(c Conn) (tls.ConnectionState, bool) {
	if t, ok := c.(*tlsConn); ok {
		return t.tc.ConnectionState(), true
	}
	return tls.ConnectionState{}, false
}

// rwDeadliner is what crypto/tls needs of the socket under it besides Read
// and Write: separate read and write deadlines.
type rwDeadliner interface {
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// lower is the net.Conn crypto/tls runs over: the channel's Read (after
// the replayed head), Write and Close, and the deadlines of the socket
// under it (a *net.TCPConn, *net.UnixConn or socket *os.File).
type lower struct {
	c    Conn
	head []byte // bytes read before the handshake, replayed first (handshake goroutine only)
	dl   rwDeadliner
	eof  atomic.Bool // the socket reached EOF under the TLS records
}

func newLower(c Conn, head []byte) (*lower, error) {
	if !c.ReturnPath() {
		return nil, fmt.Errorf("%s: %w", c.Addr(), ErrNotTwoWay)
	}
	var dl rwDeadliner
	if d, ok := c.(rwDeadliner); ok {
		dl = d
	} else if u, ok := c.(interface{ Unwrap() any }); ok {
		dl, _ = u.Unwrap().(rwDeadliner)
	}
	if dl == nil {
		return nil, fmt.Errorf("%s: %w: the channel has no socket deadlines", c.Addr(), ErrNotTwoWay)
	}
	return &lower{c: c, head: head, dl: dl}, nil
}

func (l *lower) Read(p []byte) (int, error) {
	if len(l.head) > 0 {
		n := copy(p, l.head)
		l.head = l.head[n:]
		return n, nil
	}
	n, err := l.c.Read(p)
	if err == io.EOF {
		l.eof.Store(true)
	}
	return n, err
}

func (l *lower) Write(p []byte) (int, error)        { return l.c.Write(p) }
func (l *lower) Close() error                       { return l.c.Close() }
func (l *lower) SetReadDeadline(t time.Time) error  { return l.dl.SetReadDeadline(t) }
func (l *lower) SetWriteDeadline(t time.Time) error { return l.dl.SetWriteDeadline(t) }

func (l *lower) SetDeadline(t time.Time) error {
	return errors.Join(l.dl.SetReadDeadline(t), l.dl.SetWriteDeadline(t))
}

func (l *lower) LocalAddr() net.Addr {
	if nc, ok := l.dl.(net.Conn); ok {
		return nc.LocalAddr()
	}
	return migrationAddr(l.c.Addr().String())
}

func (l *lower) RemoteAddr() net.Addr {
	if nc, ok := l.dl.(net.Conn); ok {
		return nc.RemoteAddr()
	}
	return migrationAddr(l.c.Addr().String())
}

// migrationAddr names a channel that has no socket address of its own (a
// socket fd of a family Go does not wrap).
type migrationAddr string

func (a migrationAddr) Network() string { return "migration" }
func (a migrationAddr) String() string  { return string(a) }

// tlsConn is a channel inside a TLS connection (see the comment at the top
// of this file for how it differs from a plaintext Conn).
type tlsConn struct {
	tc    *tls.Conn
	under Conn
	lo    *lower

	// mu guards the write side's state: whether the deadline has passed
	// for Writes not yet started, and the error that broke the connection
	// for writing.
	mu      sync.Mutex
	expired bool
	broken  error
}

func (c *tlsConn) Read(p []byte) (int, error) {
	n, err := c.tc.Read(p)
	switch {
	case err == nil:
		return n, nil
	case err == io.EOF && c.lo.eof.Load():
		return n, ErrTruncated
	case err == io.EOF:
		return n, io.EOF // after the peer's close_notify: a clean end
	}
	return n, creds.Classify(err)
}

// beginWrite says why a write may not start, if so.
func (c *tlsConn) beginWrite(op string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return c.broken
	}
	if c.expired {
		return &net.OpError{Op: op, Net: "tls", Addr: migrationAddr(c.under.Addr().String()), Err: os.ErrDeadlineExceeded}
	}
	return nil
}

// endWrite records a failed write: it broke the connection for writing.
func (c *tlsConn) endWrite(err error) {
	if err == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken == nil {
		c.broken = fmt.Errorf("%w (it failed with: %v)", ErrTLSBroken, err)
	}
}

func (c *tlsConn) Write(p []byte) (int, error) {
	if err := c.beginWrite("write"); err != nil {
		return 0, err
	}
	n, err := c.tc.Write(p)
	c.endWrite(err)
	if err != nil {
		return n, creds.Classify(err)
	}
	return n, nil
}

// CloseWrite sends close_notify (bounded by crypto/tls's own 5 s write
// deadline) and half-closes the socket.
func (c *tlsConn) CloseWrite() error {
	if err := c.beginWrite("close_notify"); err != nil {
		return err
	}
	err := c.tc.CloseWrite()
	c.endWrite(err)
	if err != nil {
		return creds.Classify(err)
	}
	return c.under.CloseWrite()
}

// SetDeadline sets the read and write deadline. A deadline in the past
// ends a blocked Read or Write at once (an interrupted Write breaks the
// connection for writing); Writes that start later fail before they
// touch the TLS state, until the next SetDeadline.
func (c *tlsConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expired = !t.IsZero() && !t.After(time.Now())
	return errors.Join(c.tc.SetReadDeadline(t), c.tc.SetWriteDeadline(t))
}

// Close closes the socket at once, without close_notify.
func (c *tlsConn) Close() error { return c.under.Close() }

func (c *tlsConn) ReturnPath() bool { return true }
func (c *tlsConn) Addr() Addr       { return c.under.Addr() }

// Unwrap returns the *tls.Conn.
func (c *tlsConn) Unwrap() any { return c.tc }
