package multifd

import (
	"fmt"
	"io"
	"net"
	"sync/atomic"

	"github.com/migctl/migctl/stream"
)

// WriterOptions configure a channel Writer.
type WriterOptions struct {
	// PageSize is the target page size (stream.DefaultPageSize if 0).
	PageSize uint64
	// Blocks are the RAM blocks (name to size) pages may come from; every
	// offset is checked against them.
	Blocks map[string]uint64
	// Compression and Level are multifd-compression and its
	// multifd-zlib-level / multifd-zstd-level (QEMU's default is 1).
	Compression Compression
	Level       int
	// Layout is the header layout the destination expects: LayoutQEMU72
	// for a QEMU 7.2 destination (no zero pages in packets).
	Layout Layout
}

// Batch is one packet's worth of pages of one RAM block, as the page scanner
// hands it to a channel.
type Batch struct {
	// Num is the packet_num: QEMU numbers packets with one counter shared by
	// every channel (incremented when a channel fills a header), so the
	// caller passes the next value of its shared counter.
	Num uint64
	// Block is the RAM block of every page.
	Block string
	// Normal are the offsets of the pages whose bytes are sent; Pages[i] is
	// the page at Normal[i] (exactly one page each, typically guest RAM).
	Normal []uint64
	Pages  [][]byte
	// Zero are the offsets of pages sent as zero entries (LayoutCurrent only).
	Zero []uint64
	// Sync also marks the packet as the channel's sync packet (what QEMU <
	// 9.0 did). Current QEMU sends sync packets without pages: see
	// Writer.WriteSync.
	Sync bool
}

// WriterStats counts what a Writer has sent.
type WriterStats struct {
	Bytes     uint64 // bytes written, initial packet included
	Packets   uint64 // packets (sync packets included)
	Pages     uint64 // normal pages
	ZeroPages uint64 // zero entries
	Payload   uint64 // payload bytes (compressed size when compressing)
}

// Writer writes one multifd channel: the initial packet, then page packets
// and sync packets, laid out as QEMU does. It is owned by one goroutine (one
// per channel); Stats may be called from any goroutine. A write error is
// sticky.
type Writer struct {
	w    io.Writer
	o    WriterOptions
	ppp  int
	comp compressor
	err  error

	hdr  []byte
	bufs net.Buffers
	vec  [][]byte

	bytes, packets, pages, zeros, payload atomic.Uint64
}

// NewWriter returns a Writer on w (a connection: its writes go out with
// writev when w is a *net.TCPConn or *net.UnixConn).
func NewWriter(w io.Writer, o WriterOptions) (*Writer, error) {
	if o.PageSize == 0 {
		o.PageSize = stream.DefaultPageSize
	}
	if !validPageSize(o.PageSize) {
		return nil, fmt.Errorf("%w: page size %d", ErrInvalid, o.PageSize)
	}
	if !o.Compression.valid() || o.Layout > LayoutQEMU72 {
		return nil, fmt.Errorf("%w: compression %v, layout %v", ErrInvalid, o.Compression, o.Layout)
	}
	comp, err := newCompressor(o.Compression, o.Level, o.PageSize)
	if err != nil {
		return nil, err
	}
	ppp := PagesPerPacket(o.PageSize)
	return &Writer{w: w, o: o, ppp: ppp, comp: comp,
		hdr: make([]byte, 0, HeaderSize(o.PageSize)), vec: make([][]byte, 0, ppp+1)}, nil
}

// Stats returns the counters so far.
func (w *Writer) Stats() WriterStats {
	return WriterStats{Bytes: w.bytes.Load(), Packets: w.packets.Load(), Pages: w.pages.Load(),
		ZeroPages: w.zeros.Load(), Payload: w.payload.Load()}
}

// Close releases the compressor. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.comp != nil {
		err := w.comp.close()
		w.comp = nil
		return err
	}
	return nil
}

func (w *Writer) send(bufs ...[]byte) error {
	w.bufs = append(w.bufs[:0], bufs...)
	n, err := w.bufs.WriteTo(w.w)
	w.bytes.Add(uint64(n))
	if err != nil {
		w.err = fmt.Errorf("multifd: write: %w", err)
	}
	return w.err
}

// WriteInit writes the initial packet.
func (w *Writer) WriteInit(in Init) error {
	if w.err != nil {
		return w.err
	}
	b, _ := in.AppendBinary(make([]byte, 0, InitSize))
	return w.send(b)
}

// Write sends one page packet: header, then the pages (raw, or the
// compressed payload). It checks the batch first (one block, at most a
// packet of pages, offsets aligned and inside the block, Pages matching
// Normal) and writes nothing if it is invalid.
func (w *Writer) Write(b *Batch) error {
	if w.err != nil {
		return w.err
	}
	if err := w.check(b); err != nil {
		return err
	}
	flags := w.o.Compression.Flag()
	if b.Sync {
		flags |= FlagSync
	}
	h := Header{Flags: flags, PagesAlloc: uint32(w.ppp), PacketNum: b.Num, Block: b.Block, Normal: b.Normal, Zero: b.Zero}
	var payload []byte
	if len(b.Normal) > 0 {
		if w.comp == nil {
			h.NextPacketSize = uint32(uint64(len(b.Normal)) * w.o.PageSize)
		} else {
			p, err := w.comp.compress(b.Pages)
			if err != nil {
				w.err = fmt.Errorf("multifd: %v: %w", w.o.Compression, err)
				return w.err
			}
			if len(p) > MaxPayload {
				w.err = fmt.Errorf("multifd: %v payload of %d bytes exceeds QEMU's receive buffer of %d", w.o.Compression, len(p), MaxPayload)
				return w.err
			}
			payload = p
			h.NextPacketSize = uint32(len(p))
		}
	}
	hdr, err := AppendHeader(w.hdr[:0], &h, w.o.PageSize, w.o.Layout)
	if err != nil {
		return err
	}
	w.hdr = hdr
	vec := append(w.vec[:0], hdr)
	if w.comp == nil {
		vec = append(vec, b.Pages...)
	} else if payload != nil {
		vec = append(vec, payload)
	}
	if err := w.send(vec...); err != nil {
		return err
	}
	w.packets.Add(1)
	w.pages.Add(uint64(len(b.Normal)))
	w.zeros.Add(uint64(len(b.Zero)))
	w.payload.Add(uint64(h.NextPacketSize))
	return nil
}

// WriteSync sends a sync packet as current QEMU does: a header with
// FlagSync and no compression bits (QEMU sets those only when a packet has
// pages), no pages, pages_alloc 0 and no block name (QEMU 7.2 layout:
// pages_alloc is the packet capacity).
func (w *Writer) WriteSync(num uint64) error {
	if w.err != nil {
		return w.err
	}
	h := Header{Flags: FlagSync, PacketNum: num}
	if w.o.Layout == LayoutQEMU72 {
		h.PagesAlloc = uint32(w.ppp)
	}
	hdr, err := AppendHeader(w.hdr[:0], &h, w.o.PageSize, w.o.Layout)
	if err != nil {
		return err
	}
	w.hdr = hdr
	if err := w.send(hdr); err != nil {
		return err
	}
	w.packets.Add(1)
	return nil
}

func (w *Writer) check(b *Batch) error {
	ps := w.o.PageSize
	n := len(b.Normal) + len(b.Zero)
	switch {
	case n == 0:
		return fmt.Errorf("%w: a batch without pages (use WriteSync for a sync packet)", ErrInvalid)
	case n > w.ppp:
		return fmt.Errorf("%w: batch of %d pages, a packet holds %d", ErrInvalid, n, w.ppp)
	case len(b.Pages) != len(b.Normal):
		return fmt.Errorf("%w: %d page buffers for %d normal offsets", ErrInvalid, len(b.Pages), len(b.Normal))
	case w.o.Layout == LayoutQEMU72 && len(b.Zero) > 0:
		return fmt.Errorf("%w: a QEMU 7.2 destination cannot take zero entries: send zero pages as ZERO records on the main channel", ErrInvalid)
	case b.Block == "" || len(b.Block) > MaxBlockName:
		return fmt.Errorf("%w: block name %q must have 1..%d bytes", ErrInvalid, b.Block, MaxBlockName)
	}
	size, ok := w.o.Blocks[b.Block]
	if !ok {
		return fmt.Errorf("%w: unknown RAM block %q", ErrInvalid, b.Block)
	}
	for i, p := range b.Pages {
		if uint64(len(p)) != ps {
			return fmt.Errorf("%w: page %d is %d bytes, want %d", ErrInvalid, i, len(p), ps)
		}
	}
	for _, offs := range [][]uint64{b.Normal, b.Zero} {
		for _, o := range offs {
			if o&(ps-1) != 0 || o >= size || size-o < ps {
				return fmt.Errorf("%w: offset %#x is not a page inside block %q (size %#x)", ErrInvalid, o, b.Block, size)
			}
		}
	}
	return nil
}
