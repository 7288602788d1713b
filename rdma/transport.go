package rdma

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/migctl/migctl/rdma/verbs"
	"github.com/migctl/migctl/transport"
)

// This file is the rdma: scheme of package transport, registered when
// package rdma is linked (transport never imports rdma). transport.Dial
// and transport.Listen on an rdma: address open the provider named by
// transport.Config.RDMAProvider (DefaultProvider, "verbs", when empty; no
// fallback), and:
//
//   - Dial connects with rdma-pin-all as Config.PinRAM asks and the
//     source's RAM from Config.RAM, and returns a *SourceConn;
//   - Listen binds the address; each Accept registers Config.RAM (the
//     destination guest's memory) for the source's one-sided writes and
//     returns a *DestConn. The RAM stays closed to the source (HoldRAM)
//     until the loader calls DestConn.OpenRAM, once it accepted the
//     source: nothing is registered for, or written by, a source the
//     destination refuses.

func init() { transport.Register(transport.SchemeRDMA, scheme{}) }

// ProviderError reports that the RDMA provider an rdma: address asked for
// could not be opened: unknown, not built into this binary, or its device
// probe failed (Err is then a *verbs.NoDeviceError naming the probe).
type ProviderError struct {
	Name string
	Err  error
}

func (e *ProviderError) Error() string {
	return fmt.Sprintf("%v (rdma: addresses run on the provider migctl was started with, --rdma-provider %s; it never falls back to soft on its own)", e.Err, e.Name)
}

func (e *ProviderError) Unwrap() error { return e.Err }

type scheme struct{}

func openProvider(ctx context.Context, name string) (verbs.Provider, error) {
	if name == "" {
		name = DefaultProvider
	}
	p, err := Open(ctx, name)
	if err != nil {
		return nil, &ProviderError{Name: name, Err: err}
	}
	return p, nil
}

// hostPort is the provider's address for a: QEMU writes the wildcard as
// "0" (rdma:0:4444), which getaddrinfo reads as 0.0.0.0.
func hostPort(a transport.Addr) string {
	h := a.Host
	if h == "0" {
		h = "0.0.0.0"
	}
	return net.JoinHostPort(h, strconv.Itoa(a.Port))
}

func ramBlocks(ram []transport.RAMBlock) ([]Block, error) {
	if len(ram) == 0 {
		return nil, errors.New("rdma: no guest RAM given (transport.Config.RAM): the rdma: transport moves RAM by one-sided writes between registered memory and must be told where it is")
	}
	out := make([]Block, len(ram))
	for i, b := range ram {
		out[i] = Block{Name: b.Name, Mem: b.Mem}
	}
	return out, nil
}

func (scheme) Dial(ctx context.Context, a transport.Addr, c *transport.Config) (transport.Conn, error) {
	blocks, err := ramBlocks(c.RAM)
	if err != nil {
		return nil, err
	}
	p, err := openProvider(ctx, c.RDMAProvider)
	if err != nil {
		return nil, err
	}
	s, err := Dial(ctx, p, hostPort(a), Options{PinAll: c.PinRAM, Blocks: blocks, LazyBlocks: true})
	if err != nil {
		return nil, err
	}
	return &SourceConn{s: s, addr: a, provider: p.Name()}, nil
}

func (scheme) Listen(ctx context.Context, a transport.Addr, c *transport.Config) (transport.Listener, error) {
	blocks, err := ramBlocks(c.RAM)
	if err != nil {
		return nil, err
	}
	p, err := openProvider(ctx, c.RDMAProvider)
	if err != nil {
		return nil, err
	}
	l, err := Listen(ctx, p, hostPort(a), Options{HoldRAM: true})
	if err != nil {
		return nil, err
	}
	bound := a
	if host, port, err := net.SplitHostPort(l.Addr().String()); err == nil {
		bound.Host = host
		bound.Port, _ = strconv.Atoi(port)
	}
	return &listener{l: l, blocks: blocks, addr: bound, provider: p.Name()}, nil
}

// listener is an rdma: transport.Listener.
type listener struct {
	l        *Listener
	blocks   []Block
	addr     transport.Addr
	provider string
}

// Accept waits for a source and registers the guest's RAM for it (kept
// closed until DestConn.OpenRAM).
func (l *listener) Accept(ctx context.Context) (transport.Conn, error) {
	d, err := l.l.Accept(ctx, l.blocks)
	if err != nil {
		return nil, err
	}
	return &DestConn{d: d, addr: l.addr, provider: l.provider}, nil
}

func (l *listener) Addr() transport.Addr { return l.addr }
func (l *listener) Close() error         { return l.l.Close() }

// Provider names the RDMA provider the listener runs on.
func (l *listener) Provider() string { return l.provider }

// SourceConn is the outgoing side of an rdma: channel as a transport.Conn:
// Write carries the QEMUFile stream as QEMU_FILE messages (each Write is
// sent at once, after every RAM write issued before it), Read is the
// return path on the same connection. WriteRAM, WriteZero and SyncRAM move
// guest RAM by one-sided RDMA WRITE into the destination's registered
// memory (see Source).
type SourceConn struct {
	s        *Source
	addr     transport.Addr
	provider string
	dl       deadline
}

// Read reads the return path.
func (c *SourceConn) Read(p []byte) (int, error) {
	ctx := c.dl.context()
	n, err := c.s.ReadContext(ctx, p)
	return n, deadlineErr(ctx, err)
}

// Write sends stream bytes and flushes them.
func (c *SourceConn) Write(p []byte) (int, error) {
	ctx := c.dl.context()
	n, err := c.s.WriteContext(ctx, p)
	if err == nil {
		err = c.s.FlushContext(ctx)
	}
	return n, deadlineErr(ctx, err)
}

// Close ends the channel in order (see Source.Close).
func (c *SourceConn) Close() error { return c.s.Close() }

// CloseWrite flushes the stream; the EOF of a migration stream is its EOF
// record, so nothing else is needed, and the return path stays open.
func (c *SourceConn) CloseWrite() error { return c.s.Flush() }

// SetDeadline bounds Read and Write, pending calls included, as net.Conn
// does; a zero time clears it.
func (c *SourceConn) SetDeadline(t time.Time) error { c.dl.set(t); return nil }

// ReturnPath is true: the destination answers on the same connection.
func (c *SourceConn) ReturnPath() bool { return true }

// Addr is the address dialled.
func (c *SourceConn) Addr() transport.Addr { return c.addr }

// Unwrap returns the *Source.
func (c *SourceConn) Unwrap() any { return c.s }

// Provider names the RDMA provider the channel runs on ("soft", "verbs").
func (c *SourceConn) Provider() string { return c.provider }

// PinnedRAM reports whether rdma-pin-all is in force.
func (c *SourceConn) PinnedRAM() bool { return c.s.PinAll() }

// WriteRAM writes data at offset of the destination's block (Source.WriteRAM).
func (c *SourceConn) WriteRAM(ctx context.Context, block string, offset uint64, data []byte) error {
	return c.s.WriteRAM(ctx, block, offset, data)
}

// WriteZero zeroes length bytes at offset of the destination's block
// (Source.WriteZero).
func (c *SourceConn) WriteZero(ctx context.Context, block string, offset, length uint64) error {
	return c.s.WriteZero(ctx, block, offset, length)
}

// SyncRAM ends a pass: every RAM write issued so far has landed when it
// returns (Source.Sync).
func (c *SourceConn) SyncRAM(ctx context.Context) error { return c.s.Sync(ctx) }

// RAMBytes returns the bytes carried by RDMA WRITEs so far.
func (c *SourceConn) RAMBytes() uint64 { return c.s.Stats().BytesWritten }

// DestConn is the incoming side of an rdma: channel as a transport.Conn:
// Read returns the QEMUFile stream, Write (sent at once) the return path.
// RAM arrives by itself in the registered guest memory once OpenRAM was
// called, and by the ordering guarantee (see Dest) every RAM write the
// source issued before a stream byte has landed when Read returns it.
type DestConn struct {
	d        *Dest
	addr     transport.Addr
	provider string
	dl       deadline
}

// Read reads the stream.
func (c *DestConn) Read(p []byte) (int, error) {
	ctx := c.dl.context()
	n, err := c.d.ReadContext(ctx, p)
	return n, deadlineErr(ctx, err)
}

// Write sends return-path bytes and flushes them.
func (c *DestConn) Write(p []byte) (int, error) {
	ctx := c.dl.context()
	n, err := c.d.WriteContext(ctx, p)
	if err == nil {
		err = c.d.FlushContext(ctx)
	}
	return n, deadlineErr(ctx, err)
}

// Close disconnects; the guest memory is no longer written once it
// returns (Dest.Close).
func (c *DestConn) Close() error { return c.d.Close() }

// CloseWrite flushes the return path.
func (c *DestConn) CloseWrite() error { return c.d.Flush() }

// SetDeadline bounds Read and Write, pending calls included, as net.Conn
// does; a zero time clears it.
func (c *DestConn) SetDeadline(t time.Time) error { c.dl.set(t); return nil }

// ReturnPath is true.
func (c *DestConn) ReturnPath() bool { return true }

// Addr is the listener's bound address.
func (c *DestConn) Addr() transport.Addr { return c.addr }

// Unwrap returns the *Dest.
func (c *DestConn) Unwrap() any { return c.d }

// Provider names the RDMA provider the channel runs on.
func (c *DestConn) Provider() string { return c.provider }

// PinnedRAM reports whether the source asked for rdma-pin-all (adopted
// here).
func (c *DestConn) PinnedRAM() bool { return c.d.PinAll() }

// OpenRAM lets the source register and write the guest's RAM (see
// Dest.OpenRAM); call it once the source was accepted.
func (c *DestConn) OpenRAM() error { return c.d.OpenRAM() }

// RAMLanded returns nil when every RAM write the source issued before the
// stream bytes read so far has landed in guest memory. By the ordering
// guarantee that holds for a healthy channel once the source ended a pass
// (Sync: REGISTER_FINISHED, which QEMU's source sends after every
// iteration too); a channel that failed (a refused or lost write among
// them) returns its error, and a source that never ended a pass
// ErrNoPassEnd.
func (c *DestConn) RAMLanded() error {
	if err := c.d.Err(); err != nil {
		return err
	}
	if c.d.Stats().Finished == 0 {
		return ErrNoPassEnd
	}
	return nil
}

// ErrNoPassEnd is DestConn.RAMLanded's error for a source that wrote no
// REGISTER_FINISHED: it never ended a RAM pass, so nothing says its RAM
// writes are complete.
var ErrNoPassEnd = errors.New("rdma: the source never ended a RAM pass (no REGISTER_FINISHED), so its RAM writes cannot be known complete")

// Fail fails the channel and tells the source why at once (an ERROR
// message), even when the source is blocked in a RAM write and not
// reading the return path.
func (c *DestConn) Fail(err error) { c.d.Fail(err) }

// deadline is a Conn's deadline: one context shared by the calls made
// under it, cancelled when the deadline passes. Setting, moving or clearing
// the deadline before then keeps the context, so pending calls follow the
// new deadline (or none), as net.Conn's do; while a passed deadline stands
// every call fails at once, and once it is cleared or moved calls get a
// new context.
type deadline struct {
	mu     sync.Mutex
	t      time.Time
	ctx    context.Context
	cancel context.CancelFunc
	timer  *time.Timer
}

// context returns the context a call waits under.
func (d *deadline) context() context.Context {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ctx == nil || (d.ctx.Err() != nil && d.t.IsZero()) {
		d.ctx, d.cancel = context.WithCancel(context.Background())
	}
	return d.ctx
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	d.t = t
	if t.IsZero() {
		return // pending calls keep their context, now without a timer
	}
	if d.ctx == nil || d.ctx.Err() != nil {
		d.ctx, d.cancel = context.WithCancel(context.Background())
	}
	if wait := time.Until(t); wait > 0 {
		d.timer = time.AfterFunc(wait, d.cancel)
	} else {
		d.cancel()
	}
}

// deadlineErr makes a wait that ended by the deadline an error matching
// os.ErrDeadlineExceeded, as net.Conn's.
func deadlineErr(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %w", os.ErrDeadlineExceeded, err)
	}
	return err
}
