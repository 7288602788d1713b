// Package fault wraps a verbs.Provider to inject the failures RDMA
// migrations meet, for tests: a lost completion, a failed memory
// registration, an RDMA WRITE aimed outside the peer's registration, a queue
// that stops completing (a hung peer), and — for the soft provider, through
// soft.Options.WrapConn — a connection cut after a number of bytes.
//
// Counters are per wrapped provider and count across all its connections,
// 1-based: DropCompletion 3 drops the third matching completion.
package fault

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"

	"github.com/migctl/migctl/rdma/verbs"
)

// ErrInjected is the error of an injected failure.
var ErrInjected = errors.New("fault injected")

// Config says which failures to inject. Zero fields inject nothing.
type Config struct {
	// DropCompletion drops the n-th completion of opcode DropOp (any opcode
	// if DropOp is 0) that Poll would return.
	DropCompletion int
	DropOp         verbs.Opcode
	// FailRegister makes the n-th PD.Register fail with ErrInjected.
	FailRegister int
	// CorruptWrite adds Shift to the remote address of the n-th RDMA WRITE
	// posted, aiming it outside the region its key covers.
	CorruptWrite int
	Shift        uint64
}

// Provider is a fault-injecting wrapper.
type Provider struct {
	inner     verbs.Provider
	cfg       Config
	polled    atomic.Int64 // completions returned by Poll
	matched   atomic.Int64 // completions matching DropOp seen
	dropped   atomic.Int64 // completions swallowed
	stalled   atomic.Bool
	registers atomic.Int64
	writes    atomic.Int64
}

// Stall makes every CQ of this provider stop returning completions from now
// on, as if the device or the peer hung.
func (p *Provider) Stall() { p.stalled.Store(true) }

// Wrap returns p with cfg's failures injected.
func Wrap(p verbs.Provider, cfg Config) *Provider { return &Provider{inner: p, cfg: cfg} }

// Name is "fault(inner)".
func (p *Provider) Name() string { return "fault(" + p.inner.Name() + ")" }

// Probe passes through.
func (p *Provider) Probe(ctx context.Context) (verbs.Device, error) { return p.inner.Probe(ctx) }

// Listen wraps the connections the listener yields.
func (p *Provider) Listen(ctx context.Context, addr string, cfg verbs.Config) (verbs.Listener, error) {
	l, err := p.inner.Listen(ctx, addr, cfg)
	if err != nil {
		return nil, err
	}
	return &listener{Listener: l, p: p}, nil
}

// Resolve wraps the connection.
func (p *Provider) Resolve(ctx context.Context, addr string, cfg verbs.Config) (verbs.Conn, error) {
	c, err := p.inner.Resolve(ctx, addr, cfg)
	if err != nil {
		return nil, err
	}
	return p.wrap(c), nil
}

// Dropped reports how many completions Poll swallowed so far.
func (p *Provider) Dropped() int64 { return p.dropped.Load() }

// Registrations reports how many PD.Register calls were made so far
// (including an injected failure).
func (p *Provider) Registrations() int64 { return p.registers.Load() }

// Writes reports how many RDMA WRITEs were posted so far.
func (p *Provider) Writes() int64 { return p.writes.Load() }

func (p *Provider) wrap(c verbs.Conn) verbs.Conn {
	w := &conn{Conn: c, p: p}
	w.cq = &cq{CQ: c.CQ(), p: p}
	return w
}

type listener struct {
	verbs.Listener
	p *Provider
}

func (l *listener) Next(ctx context.Context) (verbs.Conn, error) {
	c, err := l.Listener.Next(ctx)
	if err != nil {
		return nil, err
	}
	return l.p.wrap(c), nil
}

type conn struct {
	verbs.Conn
	p  *Provider
	cq *cq
}

func (c *conn) PD() verbs.PD { return &pd{PD: c.Conn.PD(), p: c.p} }
func (c *conn) QP() verbs.QP { return &qp{QP: c.Conn.QP(), p: c.p} }
func (c *conn) CQ() verbs.CQ { return c.cq }

type pd struct {
	verbs.PD
	p *Provider
}

func (d *pd) Register(buf []byte, access verbs.Access) (verbs.MR, error) {
	if n := d.p.registers.Add(1); d.p.cfg.FailRegister > 0 && n == int64(d.p.cfg.FailRegister) {
		return nil, ErrInjected
	}
	return d.PD.Register(buf, access)
}

type qp struct {
	verbs.QP
	p *Provider
}

func (q *qp) PostSend(wr verbs.SendWR) error {
	if wr.Op == verbs.OpWrite {
		if n := q.p.writes.Add(1); q.p.cfg.CorruptWrite > 0 && n == int64(q.p.cfg.CorruptWrite) {
			wr.RemoteAddr += q.p.cfg.Shift
		}
	}
	return q.QP.PostSend(wr)
}

// cq filters completions. mu serialises Poll so the counters match the
// order completions are returned in.
type cq struct {
	verbs.CQ
	p  *Provider
	mu sync.Mutex
}

func (q *cq) Poll(wc []verbs.Completion) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	cfg := &q.p.cfg
	if q.p.stalled.Load() {
		return 0
	}
	n := q.CQ.Poll(wc)
	out := 0
	for _, c := range wc[:n] {
		if cfg.DropCompletion > 0 && (cfg.DropOp == 0 || cfg.DropOp == c.Op) {
			if q.p.matched.Add(1) == int64(cfg.DropCompletion) {
				q.p.dropped.Add(1)
				continue
			}
		}
		q.p.polled.Add(1)
		wc[out] = c
		out++
	}
	return out
}

// Wait passes through, except that a stalled CQ waits until ctx ends.
func (q *cq) Wait(ctx context.Context) error {
	if q.p.stalled.Load() {
		<-ctx.Done()
		return ctx.Err()
	}
	return q.CQ.Wait(ctx)
}

// CutAfter returns a soft.Options.WrapConn that lets n bytes through the
// connection's write side, then writes no more and closes it: the peer sees
// the byte stream end in the middle of whatever frame was being sent.
func CutAfter(n int64) func(net.Conn) net.Conn {
	return func(c net.Conn) net.Conn { return &cutConn{Conn: c, left: n} }
}

type cutConn struct {
	net.Conn
	mu   sync.Mutex
	left int64
}

func (c *cutConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.left <= 0 {
		return 0, ErrInjected
	}
	if int64(len(b)) <= c.left {
		n, err := c.Conn.Write(b)
		c.left -= int64(n)
		return n, err
	}
	n, _ := c.Conn.Write(b[:c.left])
	c.left = 0
	_ = c.Conn.Close()
	return n, ErrInjected
}
