// Package soft is a software RDMA provider in pure Go: RDMA's semantics
// (registered memory, remote keys, one-sided WRITE into the peer's memory,
// SEND/RECV, ordered completions, RC error behaviour) carried over one TCP
// connection between two processes — soft-RoCE in user space.
//
// The wire between two soft endpoints (not QEMU's: QEMU's control messages
// travel inside SEND payloads, above this layer) is a handshake
//
//	magic "MGSR", u8 kind (1 request, 2 accept, 3 reject), u8 0, be16 len, data[len ≤ 1024]
//
// then frames with a 32-byte header
//
//	u8 op (1 SEND, 2 WRITE, 3 ACK, 4 NAK), u8 status (NAK), be16 0, be32 len,
//	be64 seq, be32 rkey, be32 0, be64 remote address
//
// followed by len payload bytes (SEND, WRITE: the data; NAK: the reason).
// Every SEND and WRITE carries the next sequence number; the receiver answers
// with cumulative ACKs, coalesced, sent only after the data was placed, so a
// WRITE completes at the writer once it is in the target's memory. A WRITE is
// validated against the target's registrations (key, range, access) before
// one byte is placed; a refused WRITE is answered with a NAK and both queue
// pairs go to the error state, each reporting a *verbs.AccessError.
//
// Efficiency: the sender gathers headers and payloads of queued work
// requests into one writev (net.Buffers) straight from registered memory;
// the receiver reads each header through a 256 KiB buffer and the payload of
// a large WRITE straight into the target region (read(2) into guest memory:
// one copy, in the kernel, as TCP always needs). The data is applied by the
// provider's own goroutine, concurrently with whatever the application does.
//
// Orderly close is a TCP FIN at a frame boundary (the peer's QP goes to
// error with verbs.ErrDisconnected); anything else (reset, EOF inside a
// frame) is verbs.ErrConnLost.
package soft

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
	"unsafe"

	"github.com/migctl/migctl/rdma/verbs"
)

// Name is this provider's registry name.
const Name = "soft"

const (
	magic         = "MGSR"
	kindRequest   = 1
	kindAccept    = 2
	kindReject    = 3
	maxHandshake  = 1024
	headerSize    = 32
	opSend        = 1
	opWrite       = 2
	opAck         = 3
	opNak         = 4
	maxNakReason  = 1024
	readBufSize   = 256 << 10
	maxBatchWRs   = 64
	maxBatchBytes = 8 << 20
	ackEvery      = 32
	// closeGrace bounds how long Close waits for in-flight bytes and the
	// peer's FIN before dropping the socket.
	closeGrace = 2 * time.Second
	// handshakeTimeout bounds a handshake whose context has no deadline.
	handshakeTimeout = 30 * time.Second
)

// Options configure the provider.
type Options struct {
	// WrapConn, if set, wraps every TCP connection after it is made (tests
	// use it to cut a connection after a number of bytes).
	WrapConn func(net.Conn) net.Conn
}

// Provider is the software provider. The zero value is not usable: use New.
type Provider struct {
	opts Options
}

// New returns a software provider.
func New(opts Options) *Provider { return &Provider{opts: opts} }

// Name returns "soft".
func (p *Provider) Name() string { return Name }

// Probe always finds the software device.
func (p *Provider) Probe(context.Context) (verbs.Device, error) {
	return verbs.Device{Name: "soft-tcp", Probe: "software provider: RDMA semantics over TCP, no device needed"}, nil
}

func (p *Provider) wrap(c net.Conn) net.Conn {
	if p.opts.WrapConn != nil {
		return p.opts.WrapConn(c)
	}
	return c
}

func fixCfg(cfg verbs.Config) verbs.Config {
	if cfg.SendDepth <= 0 {
		cfg.SendDepth = 128
	}
	if cfg.RecvDepth <= 0 {
		cfg.RecvDepth = 128
	}
	return cfg
}

// Listen binds a TCP listener on addr ("host:port", "[v6]:port").
func (p *Provider) Listen(ctx context.Context, addr string, cfg verbs.Config) (verbs.Listener, error) {
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("rdma soft: listen %s: %w", addr, err)
	}
	return &listener{p: p, l: l.(*net.TCPListener), cfg: fixCfg(cfg)}, nil
}

// Resolve makes the TCP connection to addr (the soft provider's address and
// route resolution); the returned Conn is connected by Connect.
func (p *Provider) Resolve(ctx context.Context, addr string, cfg verbs.Config) (verbs.Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("rdma soft: resolve %s: %w", addr, err)
	}
	return newConn(p.wrap(nc), fixCfg(cfg), false), nil
}

type listener struct {
	p   *Provider
	l   *net.TCPListener
	cfg verbs.Config
}

func (l *listener) Addr() net.Addr { return l.l.Addr() }
func (l *listener) Close() error   { return l.l.Close() }

// Next accepts a TCP connection and reads its connection request. A
// connection that does not speak the handshake is dropped and Next goes on
// waiting.
func (l *listener) Next(ctx context.Context) (verbs.Conn, error) {
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		_ = l.l.SetDeadline(time.Time{})
		stop := context.AfterFunc(ctx, func() { _ = l.l.SetDeadline(time.Unix(1, 0)) })
		nc, err := l.l.Accept()
		stop()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue // a stale cancel from an earlier call
			}
			return nil, fmt.Errorf("rdma soft: accept: %w", err)
		}
		c := newConn(l.p.wrap(nc), l.cfg, true)
		kind, data, err := c.readHandshake(ctx)
		if err != nil || kind != kindRequest || len(data) > verbs.MaxPrivateData {
			_ = nc.Close()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			continue
		}
		c.peerData = data
		return c, nil
	}
}

type state uint8

const (
	stateInit state = iota
	stateRTS
	stateError
)

type mr struct {
	c      *conn
	key    uint32
	buf    []byte
	addr   uint64
	access verbs.Access
}

func (m *mr) LKey() uint32 { return m.key }
func (m *mr) RKey() uint32 { return m.key }
func (m *mr) Addr() uint64 { return m.addr }
func (m *mr) Len() uint64  { return uint64(len(m.buf)) }
func (m *mr) Deregister() error {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	if m.c.mrs[m.key] != m {
		return fmt.Errorf("rdma soft: memory region %#x is not registered", m.key)
	}
	delete(m.c.mrs, m.key)
	return nil
}

type outWR struct {
	wr      verbs.SendWR
	payload []byte
	seq     uint64
}

type inWR struct {
	wr  verbs.RecvWR
	buf []byte
}

// conn is one soft connection: PD, QP and CQ in one. mu guards every field
// below it; the reader goroutine owns br and the sender goroutine owns the
// write side of nc.
type conn struct {
	nc      net.Conn
	br      *bufio.Reader
	cfg     verbs.Config
	passive bool
	cq      *cq

	mu       sync.Mutex
	st       state
	err      error
	mrs      map[uint32]*mr
	nextKey  uint32
	sendQ    []outWR // posted, not yet written
	unacked  []outWR // written, waiting for the peer's ACK
	recvQ    []inWR
	curRecv  *inWR // the receive a SEND is being read into, off recvQ
	nextSeq  uint64
	ackOut   uint64 // highest sequence placed here, to acknowledge
	ackSent  uint64
	nak      []byte // a NAK frame to send before shutting down
	peerData []byte
	started  bool

	wake     chan struct{} // wakes the sender (cap 1)
	wg       sync.WaitGroup
	closeMu  sync.Mutex
	closed   bool
	writeErr bool // sender: a write failed, the byte stream is broken
}

func newConn(nc net.Conn, cfg verbs.Config, passive bool) *conn {
	return &conn{
		nc:      nc,
		br:      bufio.NewReaderSize(nc, readBufSize),
		cfg:     cfg,
		passive: passive,
		cq:      &cq{notify: make(chan struct{}, 1)},
		mrs:     make(map[uint32]*mr),
		nextKey: 0x100,
		wake:    make(chan struct{}, 1),
	}
}

func (c *conn) PD() verbs.PD         { return (*pd)(c) }
func (c *conn) QP() verbs.QP         { return (*qp)(c) }
func (c *conn) CQ() verbs.CQ         { return c.cq }
func (c *conn) LocalAddr() net.Addr  { return c.nc.LocalAddr() }
func (c *conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }
func (c *conn) PeerData() []byte     { return c.peerData }
func (c *conn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}
func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) }
func deadlineOf(ctx context.Context) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return time.Now().Add(handshakeTimeout)
}

// withCtx bounds an I/O call on nc by ctx's deadline and cancellation.
func (c *conn) withCtx(ctx context.Context, f func() error) error {
	_ = c.nc.SetDeadline(deadlineOf(ctx))
	stop := context.AfterFunc(ctx, func() { _ = c.nc.SetDeadline(time.Unix(1, 0)) })
	err := f()
	stop()
	_ = c.nc.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

func (c *conn) writeHandshake(ctx context.Context, kind byte, data []byte) error {
	if len(data) > maxHandshake {
		data = data[:maxHandshake]
	}
	b := make([]byte, 0, 8+len(data))
	b = append(b, magic...)
	b = append(b, kind, 0)
	b = binary.BigEndian.AppendUint16(b, uint16(len(data)))
	b = append(b, data...)
	return c.withCtx(ctx, func() error { _, err := c.nc.Write(b); return err })
}

func (c *conn) readHandshake(ctx context.Context) (kind byte, data []byte, err error) {
	err = c.withCtx(ctx, func() error {
		var h [8]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		if string(h[:4]) != magic {
			return fmt.Errorf("rdma soft: peer is not a soft RDMA endpoint (magic %q)", h[:4])
		}
		n := binary.BigEndian.Uint16(h[6:])
		if n > maxHandshake {
			return fmt.Errorf("rdma soft: handshake of %d bytes exceeds %d", n, maxHandshake)
		}
		kind, data = h[4], make([]byte, n)
		_, err := io.ReadFull(c.br, data)
		return err
	})
	return kind, data, err
}

// Connect sends the connection request and waits for the answer.
func (c *conn) Connect(ctx context.Context, private []byte) ([]byte, error) {
	if c.passive {
		return nil, errors.New("rdma soft: Connect on a passive connection")
	}
	if len(private) > verbs.MaxPrivateData {
		return nil, fmt.Errorf("rdma soft: %d bytes of private data, at most %d", len(private), verbs.MaxPrivateData)
	}
	if err := c.writeHandshake(ctx, kindRequest, private); err != nil {
		return nil, fmt.Errorf("rdma soft: connect %s: %w", c.nc.RemoteAddr(), err)
	}
	kind, data, err := c.readHandshake(ctx)
	if err != nil {
		return nil, fmt.Errorf("rdma soft: connect %s: waiting for the answer: %w", c.nc.RemoteAddr(), err)
	}
	switch kind {
	case kindAccept:
		c.start()
		return data, nil
	case kindReject:
		return nil, &verbs.RejectedError{Reason: string(data)}
	}
	return nil, fmt.Errorf("rdma soft: connect %s: unknown answer kind %d", c.nc.RemoteAddr(), kind)
}

// Accept answers the request and starts the connection.
func (c *conn) Accept(ctx context.Context, private []byte) error {
	if !c.passive {
		return errors.New("rdma soft: Accept on an active connection")
	}
	if len(private) > verbs.MaxPrivateData {
		return fmt.Errorf("rdma soft: %d bytes of private data, at most %d", len(private), verbs.MaxPrivateData)
	}
	if err := c.writeHandshake(ctx, kindAccept, private); err != nil {
		return fmt.Errorf("rdma soft: accept %s: %w", c.nc.RemoteAddr(), err)
	}
	c.start()
	return nil
}

// Reject refuses the request with reason and closes the connection.
func (c *conn) Reject(ctx context.Context, reason string) error {
	err := c.writeHandshake(ctx, kindReject, []byte(reason))
	_ = c.Close()
	return err
}

func (c *conn) start() {
	c.mu.Lock()
	c.st, c.started = stateRTS, true
	c.mu.Unlock()
	c.wg.Add(2)
	go c.reader()
	go c.sender()
}

// Close shuts the connection down in order: the sender half-closes after
// what it was writing (bounded by closeGrace), the reader drains until the
// peer's FIN (bounded too), then the socket is closed.
func (c *conn) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	c.fail(errors.New("rdma soft: connection closed locally"), nil)
	c.mu.Lock()
	started := c.started
	c.mu.Unlock()
	if started {
		_ = c.nc.SetDeadline(time.Now().Add(closeGrace))
		c.signal()
		c.wg.Wait()
	}
	return c.nc.Close()
}

// fail moves the QP to the error state (once): every outstanding work
// request completes with StatusFlushed carrying err, and the CQ is marked
// dead. nak, if set, is sent to the peer before the sender half-closes.
// Callers must not hold mu.
func (c *conn) fail(err error, nak []byte) {
	c.mu.Lock()
	c.failLocked(err, nak)
	c.mu.Unlock()
	c.signal()
}

func (c *conn) failLocked(err error, nak []byte) {
	if c.st == stateError {
		return
	}
	c.st, c.err, c.nak = stateError, err, nak
	var wcs []verbs.Completion
	for _, o := range c.unacked {
		wcs = append(wcs, verbs.Completion{ID: o.wr.ID, Op: o.wr.Op, Status: verbs.StatusFlushed, Err: err})
	}
	for _, o := range c.sendQ {
		wcs = append(wcs, verbs.Completion{ID: o.wr.ID, Op: o.wr.Op, Status: verbs.StatusFlushed, Err: err})
	}
	if c.curRecv != nil {
		wcs = append(wcs, verbs.Completion{ID: c.curRecv.wr.ID, Op: verbs.OpRecv, Status: verbs.StatusFlushed, Err: err})
		c.curRecv = nil
	}
	for _, r := range c.recvQ {
		wcs = append(wcs, verbs.Completion{ID: r.wr.ID, Op: verbs.OpRecv, Status: verbs.StatusFlushed, Err: err})
	}
	c.unacked, c.sendQ, c.recvQ = nil, nil, nil
	c.cq.push(wcs, true)
}

// localSlice resolves a local SGE against this PD's registrations.
func (c *conn) localSlice(s verbs.SGE, need verbs.Access) ([]byte, error) {
	m := c.mrs[s.LKey]
	if m == nil {
		return nil, fmt.Errorf("%w: unknown local key %#x", verbs.ErrLocalProtection, s.LKey)
	}
	if s.Addr < m.addr || s.Addr-m.addr > uint64(len(m.buf)) || uint64(s.Length) > uint64(len(m.buf))-(s.Addr-m.addr) {
		return nil, fmt.Errorf("%w: %d bytes at %#x outside region [%#x, %#x)", verbs.ErrLocalProtection, s.Length, s.Addr, m.addr, m.addr+uint64(len(m.buf)))
	}
	if m.access&need != need {
		return nil, fmt.Errorf("%w: region %#x lacks local write access", verbs.ErrLocalProtection, s.LKey)
	}
	off := s.Addr - m.addr
	return m.buf[off : off+uint64(s.Length) : off+uint64(s.Length)], nil
}

type pd conn

// Register records buf under a new key (keys are never reused, so a stale
// key is refused).
func (p *pd) Register(buf []byte, access verbs.Access) (verbs.MR, error) {
	c := (*conn)(p)
	if len(buf) == 0 {
		return nil, errors.New("rdma soft: register: empty buffer")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	m := &mr{c: c, key: c.nextKey, buf: buf, addr: addrOf(buf), access: access}
	c.nextKey++
	c.mrs[m.key] = m
	return m, nil
}

type qp conn

func (q *qp) Err() error {
	c := (*conn)(q)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (q *qp) PostSend(wr verbs.SendWR) error {
	c := (*conn)(q)
	if wr.Op != verbs.OpSend && wr.Op != verbs.OpWrite {
		return fmt.Errorf("rdma soft: PostSend with opcode %v", wr.Op)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.st {
	case stateInit:
		return verbs.ErrNotConnected
	case stateError:
		c.cq.push([]verbs.Completion{{ID: wr.ID, Op: wr.Op, Status: verbs.StatusFlushed, Err: c.err}}, false)
		return nil
	}
	if len(c.sendQ)+len(c.unacked) >= c.cfg.SendDepth {
		return verbs.ErrQueueFull
	}
	payload, err := c.localSlice(wr.Local, 0)
	if err != nil {
		c.cq.push([]verbs.Completion{{ID: wr.ID, Op: wr.Op, Status: verbs.StatusLocalProt, Err: err}}, false)
		c.failLocked(err, nil)
		c.signal()
		return nil
	}
	c.sendQ = append(c.sendQ, outWR{wr: wr, payload: payload})
	c.signal()
	return nil
}

func (q *qp) PostRecv(wr verbs.RecvWR) error {
	c := (*conn)(q)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.st == stateError {
		c.cq.push([]verbs.Completion{{ID: wr.ID, Op: verbs.OpRecv, Status: verbs.StatusFlushed, Err: c.err}}, false)
		return nil
	}
	if len(c.recvQ) >= c.cfg.RecvDepth {
		return verbs.ErrQueueFull
	}
	buf, err := c.localSlice(wr.Local, verbs.AccessLocalWrite)
	if err != nil {
		c.cq.push([]verbs.Completion{{ID: wr.ID, Op: verbs.OpRecv, Status: verbs.StatusLocalProt, Err: err}}, false)
		c.failLocked(err, nil)
		return nil
	}
	c.recvQ = append(c.recvQ, inWR{wr: wr, buf: buf})
	return nil
}

func putHeader(h []byte, op, status byte, n uint32, seq uint64, rkey uint32, addr uint64) {
	h[0], h[1], h[2], h[3] = op, status, 0, 0
	binary.BigEndian.PutUint32(h[4:], n)
	binary.BigEndian.PutUint64(h[8:], seq)
	binary.BigEndian.PutUint32(h[16:], rkey)
	binary.BigEndian.PutUint32(h[20:], 0)
	binary.BigEndian.PutUint64(h[24:], addr)
}

// sender writes queued work requests and acknowledgements, gathering many
// into one writev. It exits after the QP entered the error state, having sent
// a pending NAK and half-closed the connection.
func (c *conn) sender() {
	defer c.wg.Done()
	hdrs := make([]byte, headerSize*(maxBatchWRs+2))
	bufs := make(net.Buffers, 0, 2*maxBatchWRs+4)
	for {
		c.mu.Lock()
		for c.st == stateRTS && len(c.sendQ) == 0 && c.ackOut == c.ackSent {
			c.mu.Unlock()
			<-c.wake
			c.mu.Lock()
		}
		bufs = bufs[:0]
		h := hdrs
		if c.ackOut > c.ackSent {
			putHeader(h, opAck, 0, 0, c.ackOut, 0, 0)
			bufs = append(bufs, h[:headerSize])
			h = h[headerSize:]
			c.ackSent = c.ackOut
		}
		done := c.st == stateError
		if done {
			if c.nak != nil {
				bufs = append(bufs, c.nak)
				c.nak = nil
			}
		} else {
			var n, bytes int
			for n < len(c.sendQ) && n < maxBatchWRs && bytes < maxBatchBytes {
				o := &c.sendQ[n]
				c.nextSeq++
				o.seq = c.nextSeq
				op := byte(opSend)
				if o.wr.Op == verbs.OpWrite {
					op = opWrite
				}
				putHeader(h, op, 0, uint32(len(o.payload)), o.seq, o.wr.RKey, o.wr.RemoteAddr)
				bufs = append(bufs, h[:headerSize])
				if len(o.payload) > 0 {
					bufs = append(bufs, o.payload)
				}
				h = h[headerSize:]
				bytes += len(o.payload)
				n++
			}
			c.unacked = append(c.unacked, c.sendQ[:n]...)
			c.sendQ = append(c.sendQ[:0], c.sendQ[n:]...)
		}
		broken := c.writeErr
		c.mu.Unlock()
		if len(bufs) > 0 && !broken {
			if _, err := bufs.WriteTo(c.nc); err != nil {
				c.mu.Lock()
				c.writeErr = true
				c.mu.Unlock()
				c.fail(fmt.Errorf("%w: writing to %s: %v", verbs.ErrConnLost, c.nc.RemoteAddr(), err), nil)
				done = true
			}
		}
		if done {
			c.halfClose()
			return
		}
	}
}

func (c *conn) halfClose() {
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	_ = c.nc.Close()
}

// reader applies incoming frames in order: WRITEs into registered memory,
// SENDs into posted receives, ACKs and NAKs into send completions. After the
// QP failed it drains (discarding) until the peer's FIN or the close grace.
func (c *conn) reader() {
	defer c.wg.Done()
	var h [headerSize]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if err == io.EOF {
				c.fail(verbs.ErrDisconnected, nil)
			} else {
				c.fail(fmt.Errorf("%w: reading from %s: %v", verbs.ErrConnLost, c.nc.RemoteAddr(), err), nil)
			}
			return
		}
		op, status := h[0], h[1]
		n := binary.BigEndian.Uint32(h[4:])
		seq := binary.BigEndian.Uint64(h[8:])
		rkey := binary.BigEndian.Uint32(h[16:])
		addr := binary.BigEndian.Uint64(h[24:])
		var err error
		switch op {
		case opWrite:
			err = c.applyWrite(seq, rkey, addr, n)
		case opSend:
			err = c.applySend(seq, n)
		case opAck:
			c.acked(seq)
		case opNak:
			err = c.nakked(seq, verbs.Status(status), n)
		default:
			err = fmt.Errorf("%w: unknown frame op %d from %s", verbs.ErrConnLost, op, c.nc.RemoteAddr())
			c.fail(err, nil)
		}
		if err != nil {
			if errors.Is(err, errDrain) {
				continue
			}
			if !c.isFailed() {
				c.fail(err, nil)
			}
			c.drain()
			return
		}
	}
}

var errDrain = errors.New("discarded")

func (c *conn) isFailed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st == stateError
}

// drain reads and discards until EOF or the deadline Close sets.
func (c *conn) drain() { _, _ = io.Copy(io.Discard, c.br) }

func (c *conn) readPayload(dst []byte, what string) error {
	if k, err := io.ReadFull(c.br, dst); err != nil {
		return fmt.Errorf("%w: connection from %s ended %d bytes into a %d-byte %s: %v", verbs.ErrConnLost, c.nc.RemoteAddr(), k, len(dst), what, err)
	}
	return nil
}

func (c *conn) placed(seq uint64) {
	c.mu.Lock()
	c.ackOut = seq
	kick := c.br.Buffered() == 0 || c.ackOut-c.ackSent >= ackEvery
	c.mu.Unlock()
	if kick {
		c.signal()
	}
}

func nakFrame(seq uint64, status verbs.Status, reason string) []byte {
	if len(reason) > maxNakReason {
		reason = reason[:maxNakReason]
	}
	b := make([]byte, headerSize, headerSize+len(reason))
	putHeader(b, opNak, byte(status), uint32(len(reason)), seq, 0, 0)
	return append(b, reason...)
}

func (c *conn) applyWrite(seq uint64, rkey uint32, addr uint64, n uint32) error {
	c.mu.Lock()
	if c.st == stateError {
		c.mu.Unlock()
		if _, err := io.CopyN(io.Discard, c.br, int64(n)); err != nil {
			return err
		}
		return errDrain
	}
	m := c.mrs[rkey]
	var reason string
	switch {
	case m == nil:
		reason = "no region is registered under this key (never registered, or deregistered)"
	case m.access&verbs.AccessRemoteWrite == 0:
		reason = "the region does not allow remote writes"
	case addr < m.addr || addr-m.addr > uint64(len(m.buf)) || uint64(n) > uint64(len(m.buf))-(addr-m.addr):
		reason = fmt.Sprintf("outside the registered region [%#x, %#x)", m.addr, m.addr+uint64(len(m.buf)))
	}
	if reason != "" {
		ae := &verbs.AccessError{RKey: rkey, Addr: addr, Len: uint64(n), Reason: reason}
		c.failLocked(ae, nakFrame(seq, verbs.StatusRemoteAccess, reason))
		c.mu.Unlock()
		c.signal()
		return ae
	}
	off := addr - m.addr
	dst := m.buf[off : off+uint64(n)]
	c.mu.Unlock()
	if err := c.readPayload(dst, "RDMA WRITE"); err != nil {
		return err
	}
	c.placed(seq)
	return nil
}

func (c *conn) applySend(seq uint64, n uint32) error {
	c.mu.Lock()
	if c.st == stateError {
		c.mu.Unlock()
		if _, err := io.CopyN(io.Discard, c.br, int64(n)); err != nil {
			return err
		}
		return errDrain
	}
	if len(c.recvQ) == 0 {
		err := fmt.Errorf("%w (a SEND of %d bytes from %s)", verbs.ErrRNR, n, c.nc.RemoteAddr())
		c.failLocked(err, nakFrame(seq, verbs.StatusRNR, err.Error()))
		c.mu.Unlock()
		c.signal()
		return err
	}
	r := c.recvQ[0]
	if uint64(n) > uint64(len(r.buf)) {
		err := fmt.Errorf("%w: %d bytes into a %d-byte receive", verbs.ErrTooLong, n, len(r.buf))
		c.cq.push([]verbs.Completion{{ID: r.wr.ID, Op: verbs.OpRecv, Status: verbs.StatusLocalLength, Err: err}}, false)
		c.recvQ = c.recvQ[1:]
		c.failLocked(err, nakFrame(seq, verbs.StatusRemoteInvalid, err.Error()))
		c.mu.Unlock()
		c.signal()
		return err
	}
	c.recvQ = c.recvQ[1:]
	c.curRecv = &r
	c.mu.Unlock()
	if err := c.readPayload(r.buf[:n], "SEND"); err != nil {
		return err // fail flushes curRecv first, then the rest, in order
	}
	c.mu.Lock()
	if c.curRecv == nil { // flushed by a concurrent failure
		c.mu.Unlock()
		return errDrain
	}
	c.curRecv = nil
	c.ackOut = seq
	kick := c.br.Buffered() == 0 || c.ackOut-c.ackSent >= ackEvery
	c.cq.push([]verbs.Completion{{ID: r.wr.ID, Op: verbs.OpRecv, ByteLen: n}}, false)
	c.mu.Unlock()
	if kick {
		c.signal()
	}
	return nil
}

func (c *conn) acked(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var wcs []verbs.Completion
	k := 0
	for k < len(c.unacked) && c.unacked[k].seq <= seq {
		o := c.unacked[k]
		wcs = append(wcs, verbs.Completion{ID: o.wr.ID, Op: o.wr.Op})
		k++
	}
	c.unacked = append(c.unacked[:0], c.unacked[k:]...)
	if len(wcs) > 0 {
		c.cq.push(wcs, false)
	}
}

func (c *conn) nakked(seq uint64, status verbs.Status, n uint32) error {
	if n > maxNakReason {
		return fmt.Errorf("%w: NAK reason of %d bytes", verbs.ErrConnLost, n)
	}
	reason := make([]byte, n)
	if err := c.readPayload(reason, "NAK"); err != nil {
		return err
	}
	c.acked(seq - 1)
	c.mu.Lock()
	var cause error
	var wr outWR
	found := len(c.unacked) > 0 && c.unacked[0].seq == seq
	if found {
		wr = c.unacked[0]
		c.unacked = c.unacked[1:]
	}
	switch status {
	case verbs.StatusRemoteAccess:
		ae := &verbs.AccessError{Reason: string(reason), Remote: true}
		if found {
			ae.RKey, ae.Addr, ae.Len = wr.wr.RKey, wr.wr.RemoteAddr, uint64(wr.wr.Local.Length)
		}
		cause = ae
	case verbs.StatusRNR:
		cause = fmt.Errorf("%w: the peer says: %s", verbs.ErrRNR, reason)
	default:
		cause = fmt.Errorf("rdma soft: the peer refused a request (%v): %s", status, reason)
	}
	if found {
		c.cq.push([]verbs.Completion{{ID: wr.wr.ID, Op: wr.wr.Op, Status: status, Err: cause}}, false)
	}
	c.failLocked(cause, nil)
	c.mu.Unlock()
	c.signal()
	return cause
}

// cq is the connection's completion queue. mu guards q and dead.
type cq struct {
	mu     sync.Mutex
	q      []verbs.Completion
	dead   bool
	notify chan struct{}
}

func (q *cq) push(wcs []verbs.Completion, dead bool) {
	q.mu.Lock()
	q.q = append(q.q, wcs...)
	q.dead = q.dead || dead
	q.mu.Unlock()
	select {
	case q.notify <- struct{}{}:
	default:
	}
}

func (q *cq) Poll(wc []verbs.Completion) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := copy(wc, q.q)
	q.q = append(q.q[:0], q.q[n:]...)
	return n
}

func (q *cq) Wait(ctx context.Context) error {
	for {
		q.mu.Lock()
		ready := len(q.q) > 0 || q.dead
		q.mu.Unlock()
		if ready {
			return nil
		}
		select {
		case <-q.notify:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
