package engine

import (
	"context"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// ramWriter is a main channel that moves guest RAM by one-sided writes
// straight into the destination's registered memory, outside the stream:
// rdma:'s *rdma.SourceConn. The engine finds it by this interface and never
// imports package rdma.
type ramWriter interface {
	// WriteRAM writes data (inside the guest's RAM, sent without a copy)
	// at offset of the destination's block.
	WriteRAM(ctx context.Context, block string, offset uint64, data []byte) error
	// WriteZero makes length bytes at offset zero at the destination.
	WriteZero(ctx context.Context, block string, offset, length uint64) error
	// SyncRAM returns once every write issued so far has landed.
	SyncRAM(ctx context.Context) error
	// RAMBytes counts the bytes written so far.
	RAMBytes() uint64
	// Provider names the RDMA provider (query-migrate's
	// x-migctl-rdma-provider).
	Provider() string
}

// rdmaSink puts pages as QEMU's RDMA migration does: each page is an RDMA
// WRITE into the destination's guest memory (a zero page a WriteZero: a
// COMPRESS message for a chunk not registered yet, else a WRITE of
// zeros), and the stream carries only what QEMU's RDMA stream carries —
// the RAM section's headers and EOS, then the device state. A pass ends
// with SyncRAM (REGISTER_FINISHED and every WRITE completed), after the
// stream's bytes of the pass were flushed: the channel posts the RAM
// writes issued before any stream byte ahead of it, so when the
// destination reads a stream byte every page put before it has landed (the
// rdma package's ordering guarantee), and the loader parses no page.
type rdmaSink struct {
	ctx context.Context
	enc *stream.Encoder
	w   ramWriter
}

// openRDMA returns the RDMA sink when the main channel writes RAM
// one-sidedly, or nil.
func (s *sender) openRDMA() ramSink {
	w, ok := s.raw.(ramWriter)
	if !ok {
		return nil
	}
	s.stats.RDMAProvider = w.Provider()
	return &rdmaSink{ctx: s.m.ioCtx, enc: s.enc, w: w}
}

func (k *rdmaSink) begin(final bool) error {
	if final {
		return k.enc.BeginRAMEnd()
	}
	return k.enc.BeginRAMPart()
}

func (k *rdmaSink) put(b *guest.Block, p int, zero bool) (int, error) {
	off := uint64(p) * uint64(b.PageSize)
	if zero {
		return 9, k.w.WriteZero(k.ctx, b.Name, off, uint64(b.PageSize))
	}
	return b.PageSize, k.w.WriteRAM(k.ctx, b.Name, off, b.Page(p))
}

func (k *rdmaSink) boundary() error { return k.enc.CloseRAMSection() }

func (k *rdmaSink) end(bool) error {
	if err := k.enc.CloseRAMSection(); err != nil {
		return err
	}
	if err := k.enc.Flush(); err != nil {
		return err
	}
	return k.w.SyncRAM(k.ctx)
}

func (k *rdmaSink) sent() uint64  { return k.w.RAMBytes() }
func (k *rdmaSink) zeros() uint64 { return 0 }
func (k *rdmaSink) close() error  { return nil }

// dialWithRAM is Options.Dial's default: base (the zero Config when nil)
// with the guest's RAM and the frozen rdma-pin-all added, so that a
// transport writing RAM one-sidedly (rdma:) knows what to register and
// whether to pin it all; byte-stream transports ignore both.
func dialWithRAM(c *machine.Controller, g guest.Guest, base *transport.Config) func(context.Context, transport.Addr) (transport.Conn, error) {
	return func(ctx context.Context, a transport.Addr) (transport.Conn, error) {
		var cfg transport.Config
		if base != nil {
			cfg = *base
		}
		for _, b := range g.Blocks() {
			cfg.RAM = append(cfg.RAM, transport.RAMBlock{Name: b.Name, Mem: b.Mem})
		}
		if frozen, ok := c.Frozen(spec.Outgoing); ok {
			cfg.PinRAM = frozen.Caps["rdma-pin-all"]
		}
		return cfg.Dial(ctx, a)
	}
}
