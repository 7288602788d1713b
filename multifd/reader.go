package multifd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/migctl/migctl/stream"
)

// DefaultMaxZstdWindow bounds the zstd window a Reader accepts: 32 MiB
// covers every multifd-zstd-level QEMU allows (level 20 uses windowLog 25).
const DefaultMaxZstdWindow = 32 << 20

// readerBufSize is the Reader's read buffer.
const readerBufSize = 256 << 10

// Limits is what a Reader accepts on one channel. The zero value of a field
// means its default.
type Limits struct {
	// PageSize is the target page size (stream.DefaultPageSize if 0). The
	// header size depends on it, so it must be the sender's.
	PageSize uint64
	// Blocks maps the destination's RAM blocks to their sizes (as announced
	// in the main channel's MEM_SIZE record). A packet must name one of them
	// and every offset must lie inside it. If nil, any non-empty name is
	// accepted and offsets are only checked for alignment: the mode for
	// tools.
	Blocks map[string]uint64
	// Compression is this destination's multifd-compression; a packet
	// carrying another method fails with reason ErrCompression.
	Compression Compression
	// Layout is the sender's header layout.
	Layout Layout
	// MaxPayload bounds next_packet_size of a compressed packet (MaxPayload
	// if 0).
	MaxPayload int
	// MaxZstdWindow bounds the zstd window (DefaultMaxZstdWindow if 0).
	MaxZstdWindow uint64
}

func (l Limits) normalize() (Limits, error) {
	if l.PageSize == 0 {
		l.PageSize = stream.DefaultPageSize
	}
	if !validPageSize(l.PageSize) {
		return l, fmt.Errorf("%w: Limits.PageSize %d is not a power of two between 1 KiB and %d", ErrInvalid, l.PageSize, PacketSize)
	}
	if !l.Compression.valid() {
		return l, fmt.Errorf("%w: Limits.Compression %v", ErrInvalid, l.Compression)
	}
	if l.Layout > LayoutQEMU72 {
		return l, fmt.Errorf("%w: Limits.Layout %v", ErrInvalid, l.Layout)
	}
	if l.MaxPayload <= 0 {
		l.MaxPayload = MaxPayload
	}
	if l.MaxZstdWindow == 0 {
		l.MaxZstdWindow = DefaultMaxZstdWindow
	}
	return l, nil
}

// ReadInit reads and parses the 64-byte initial packet that opens a multifd
// connection. The caller checks it with Init.Check and hands the connection
// to the Reader of that channel.
func ReadInit(r io.Reader) (Init, error) {
	var b [InitSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return Init{}, &DecodeError{Channel: -1, Offset: 0, Class: stream.ErrCorrupt,
				Detail: "connection ends inside the initial packet", Err: io.ErrUnexpectedEOF}
		}
		return Init{}, fmt.Errorf("multifd: reading the initial packet: %w", err)
	}
	return ParseInit(b[:])
}

// ReaderStats counts what a Reader has decoded.
type ReaderStats struct {
	Bytes     uint64 // channel bytes consumed (after the initial packet)
	Packets   uint64 // packet headers, sync packets included
	Syncs     uint64 // packets with FlagSync
	Pages     uint64 // normal pages read or skipped
	ZeroPages uint64 // zero page entries
}

// Reader decodes the page packets of one multifd channel, after its initial
// packet. Next returns each header, checked against the Limits; when it lists
// normal pages the caller then reads them with ReadPages (straight into guest
// memory: one copy for "none", one decompression otherwise) or discards them
// with SkipPages. Zero pages are only listed (Header.Zero): QEMU clears such
// a page only if it was received before, else it just marks it received.
//
// A Reader is owned by one goroutine; Stats may be called from any. Errors
// are sticky. Close releases the decompressor.
type Reader struct {
	br   *bufio.Reader
	lim  Limits
	ch   int
	ppp  int
	hsz  int
	mask uint32
	dec  decompressor

	err     error
	off     int64
	pending bool // normal pages of the last header not read yet

	hdrBuf  []byte
	hdr     Header
	normal  []uint64
	zero    []uint64
	payload []byte
	scratch []byte

	bytes, packets, syncs, pages, zeros atomic.Uint64
}

// NewReader returns a Reader for channel ch reading r (through a 256 KiB
// buffer), positioned after the initial packet.
func NewReader(r io.Reader, ch int, lim Limits) (*Reader, error) {
	l, err := lim.normalize()
	if err != nil {
		return nil, err
	}
	ppp := PagesPerPacket(l.PageSize)
	return &Reader{
		br:     bufio.NewReaderSize(r, readerBufSize),
		lim:    l,
		ch:     ch,
		ppp:    ppp,
		hsz:    HeaderSize(l.PageSize),
		mask:   l.Layout.compressionMask(),
		dec:    newDecompressor(l.Compression, l.MaxZstdWindow),
		hdrBuf: make([]byte, HeaderSize(l.PageSize)),
		normal: make([]uint64, 0, ppp),
		zero:   make([]uint64, 0, ppp),
	}, nil
}

// Stats returns the counters so far; safe from any goroutine.
func (r *Reader) Stats() ReaderStats {
	return ReaderStats{Bytes: r.bytes.Load(), Packets: r.packets.Load(), Syncs: r.syncs.Load(),
		Pages: r.pages.Load(), ZeroPages: r.zeros.Load()}
}

// Close releases the decompressor. The Reader is unusable afterwards.
func (r *Reader) Close() {
	if r.dec != nil {
		r.dec.close()
		r.dec = nil
	}
	if r.err == nil {
		r.err = errors.New("multifd: Reader closed")
	}
}

func (r *Reader) readFull(p []byte, what string) error {
	n, err := io.ReadFull(r.br, p)
	r.off += int64(n)
	r.bytes.Add(uint64(n))
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return &DecodeError{Channel: r.ch, Offset: r.off, Class: stream.ErrCorrupt,
				Detail: "channel ends inside " + what, Err: io.ErrUnexpectedEOF}
		}
		return fmt.Errorf("multifd channel %d: reading %s at byte %d: %w", r.ch, what, r.off, err)
	}
	return nil
}

// Next reads the next packet header. It returns io.EOF when the channel ends
// cleanly between packets. The Header and its slices are valid until the
// next call. Call ReadPages or SkipPages before Next when the header lists
// normal pages.
func (r *Reader) Next() (*Header, error) {
	if r.err != nil {
		return nil, r.err
	}
	if r.pending {
		return nil, fmt.Errorf("%w: Next called before ReadPages or SkipPages consumed the pending pages", ErrInvalid)
	}
	h, err := r.next()
	if err != nil {
		r.err = err
		return nil, err
	}
	return h, nil
}

func (r *Reader) next() (*Header, error) {
	pos := r.off
	// The first 12 bytes (magic, version, flags) say which header follows.
	n, err := io.ReadFull(r.br, r.hdrBuf[:12])
	r.off += int64(n)
	r.bytes.Add(uint64(n))
	if err == io.EOF {
		return nil, io.EOF
	}
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, &DecodeError{Channel: r.ch, Offset: r.off, Class: stream.ErrCorrupt,
				Detail: "channel ends inside a packet header", Err: io.ErrUnexpectedEOF}
		}
		return nil, fmt.Errorf("multifd channel %d: reading a packet header at byte %d: %w", r.ch, r.off, err)
	}
	b := r.hdrBuf
	if m := binary.BigEndian.Uint32(b); m != Magic {
		return nil, corrupt(pos, r.ch, nil, "packet magic %#08x, want %#08x", m, Magic)
	}
	if v := binary.BigEndian.Uint32(b[4:]); v != Version {
		return nil, unsupported(pos, r.ch, "packet version %d, only %d is known", v, Version)
	}
	flags := binary.BigEndian.Uint32(b[8:])
	if flags&FlagDeviceState != 0 {
		return nil, unsupported(pos, r.ch, "device-state packet (flags %#x): VFIO device state over multifd is not supported", flags)
	}
	if flags&^(FlagSync|r.mask) != 0 {
		return nil, corrupt(pos, r.ch, nil, "packet flags %#x carry bits unknown to a %v sender", flags, r.lim.Layout)
	}
	if err := r.readFull(b[12:r.hsz], "a packet header"); err != nil {
		return nil, err
	}
	alloc := binary.BigEndian.Uint32(b[12:])
	nNormal := binary.BigEndian.Uint32(b[16:])
	size := binary.BigEndian.Uint32(b[20:])
	num := binary.BigEndian.Uint64(b[24:])
	var nZero uint32
	if r.lim.Layout == LayoutCurrent {
		nZero = binary.BigEndian.Uint32(b[32:])
	}
	switch {
	case alloc > uint32(r.ppp):
		return nil, tooLarge(pos, r.ch, "packet capacity %d pages, a packet holds at most %d at page size %d", alloc, r.ppp, r.lim.PageSize)
	case nNormal > alloc:
		return nil, corrupt(pos, r.ch, nil, "packet lists %d normal pages, its capacity is %d", nNormal, alloc)
	case nZero > alloc-nNormal:
		return nil, corrupt(pos, r.ch, nil, "packet lists %d zero pages after %d normal ones, its capacity is %d", nZero, nNormal, alloc)
	}
	// The compression bits are set only by the method's prepare step, which
	// runs for packets with pages: a sync or empty packet carries 0 (both
	// 7.2 and current QEMU, whose receivers check the bits only when a
	// packet has pages).
	if c := flags & r.mask; c != r.lim.Compression.Flag() && (c != FlagNoComp || nNormal+nZero > 0) {
		return nil, mismatch(pos, r.ch, ErrCompression, "packet compressed with method %s, this destination's multifd-compression is %v: set the same on both sides",
			compressionName(c), r.lim.Compression)
	}
	h := &r.hdr
	*h = Header{Flags: flags, PagesAlloc: alloc, NextPacketSize: size, PacketNum: num}
	r.normal, r.zero = r.normal[:0], r.zero[:0]
	ps := r.lim.PageSize
	if nNormal == 0 {
		// 7.2 leaves next_packet_size (and the name) of the previous packet
		// in a packet without pages; current QEMU sends 0.
		if r.lim.Layout == LayoutCurrent && size != 0 {
			return nil, corrupt(pos, r.ch, nil, "packet without normal pages announces %d payload bytes", size)
		}
	} else if r.lim.Compression == CompressionNone {
		if uint64(size) != uint64(nNormal)*ps {
			return nil, corrupt(pos, r.ch, nil, "packet of %d pages announces %d payload bytes, want %d", nNormal, size, uint64(nNormal)*ps)
		}
	} else if size == 0 || int64(size) > int64(r.lim.MaxPayload) {
		if size == 0 {
			return nil, corrupt(pos, r.ch, nil, "compressed packet of %d pages has an empty payload", nNormal)
		}
		return nil, tooLarge(pos, r.ch, "compressed payload of %d bytes, limit %d", size, r.lim.MaxPayload)
	}
	if nNormal+nZero > 0 {
		name := b[64 : 64+MaxBlockName] // byte 255 is forced to NUL, as QEMU does
		if i := indexNUL(name); i >= 0 {
			name = name[:i]
		}
		if len(name) == 0 {
			return nil, corrupt(pos+64, r.ch, nil, "packet of %d pages names no RAM block", nNormal+nZero)
		}
		h.Block = string(name)
		bsize, known := r.lim.Blocks[h.Block]
		if !known && r.lim.Blocks != nil {
			return nil, &DecodeError{Channel: r.ch, Offset: pos + 64, Class: stream.ErrMismatch, Reason: stream.ErrUnknownBlock, Block: h.Block,
				Detail: fmt.Sprintf("packet names RAM block %q, which this destination does not have", h.Block)}
		}
		for i := range nNormal + nZero {
			o := binary.BigEndian.Uint64(b[FixedHeaderSize+8*int(i):])
			if o&(ps-1) != 0 {
				return nil, &DecodeError{Channel: r.ch, Offset: pos + FixedHeaderSize + 8*int64(i), Class: stream.ErrCorrupt, Reason: stream.ErrUnaligned, Block: h.Block,
					Detail: fmt.Sprintf("page offset %#x in %q is not a multiple of the page size %#x", o, h.Block, ps)}
			}
			if known && (o >= bsize || bsize-o < ps) {
				return nil, &DecodeError{Channel: r.ch, Offset: pos + FixedHeaderSize + 8*int64(i), Class: stream.ErrCorrupt, Reason: stream.ErrPageOutside, Block: h.Block,
					Detail: fmt.Sprintf("page at %#x outside block %q (size %#x)", o, h.Block, bsize)}
			}
			if i < nNormal {
				r.normal = append(r.normal, o)
			} else {
				r.zero = append(r.zero, o)
			}
		}
	}
	h.Normal, h.Zero = r.normal, r.zero
	r.packets.Add(1)
	if flags&FlagSync != 0 {
		r.syncs.Add(1)
	}
	r.zeros.Add(uint64(nZero))
	r.pending = nNormal > 0
	return h, nil
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

func compressionName(flag uint32) string {
	switch flag {
	case FlagNoComp:
		return "none"
	case FlagZlib:
		return "zlib"
	case FlagZstd:
		return "zstd"
	case FlagQPL:
		return "qpl"
	case FlagUADK:
		return "uadk"
	case FlagQATzip:
		return "qatzip"
	}
	return fmt.Sprintf("%#x", flag)
}

// ReadPages reads the pending packet's normal pages: page i (at offset
// Header.Normal[i]) goes to dst(i, offset), which must return exactly one
// page of memory (typically guest RAM at that offset).
func (r *Reader) ReadPages(dst func(i int, offset uint64) []byte) error {
	if r.err != nil {
		return r.err
	}
	if !r.pending {
		return fmt.Errorf("%w: ReadPages with no pages pending", ErrInvalid)
	}
	ps := r.lim.PageSize
	var bad error
	get := func(i int) []byte {
		p := dst(i, r.normal[i])
		if uint64(len(p)) != ps {
			bad = fmt.Errorf("%w: ReadPages destination for page %d is %d bytes, want %d", ErrInvalid, i, len(p), ps)
			return r.scratchPage()
		}
		return p
	}
	if err := r.readPages(get); err != nil {
		r.err = err
		return err
	}
	r.pending = false
	r.pages.Add(uint64(len(r.normal)))
	return bad
}

// SkipPages consumes the pending packet's pages without storing them (a
// compressed channel still decompresses them: its stream state needs them).
func (r *Reader) SkipPages() error {
	if r.err != nil {
		return r.err
	}
	if !r.pending {
		return fmt.Errorf("%w: SkipPages with no pages pending", ErrInvalid)
	}
	if err := r.readPages(func(int) []byte { return r.scratchPage() }); err != nil {
		r.err = err
		return err
	}
	r.pending = false
	r.pages.Add(uint64(len(r.normal)))
	return nil
}

func (r *Reader) scratchPage() []byte {
	if r.scratch == nil {
		r.scratch = make([]byte, r.lim.PageSize)
	}
	return r.scratch
}

func (r *Reader) readPages(get func(i int) []byte) error {
	n := len(r.normal)
	if r.dec == nil {
		for i := range n {
			if err := r.readFull(get(i), "page data"); err != nil {
				return err
			}
		}
		return nil
	}
	pos := r.off
	size := int(r.hdr.NextPacketSize)
	if cap(r.payload) < size {
		r.payload = make([]byte, size)
	}
	p := r.payload[:size]
	if err := r.readFull(p, "a compressed payload"); err != nil {
		return err
	}
	if err := r.dec.decompress(p, get, n); err != nil {
		return &DecodeError{Channel: r.ch, Offset: pos, Class: stream.ErrCorrupt, Block: r.hdr.Block,
			Detail: fmt.Sprintf("%v payload of packet %d (%d pages, %d bytes) does not decode", r.lim.Compression, r.hdr.PacketNum, n, size), Err: err}
	}
	return nil
}
