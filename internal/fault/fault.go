// Package fault is a fault-injecting proxy for byte streams, used by
// migctl's reliability tests to break a migration's channel at a chosen
// moment with real sockets.
//
// A Proxy forwards bytes both ways between pairs of connections, its
// links: connections it accepts on its own listener, each joined to a
// connection it opens upstream (Listen), or pairs handed to it (Link, for
// descriptors passed with SCM_RIGHTS). Forward is the direction from the
// side that connected (a migration's source) to upstream (the
// destination); Backward is the other (the return path).
//
// Faults are applied on command, at any moment, to every link:
//
//   - Cut closes both connections of every link (a TCP connection is reset)
//     and refuses new connections until Heal.
//   - Stall stops forwarding both ways and keeps every socket open: the
//     proxy reads at most one chunk per direction and holds it (Held), so
//     the senders' socket buffers fill as on a dead network path. Heal
//     forwards what was held and resumes.
//   - Corrupt flips (XOR 0xFF) the first byte of the next chunk forwarded in
//     one direction, once.
//   - Trickle forwards at most N bytes per interval in both directions until
//     Heal.
//   - ResetOneWay ends one direction only: its receiver sees the stream end
//     (a half-close, EOF) and the sender's further bytes are read and
//     dropped, as by a middlebox that lost one direction's state; the other
//     direction keeps flowing. It cannot be healed.
//
// Every blocking call of the proxy is reachable by Close and bounded: reads
// and writes end when Close closes the connections, a write to a peer that
// does not read is cut after Options.IOTimeout, opening upstream is bounded
// by Options.DialTimeout, and a stalled or trickling direction waits on a
// channel Close closes.
package fault

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Dir is a direction of a link.
type Dir int

const (
	// Forward is from the connection that came to the proxy (a migration's
	// source) to the one the proxy opened upstream (the destination).
	Forward Dir = iota
	// Backward is from upstream back to the connecting side (a migration's
	// return path).
	Backward
)

// String returns "forward" or "backward".
func (d Dir) String() string {
	switch d {
	case Forward:
		return "forward"
	case Backward:
		return "backward"
	}
	return fmt.Sprintf("Dir(%d)", int(d))
}

// Dialer opens the upstream connection of one accepted connection.
type Dialer func(ctx context.Context) (net.Conn, error)

// DialAddr returns a Dialer that connects to address on network ("tcp",
// "unix").
func DialAddr(network, address string) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	}
}

// Options tune a Proxy. The zero value is usable.
type Options struct {
	// DialTimeout bounds opening the upstream connection of one accepted
	// connection (default 10 s); on failure the accepted one is closed.
	DialTimeout time.Duration
	// IOTimeout bounds one write to a peer (default 1 min): a peer that
	// does not read for that long has its link cut. Set it longer than
	// any stall a test wants to last.
	IOTimeout time.Duration
	// ChunkSize is the most bytes read and forwarded at once (default
	// 32 KiB).
	ChunkSize int
}

// Proxy is a fault-injecting forwarder. Its methods are safe for
// concurrent use.
type Proxy struct {
	opts Options
	ln   net.Listener // nil for a proxy made by New
	up   Dialer

	done      chan struct{}      // closed by Close
	ctx       context.Context    // cancelled by Close
	stop      context.CancelFunc // cancels ctx
	closeOnce sync.Once
	wg        sync.WaitGroup // accept loop, dialers and pumps

	// mu guards the fault state and links. changed is closed and replaced
	// whenever the fault state changes, to wake waiting pumps.
	mu       sync.Mutex
	changed  chan struct{}
	stalled  bool
	refusing bool // after Cut, until Heal
	trickleN int
	trickleT time.Duration
	corrupt  [2]bool
	links    map[*link]struct{}
	linked   int // links ever made (Link accepted them), for WaitLinked
	closed   bool

	forwarded [2]atomic.Int64
	held      [2]atomic.Int64

	// onChunk, when set (tests), is called after each write with its size;
	// onHold when a direction starts holding a chunk because of a stall.
	onChunk func(d Dir, n int)
	onHold  func(d Dir)
}

// New returns a proxy without a listener: give it pairs with Link.
func New(opts Options) *Proxy {
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 10 * time.Second
	}
	if opts.IOTimeout <= 0 {
		opts.IOTimeout = time.Minute
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = 32 << 10
	}
	p := &Proxy{opts: opts, done: make(chan struct{}), changed: make(chan struct{}), links: map[*link]struct{}{}}
	p.ctx, p.stop = context.WithCancel(context.Background())
	return p
}

// Listen returns a proxy accepting on network/address ("tcp",
// "127.0.0.1:0"; "unix", a path) that joins each accepted connection to a
// new connection from up.
func Listen(network, address string, up Dialer, opts Options) (*Proxy, error) {
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, fmt.Errorf("fault: listen on %s %s: %w", network, address, err)
	}
	p := New(opts)
	p.ln, p.up = ln, up
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the listener's address (nil for a proxy made by New).
func (p *Proxy) Addr() net.Addr {
	if p.ln == nil {
		return nil
	}
	return p.ln.Addr()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed by Close
		}
		p.mu.Lock()
		refuse := p.refusing || p.closed
		if !refuse {
			p.wg.Add(1)
		}
		p.mu.Unlock()
		if refuse {
			reset(c)
			continue
		}
		go p.dial(c)
	}
}

// dial opens the upstream of c, bounded by DialTimeout and Close.
func (p *Proxy) dial(c net.Conn) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, p.opts.DialTimeout)
	defer cancel()
	u, err := p.up(ctx)
	if err != nil {
		reset(c)
		return
	}
	p.Link(c, u)
}

// Link forwards between client (the connecting side: Forward reads from
// it) and server (upstream) until either ends, under the proxy's faults.
// The proxy owns both from here on. A link given while the proxy refuses
// connections (after Cut) or after Close is closed at once.
func (p *Proxy) Link(client, server net.Conn) {
	l := &link{p: p, conns: [2]net.Conn{client, server}}
	p.mu.Lock()
	if p.closed || p.refusing {
		p.mu.Unlock()
		l.close()
		return
	}
	p.links[l] = struct{}{}
	p.linked++
	p.notifyLocked()
	l.running.Store(2)
	p.wg.Add(2)
	p.mu.Unlock()
	go l.pump(Forward)
	go l.pump(Backward)
}

// Cut closes both connections of every link (TCP ones with a reset) and
// makes the proxy refuse new connections until Heal.
func (p *Proxy) Cut() {
	p.mu.Lock()
	p.refusing = true
	links := p.snapshotLocked()
	clear(p.links)
	p.notifyLocked()
	p.mu.Unlock()
	for _, l := range links {
		l.close()
	}
}

// Stall stops forwarding both ways on every link, present and future,
// keeping the sockets open, until Heal.
func (p *Proxy) Stall() {
	p.mu.Lock()
	p.stalled = true
	p.notifyLocked()
	p.mu.Unlock()
}

// Corrupt flips the first byte of the next chunk forwarded in direction
// d, once.
func (p *Proxy) Corrupt(d Dir) {
	p.mu.Lock()
	p.corrupt[d] = true
	p.notifyLocked()
	p.mu.Unlock()
}

// Trickle forwards at most n bytes per interval in both directions until
// Heal. n <= 0 or every <= 0 turns it off.
func (p *Proxy) Trickle(n int, every time.Duration) {
	p.mu.Lock()
	if n <= 0 || every <= 0 {
		n, every = 0, 0
	}
	p.trickleN, p.trickleT = n, every
	p.notifyLocked()
	p.mu.Unlock()
}

// ResetOneWay ends direction d of every present link: its receiver sees a
// half-close (EOF), and what the sender still sends is read and dropped.
// The other direction keeps flowing. Heal does not undo it.
func (p *Proxy) ResetOneWay(d Dir) {
	p.mu.Lock()
	links := p.snapshotLocked()
	p.mu.Unlock()
	for _, l := range links {
		l.dead[d].Store(true)
		_, dst := l.ends(d)
		closeWrite(dst)
	}
}

// Heal lifts Stall and Trickle (what a stall held is forwarded), and lets
// new connections in again after Cut. A pending Corrupt stays pending.
// Links already cut or reset stay so.
func (p *Proxy) Heal() {
	p.mu.Lock()
	p.stalled, p.refusing = false, false
	p.trickleN, p.trickleT = 0, 0
	p.notifyLocked()
	p.mu.Unlock()
}

// Forwarded returns the bytes forwarded so far in direction d, over every
// link.
func (p *Proxy) Forwarded(d Dir) int64 { return p.forwarded[d].Load() }

// Held returns the bytes read in direction d and held back by a stall,
// until they are delivered or dropped.
func (p *Proxy) Held(d Dir) int64 { return p.held[d].Load() }

// Links returns the number of open links.
func (p *Proxy) Links() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// WaitLinked waits until the proxy has made at least n links since it was
// created (open or ended since), or ctx ends, or the proxy is closed. A
// fault that acts on present links only (ResetOneWay) applied before a
// connection's upstream was dialled would miss it: wait for it first.
func (p *Proxy) WaitLinked(ctx context.Context, n int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.linked < n {
		if p.closed {
			return net.ErrClosed
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			p.mu.Lock()
			return fmt.Errorf("fault: %d of %d links made: %w", p.linked, n, ctx.Err())
		}
		p.mu.Lock()
	}
	return nil
}

// Close stops the listener, closes every link and waits for the proxy's
// goroutines.
func (p *Proxy) Close() error {
	var err error
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		links := p.snapshotLocked()
		p.notifyLocked()
		p.mu.Unlock()
		close(p.done)
		p.stop()
		if p.ln != nil {
			err = p.ln.Close()
		}
		for _, l := range links {
			l.close()
		}
	})
	p.wg.Wait()
	return err
}

func (p *Proxy) snapshotLocked() []*link {
	out := make([]*link, 0, len(p.links))
	for l := range p.links {
		out = append(out, l)
	}
	return out
}

func (p *Proxy) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// flowing waits until direction d may forward (not stalled) and returns
// the trickle setting and whether to corrupt the next chunk; ok is false
// once the proxy is closed. pending is the size of the chunk waiting: a
// stall counts it in Held (counted reports it) until the caller has
// delivered or dropped it (unhold).
func (p *Proxy) flowing(d Dir, pending int) (trickleN int, trickleT time.Duration, corrupt, counted, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.closed {
			return 0, 0, false, counted, false
		}
		if !p.stalled {
			corrupt = p.corrupt[d]
			p.corrupt[d] = false
			return p.trickleN, p.trickleT, corrupt, counted, true
		}
		first := !counted
		if first {
			counted = true
			p.held[d].Add(int64(pending))
		}
		ch := p.changed
		p.mu.Unlock()
		if first && p.onHold != nil {
			p.onHold(d)
		}
		select {
		case <-ch:
		case <-p.done:
		}
		p.mu.Lock()
	}
}

// unhold takes n delivered (or dropped) bytes out of Held and wakes Drain.
func (p *Proxy) unhold(d Dir, n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.held[d].Add(-n)
	p.notifyLocked()
}

// Drain waits until nothing a stall held remains undelivered in either
// direction (Held is 0 both ways), or ctx ends: after Heal, what the
// stall held has then reached the peers' sockets.
func (p *Proxy) Drain(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.held[Forward].Load() > 0 || p.held[Backward].Load() > 0 {
		if p.closed {
			return net.ErrClosed
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			p.mu.Lock()
			return ctx.Err()
		}
		p.mu.Lock()
	}
	return nil
}

// pause waits d, or until the fault state changes or the proxy closes.
func (p *Proxy) pause(d time.Duration) {
	p.mu.Lock()
	ch := p.changed
	p.mu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ch:
	case <-p.done:
	}
}

// link is one pair of connections. conns never changes; dead[d] is set
// by ResetOneWay; running counts its live pumps.
type link struct {
	p         *Proxy
	conns     [2]net.Conn // [0] the connecting side, [1] upstream
	dead      [2]atomic.Bool
	running   atomic.Int32
	closeOnce sync.Once
}

// ends returns the connection direction d reads from and the one it
// writes to.
func (l *link) ends(d Dir) (src, dst net.Conn) {
	if d == Forward {
		return l.conns[0], l.conns[1]
	}
	return l.conns[1], l.conns[0]
}

func (l *link) close() {
	l.closeOnce.Do(func() {
		reset(l.conns[0])
		reset(l.conns[1])
	})
}

func (l *link) pump(d Dir) {
	p := l.p
	defer p.wg.Done()
	defer func() {
		if l.running.Add(-1) == 0 {
			l.close()
			p.mu.Lock()
			delete(p.links, l)
			p.mu.Unlock()
		}
	}()
	src, dst := l.ends(d)
	buf := make([]byte, p.opts.ChunkSize)
	for {
		n, err := src.Read(buf)
		if n > 0 && !l.forward(d, dst, buf[:n]) {
			return
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			// The sender half-closed: pass the end on, keep the other way.
			closeWrite(dst)
			return
		default:
			l.close()
			return
		}
	}
}

// forward writes b to dst under the faults; false when the link is done.
func (l *link) forward(d Dir, dst net.Conn, b []byte) bool {
	p := l.p
	held := int64(0) // what a stall counted in Held: out once b is delivered or dropped
	defer func() {
		if held > 0 {
			p.unhold(d, held)
		}
	}()
	for len(b) > 0 {
		n, every, corrupt, counted, ok := p.flowing(d, len(b))
		if counted {
			held += int64(len(b))
		}
		if !ok {
			return false
		}
		if l.dead[d].Load() {
			return true // reset one way: the bytes are dropped
		}
		piece := b
		if n > 0 && len(piece) > n {
			piece = piece[:n]
		}
		if corrupt {
			piece[0] ^= 0xFF
		}
		_ = dst.SetWriteDeadline(time.Now().Add(p.opts.IOTimeout))
		w, err := dst.Write(piece)
		p.forwarded[d].Add(int64(w))
		if p.onChunk != nil && w > 0 {
			p.onChunk(d, w)
		}
		if err != nil {
			if l.dead[d].Load() {
				return true // reset under the write
			}
			l.close()
			return false
		}
		b = b[len(piece):]
		if n > 0 {
			p.pause(every)
		}
	}
	return true
}

// reset closes c, with a TCP reset where it is TCP.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// closeWrite half-closes c; a connection that cannot is closed.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	_ = c.Close()
}
