package rdma

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/rdma/control"
	"github.com/migctl/migctl/rdma/verbs"
)

// Listener accepts RDMA migration channels.
type Listener struct {
	p    verbs.Provider
	l    verbs.Listener
	opts Options
}

// Listen binds addr ("host:port", "[v6]:port"; port 0 picks one) through
// provider p.
func Listen(ctx context.Context, p verbs.Provider, addr string, opts Options) (*Listener, error) {
	opts = opts.withDefaults()
	l, err := p.Listen(ctx, addr, verbsConfig(opts))
	if err != nil {
		return nil, fmt.Errorf("rdma: listen %s: %w", addr, err)
	}
	return &Listener{p: p, l: l, opts: opts}, nil
}

// Addr is the bound address.
func (l *Listener) Addr() net.Addr { return l.l.Addr() }

// Close stops listening. Accepted channels are not affected.
func (l *Listener) Close() error { return l.l.Close() }

// Accept waits for a source, adopts the rdma-pin-all it asks for, and
// returns the channel. blocks is the guest's RAM (name + memory, mmap'd for
// the verbs provider); the destination's provider writes into it directly
// from then on, concurrently with the caller. A request with an unknown
// protocol version is rejected and Accept returns the reason.
func (l *Listener) Accept(ctx context.Context, blocks []Block) (*Dest, error) {
	if err := checkBlocks(blocks); err != nil {
		return nil, err
	}
	conn, err := l.l.Next(ctx)
	if err != nil {
		return nil, fmt.Errorf("rdma: accept on %s: %w", l.l.Addr(), err)
	}
	caps, err := control.ParseCaps(conn.PeerData())
	if err == nil && caps.Version != control.Version {
		err = fmt.Errorf("rdma: the source speaks RDMA protocol version %d, this destination %d", caps.Version, control.Version)
	}
	if err != nil {
		_ = conn.Reject(ctx, err.Error())
		return nil, err
	}
	e, err := newEndpoint(conn, l.opts, "destination", "source")
	if err != nil {
		_ = conn.Reject(ctx, err.Error())
		return nil, err
	}
	d := &Dest{e: e, pinAll: caps.Flags&control.CapPinAll != 0, readMu: make(chan struct{}, 1), open: !l.opts.HoldRAM || mutant.RDMAOpenRAM}
	var off uint64
	for _, b := range blocks {
		d.own = append(d.own, dstBlock{name: b.Name, mem: b.Mem, addr: addrOf(b.Mem), offset: off,
			chunkMR: make([]verbs.MR, (uint64(len(b.Mem))+chunkSize-1)>>chunkShift)})
		off += uint64(len(b.Mem))
	}
	e.handler = d.handle
	if err := conn.Accept(ctx, control.AppendCaps(nil, control.Caps{Version: control.Version, Flags: caps.Flags & control.KnownCaps})); err != nil {
		_ = conn.Close()
		e.release()
		return nil, fmt.Errorf("rdma: accept from %s: %w", conn.RemoteAddr(), err)
	}
	e.start()
	return d, nil
}

// Accept listens on addr, accepts one source and stops listening.
func Accept(ctx context.Context, p verbs.Provider, addr string, blocks []Block, opts Options) (*Dest, error) {
	l, err := Listen(ctx, p, addr, opts)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	return l.Accept(ctx, blocks)
}

type dstBlock struct {
	name    string
	mem     []byte
	addr    uint64
	offset  uint64     // in this destination's ram_addr space
	chunkMR []verbs.MR // on-demand registrations, by chunk
	wholeMR verbs.MR   // pin-all
}

// DestStats counts what a Dest did.
type DestStats struct {
	Registrations uint64 // chunk registrations (REGISTER_REQUEST entries served)
	Compressed    uint64 // COMPRESS messages applied
	ZeroedBytes   uint64 // bytes COMPRESS zeroed
	Finished      uint64 // REGISTER_FINISHED messages: the source's Syncs
}

// Dest is the incoming side of an RDMA migration channel. RAM arrives by
// RDMA WRITE straight into the blocks given to Accept, applied by the
// provider as it arrives; the service goroutine answers the source's
// registration requests and applies COMPRESS. Read returns the stream bytes;
// Write/Flush send the return path.
//
// Ordering guarantee: when Read returns a stream byte, every RAM write the
// source issued (WriteRAM, WriteZero) before writing that byte has landed
// in the blocks. The source posts its pending WRITEs before the QEMU_FILE
// message that carries later bytes, and both providers complete a receive
// only after every earlier WRITE on the same connection was placed (RC
// ordering; the soft provider applies frames in order from one TCP stream).
type Dest struct {
	e      *endpoint
	pinAll bool
	own    []dstBlock

	// ramMu guards what serving the source's RAM requests touches: the
	// service goroutine holds it while it handles a request, OpenRAM while
	// it serves the held one.
	ramMu  sync.Mutex
	open   bool        // RAM_BLOCKS_REQUEST may be answered (no HoldRAM, or OpenRAM was called)
	held   *heldBlocks // a RAM_BLOCKS_REQUEST waiting for OpenRAM
	blocks []*dstBlock // in the source's order, once RAM_BLOCKS_REQUEST was served

	readMu  chan struct{}
	regs    atomic.Uint64
	comps   atomic.Uint64
	zeroed  atomic.Uint64
	fins    atomic.Uint64
	closing atomic.Bool
}

// heldBlocks is a RAM_BLOCKS_REQUEST kept until OpenRAM, with the receive
// slot it arrived in (reposted, and its credit returned, when served).
type heldBlocks struct {
	names []string
	slot  int
}

// OpenRAM opens the destination's RAM to the source (Options.HoldRAM):
// the held RAM_BLOCKS_REQUEST, if it already arrived, is answered now
// (registering every block first under rdma-pin-all), otherwise as soon as
// it arrives. A failure fails the channel and is returned. Without
// HoldRAM, OpenRAM does nothing.
func (d *Dest) OpenRAM() error {
	d.ramMu.Lock()
	defer d.ramMu.Unlock()
	if d.open {
		return d.e.Err()
	}
	d.open = true
	if err := d.e.Err(); err != nil {
		return err
	}
	if h := d.held; h != nil {
		d.held = nil
		if err := d.serveBlocks(h.names); err != nil {
			d.e.fail(err, true)
			return err
		}
		d.e.repost(h.slot, true)
	}
	return d.e.Err()
}

// PinAll reports whether the source asked for rdma-pin-all.
func (d *Dest) PinAll() bool { return d.pinAll }

// Err returns the error that failed the channel, or nil.
func (d *Dest) Err() error { return d.e.Err() }

// Stats returns the counters so far.
func (d *Dest) Stats() DestStats {
	return DestStats{Registrations: d.regs.Load(), Compressed: d.comps.Load(), ZeroedBytes: d.zeroed.Load(), Finished: d.fins.Load()}
}

// Read returns stream bytes from the source (see the ordering guarantee on
// Dest). It returns io.EOF after the source closed in order and everything
// it sent was read.
func (d *Dest) Read(p []byte) (int, error) { return d.ReadContext(d.e.life, p) }

// ReadContext is Read bounded by ctx as well as Options.Timeout.
func (d *Dest) ReadContext(ctx context.Context, p []byte) (int, error) {
	d.readMu <- struct{}{}
	defer func() { <-d.readMu }()
	return d.e.readStream(ctx, p)
}

// Write sends return-path bytes to the source (buffered; see Flush).
func (d *Dest) Write(p []byte) (int, error) { return d.WriteContext(d.e.life, p) }

// WriteContext is Write bounded by ctx as well as Options.Timeout.
func (d *Dest) WriteContext(ctx context.Context, p []byte) (int, error) {
	d.e.sendMu.Lock()
	defer d.e.sendMu.Unlock()
	if err := d.e.Err(); err != nil {
		return 0, err
	}
	return d.e.writeStream(ctx, p, nil)
}

// Flush sends the buffered return-path bytes.
func (d *Dest) Flush() error { return d.FlushContext(d.e.life) }

// FlushContext is Flush bounded by ctx as well as Options.Timeout.
func (d *Dest) FlushContext(ctx context.Context) error {
	d.e.sendMu.Lock()
	defer d.e.sendMu.Unlock()
	return d.e.flushStream(ctx, nil)
}

// WaitSync blocks until the source's n-th Sync (REGISTER_FINISHED) arrived:
// every RAM write it issued before that Sync has landed.
func (d *Dest) WaitSync(ctx context.Context, n uint64) error {
	return d.e.wait(ctx, "waiting for REGISTER_FINISHED", func() bool { return uint64(d.e.finished) >= n })
}

// Fail fails the channel with err and tells the source (an ERROR message
// carrying err's text), e.g. when the loader refuses the stream.
func (d *Dest) Fail(err error) { d.e.fail(err, true) }

// handle serves the source's requests; it runs on the service goroutine.
// A RAM_BLOCKS_REQUEST that arrives while the RAM is held (HoldRAM, before
// OpenRAM) is kept with its slot.
func (d *Dest) handle(m control.Message, slot int) (held bool, err error) {
	d.ramMu.Lock()
	defer d.ramMu.Unlock()
	switch m.Type {
	case control.TypeRAMBlocksRequest:
		if !d.open {
			if d.held != nil || d.blocks != nil {
				return false, protocolf("a second RAM_BLOCKS_REQUEST")
			}
			d.held = &heldBlocks{names: slices.Clone(m.Names), slot: slot}
			return true, nil
		}
		return false, d.serveBlocks(m.Names)
	case control.TypeRegisterRequest:
		return false, d.register(m.Regs)
	case control.TypeCompress:
		return false, d.compress(m.Comp)
	case control.TypeRegisterFinished:
		d.fins.Add(1)
		d.e.mu.Lock()
		d.e.finished++
		d.e.broadcast()
		d.e.mu.Unlock()
		return false, nil
	case control.TypeUnregisterRequest:
		return false, protocolf("UNREGISTER_REQUEST is not supported (QEMU never sends it)")
	}
	return false, protocolf("unexpected %v from the source", m.Type)
}

func (d *Dest) serveBlocks(names []string) error {
	if d.blocks != nil {
		return protocolf("a second RAM_BLOCKS_REQUEST")
	}
	order := make([]*dstBlock, len(d.own))
	for i := range d.own {
		order[i] = &d.own[i]
	}
	if len(names) > 0 {
		if len(names) != len(d.own) {
			return &LayoutError{Reason: fmt.Sprintf("the source has %d blocks, the destination %d", len(names), len(d.own))}
		}
		byName := map[string]*dstBlock{}
		for i := range d.own {
			byName[d.own[i].name] = &d.own[i]
		}
		for i, n := range names {
			b := byName[n]
			if b == nil {
				return &LayoutError{Reason: fmt.Sprintf("the source has block %q, the destination does not", n)}
			}
			delete(byName, n)
			order[i] = b
		}
	}
	res := make([]control.DestBlock, len(order))
	for i, b := range order {
		res[i] = control.DestBlock{HostAddr: b.addr, Offset: b.offset, Length: uint64(len(b.mem))}
		if d.pinAll {
			mr, err := d.e.conn.PD().Register(b.mem, verbs.AccessLocalWrite|verbs.AccessRemoteWrite)
			if err != nil {
				return fmt.Errorf("rdma: pin-all: registering destination block %q (%d bytes): %w", b.name, len(b.mem), err)
			}
			b.wholeMR = mr
			d.regs.Add(1)
			res[i].RKey = mr.RKey()
		}
	}
	d.blocks = order
	return d.e.postReply(control.Message{Type: control.TypeRAMBlocksResult, Blocks: res})
}

func (d *Dest) block(idx uint32, what string) (*dstBlock, error) {
	if d.blocks == nil {
		return nil, protocolf("%s before RAM_BLOCKS_REQUEST", what)
	}
	if uint64(idx) >= uint64(len(d.blocks)) {
		return nil, protocolf("%s names block %d of %d", what, idx, len(d.blocks))
	}
	return d.blocks[idx], nil
}

func (d *Dest) register(regs []control.Reg) error {
	results := make([]control.RegResult, 0, len(regs))
	for _, r := range regs {
		b, err := d.block(r.Block, "REGISTER_REQUEST")
		if err != nil {
			return err
		}
		size := uint64(len(b.mem))
		if r.Addr < b.offset || r.Addr-b.offset >= size {
			return protocolf("REGISTER_REQUEST for address %#x outside block %q [%#x, %#x)", r.Addr, b.name, b.offset, b.offset+size)
		}
		first := (r.Addr - b.offset) >> chunkShift
		nchunks := uint64(len(b.chunkMR))
		if r.Chunks >= nchunks-first {
			return protocolf("REGISTER_REQUEST for %d chunks from chunk %d of block %q, which has %d", r.Chunks+1, first, b.name, nchunks)
		}
		last := first + r.Chunks
		var mr verbs.MR
		switch {
		case b.wholeMR != nil:
			mr = b.wholeMR
		case r.Chunks == 0 && b.chunkMR[first] != nil:
			mr = b.chunkMR[first]
		default:
			end := min(size, (last+1)<<chunkShift)
			mr, err = d.e.conn.PD().Register(b.mem[first<<chunkShift:end], verbs.AccessLocalWrite|verbs.AccessRemoteWrite)
			if err != nil {
				return fmt.Errorf("rdma: registering chunks %d..%d of block %q for the source: %w", first, last, b.name, err)
			}
			for c := first; c <= last; c++ {
				b.chunkMR[c] = mr
			}
			d.regs.Add(1)
		}
		results = append(results, control.RegResult{RKey: mr.RKey(), HostAddr: b.addr})
	}
	return d.e.postReply(control.Message{Type: control.TypeRegisterResult, Results: results})
}

func (d *Dest) compress(c control.Compress) error {
	b, err := d.block(c.Block, "COMPRESS")
	if err != nil {
		return err
	}
	if c.Value != 0 {
		return protocolf("COMPRESS with value %#x (only 0 is defined)", c.Value)
	}
	size := uint64(len(b.mem))
	if c.Offset < b.offset || c.Offset-b.offset > size || c.Length > size-(c.Offset-b.offset) {
		return protocolf("COMPRESS of %d bytes at %#x outside block %q [%#x, %#x)", c.Length, c.Offset, b.name, b.offset, b.offset+size)
	}
	off := c.Offset - b.offset
	zeroRange(b.mem[off : off+c.Length])
	d.comps.Add(1)
	d.zeroed.Add(c.Length)
	return nil
}

// zeroRange clears mem page by page, skipping pages already zero so that
// untouched memory is not faulted in.
func zeroRange(mem []byte) {
	const page = 4096
	for len(mem) > 0 {
		n := min(len(mem), page)
		if !isZero(mem[:n]) {
			clear(mem[:n])
		}
		mem = mem[n:]
	}
}

// Close sends the buffered return-path bytes, disconnects and releases the
// registrations. The blocks' memory is no longer touched once Close returns.
func (d *Dest) Close() error {
	if d.closing.Swap(true) {
		return nil
	}
	return d.e.shutdown(d.readMu, nil, func() {
		d.ramMu.Lock()
		defer d.ramMu.Unlock()
		for i := range d.own {
			b := &d.own[i]
			seen := map[verbs.MR]bool{}
			for _, mr := range b.chunkMR {
				if mr != nil && !seen[mr] {
					seen[mr] = true
					_ = mr.Deregister()
				}
			}
			if b.wholeMR != nil {
				_ = b.wholeMR.Deregister()
			}
		}
	})
}
