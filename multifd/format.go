package multifd

import (
	"encoding/binary"
	"fmt"
)

// Wire constants (QEMU migration/multifd.h and multifd.c).
const (
	// Magic opens the initial packet and every page packet of a channel.
	Magic = 0x11223344
	// Version is the only packet version QEMU writes and accepts.
	Version = 1
	// InitSize is the size of the initial packet (MultiFDInit_t).
	InitSize = 64
	// PacketSize is MULTIFD_PACKET_SIZE: the page data one packet can carry
	// (before compression), so a packet holds PacketSize/page size pages.
	PacketSize = 512 << 10
	// FixedHeaderSize is the size of a page packet header before its offset
	// array (MultiFDPacket_t without offset[]).
	FixedHeaderSize = 320
	// BlockNameSize is the size of the NUL-padded RAM block name field.
	BlockNameSize = 256
	// MaxBlockName is the longest block name a header carries: QEMU forces
	// the last byte of the field to NUL.
	MaxBlockName = BlockNameSize - 1
	// MaxPayload is the default bound on next_packet_size for compressed
	// packets: QEMU's receive buffer (twice PacketSize).
	MaxPayload = 2 * PacketSize
	// deviceStateHeaderSize is MultiFDPacketDeviceState_t (QEMU >= 10.0).
	deviceStateHeaderSize = 276
)

// Packet flags (the be32 at offset 8 of a packet header).
const (
	// FlagSync marks a sync packet: the channel has sent everything of the
	// current pass (see the package doc).
	FlagSync = 0x01
	// FlagCompressionMask covers the compression method of current QEMU
	// (5 bits at bit 1). QEMU 7.2 reserves 3 bits (FlagCompressionMask72).
	FlagCompressionMask   = 0x3e
	FlagCompressionMask72 = 0x0e
	FlagNoComp            = 0x00
	FlagZlib              = 0x02
	FlagZstd              = 0x04
	FlagQPL               = 0x08 // Intel QPL (QEMU >= 9.1): not supported
	FlagUADK              = 0x10 // Huawei UADK (QEMU >= 9.1): not supported
	FlagQATzip            = 0x20 // Intel QATzip (QEMU >= 9.2): not supported
	// FlagDeviceState marks a device-state packet (QEMU >= 10.0, VFIO):
	// another header layout, not supported.
	FlagDeviceState = 0x40

	knownFlags = FlagSync | FlagCompressionMask | FlagDeviceState
)

// Layout selects the packet header layout: which QEMU version the peer is.
type Layout uint8

const (
	// LayoutCurrent is QEMU >= 9.0: zero_pages at offset 32, zero page
	// offsets after the normal ones, a 5-bit compression field, sync packets
	// without pages and every size field exact.
	LayoutCurrent Layout = iota
	// LayoutQEMU72 is QEMU 7.2 (and up to 8.2): the be32 at offset 32 is
	// reserved (no zero pages in packets: zero pages travel as ZERO records
	// on the main channel), a 3-bit compression field, a sync packet may
	// carry pages, and a packet without pages carries a stale
	// next_packet_size (and block name) that the receiver must ignore.
	LayoutQEMU72
)

// String returns "current" or "qemu-7.2".
func (l Layout) String() string {
	switch l {
	case LayoutCurrent:
		return "current"
	case LayoutQEMU72:
		return "qemu-7.2"
	}
	return fmt.Sprintf("layout(%d)", uint8(l))
}

func (l Layout) compressionMask() uint32 {
	if l == LayoutQEMU72 {
		return FlagCompressionMask72
	}
	return FlagCompressionMask
}

// Compression is a multifd-compression method.
type Compression uint8

// Methods migctl implements. Their values are QEMU's QAPI enum order.
const (
	CompressionNone Compression = iota
	CompressionZlib
	CompressionZstd
)

// ParseCompression maps QEMU's parameter value ("none", "zlib", "zstd") to
// a Compression.
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "none":
		return CompressionNone, nil
	case "zlib":
		return CompressionZlib, nil
	case "zstd":
		return CompressionZstd, nil
	case "qpl", "uadk", "qatzip":
		return 0, fmt.Errorf("multifd: compression %q needs an accelerator migctl does not drive: use none, zlib or zstd", s)
	}
	return 0, fmt.Errorf("multifd: unknown compression %q: use none, zlib or zstd", s)
}

// String returns QEMU's name: "none", "zlib" or "zstd".
func (c Compression) String() string {
	switch c {
	case CompressionNone:
		return "none"
	case CompressionZlib:
		return "zlib"
	case CompressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("compression(%d)", uint8(c))
}

// Flag returns the compression bits of the packet flags.
func (c Compression) Flag() uint32 {
	switch c {
	case CompressionZlib:
		return FlagZlib
	case CompressionZstd:
		return FlagZstd
	}
	return FlagNoComp
}

func (c Compression) valid() bool { return c <= CompressionZstd }

// Levels: QEMU's multifd-zlib-level is 0..9 and multifd-zstd-level 0..20,
// both default 1.
const (
	DefaultLevel = 1
	MaxZlibLevel = 9
	MaxZstdLevel = 20
)

// CheckLevel reports whether level is valid for c (QEMU's ranges).
func CheckLevel(c Compression, level int) error {
	max := 0
	switch c {
	case CompressionZlib:
		max = MaxZlibLevel
	case CompressionZstd:
		max = MaxZstdLevel
	default:
		return nil
	}
	if level < 0 || level > max {
		return fmt.Errorf("multifd: %v level %d outside QEMU's range 0..%d", c, level, max)
	}
	return nil
}

// PagesPerPacket is how many pages a packet holds for a page size
// (MULTIFD_PACKET_SIZE / page size): 128 for 4 KiB pages.
func PagesPerPacket(pageSize uint64) int { return int(PacketSize / pageSize) }

// HeaderSize is the on-wire size of every page packet header for a page
// size: the fixed part plus a full offset array (1344 bytes for 4 KiB
// pages). QEMU always sends the whole array, used or not, so both sides must
// agree on the page size.
func HeaderSize(pageSize uint64) int { return FixedHeaderSize + 8*PagesPerPacket(pageSize) }

// validPageSize: a power of two from 1 KiB (every RAM flag fits below it) up
// to PacketSize.
func validPageSize(n uint64) bool {
	return n >= 1024 && n <= PacketSize && n&(n-1) == 0
}

// Init is the initial packet that opens every multifd connection
// (MultiFDInit_t, 64 bytes, big-endian):
//
//	off size
//	  0 be32  magic 0x11223344
//	  4 be32  version 1
//	  8 16    VM UUID (qemu_uuid; all zero unless QEMU runs with -uuid)
//	 24 u8    channel id (0..multifd-channels-1)
//	 25 7     reserved, zero
//	 32 4x8   reserved, zero
type Init struct {
	UUID    [16]byte
	Channel uint8
}

// AppendBinary appends the 64-byte initial packet to b.
func (in Init) AppendBinary(b []byte) ([]byte, error) {
	b = binary.BigEndian.AppendUint32(b, Magic)
	b = binary.BigEndian.AppendUint32(b, Version)
	b = append(b, in.UUID[:]...)
	b = append(b, in.Channel)
	return append(b, make([]byte, 7+32)...), nil
}

// MarshalBinary returns the 64-byte initial packet.
func (in Init) MarshalBinary() ([]byte, error) { return in.AppendBinary(make([]byte, 0, InitSize)) }

// ParseInit decodes a 64-byte initial packet. It checks the magic, the
// version and (as QEMU does not) that the reserved bytes are zero. The
// caller checks the UUID and the channel id against its own (Init.Check).
func ParseInit(b []byte) (Init, error) {
	var in Init
	if len(b) != InitSize {
		return in, corrupt(-1, -1, nil, "initial packet of %d bytes, want %d", len(b), InitSize)
	}
	if m := binary.BigEndian.Uint32(b); m != Magic {
		return in, corrupt(-1, -1, nil, "initial packet magic %#08x, want %#08x: not a multifd channel", m, Magic)
	}
	if v := binary.BigEndian.Uint32(b[4:]); v != Version {
		return in, unsupported(-1, -1, "initial packet version %d, only %d is known", v, Version)
	}
	copy(in.UUID[:], b[8:24])
	in.Channel = b[24]
	for i, c := range b[25:] {
		if c != 0 {
			return in, corrupt(-1, -1, nil, "initial packet reserved byte %d is %#02x, want 0", 25+i, c)
		}
	}
	return in, nil
}

// Check compares an initial packet with what this destination expects: the
// same VM UUID and a channel id below the channel count. (QEMU 7.2 accepts
// id == channels, an off-by-one; migctl does not.)
func (in Init) Check(uuid [16]byte, channels int) error {
	if in.UUID != uuid {
		return mismatch(-1, int(in.Channel), nil, "channel %d carries VM UUID %x, this destination's is %x: the source migrates another VM", in.Channel, in.UUID, uuid)
	}
	if int(in.Channel) >= channels {
		return mismatch(-1, int(in.Channel), nil, "channel id %d, but multifd-channels is %d here: set the same multifd-channels on both sides", in.Channel, channels)
	}
	return nil
}

// Header is a page packet header (MultiFDPacket_t, big-endian), as QEMU
// lays it out:
//
//	off size   field            current QEMU (>= 9.0)          QEMU 7.2
//	  0 be32   magic            0x11223344
//	  4 be32   version          1
//	  8 be32   flags            SYNC 0x01, compression 0x3e    compression 0x0e
//	 12 be32   pages_alloc      page capacity (128 at 4 KiB)   same
//	 16 be32   normal_pages     pages whose data follows       same
//	 20 be32   next_packet_size payload bytes after the header same; stale if no pages
//	 24 be64   packet_num       one counter across channels    same
//	 32 be32   zero_pages       zero pages listed after normal reserved (0)
//	 36 be32   reserved
//	 40 3xbe64 reserved
//	 64 256    ramblock         idstr, NUL padded (byte 255 forced to NUL)
//	320 be64[] offset           pages_alloc' entries: normal_pages offsets, then zero_pages
//
// The offset array is always sent whole: HeaderSize(page size) bytes in all,
// unused entries zero. A sync packet of current QEMU has pages_alloc 0, no
// pages and no block name.
type Header struct {
	Flags          uint32
	PagesAlloc     uint32
	NextPacketSize uint32
	PacketNum      uint64
	Block          string
	// Normal and Zero are the byte offsets in Block of the pages whose data
	// follows and of the zero pages. A decoded Header's slices belong to the
	// Reader and are valid until its next Next.
	Normal []uint64
	Zero   []uint64
}

// Sync reports whether the header has FlagSync.
func (h *Header) Sync() bool { return h.Flags&FlagSync != 0 }

// AppendHeader appends h in layout l, padded to HeaderSize(pageSize) bytes.
// It checks what a QEMU receiver checks (counts within the capacity, a name
// that fits) and that LayoutQEMU72 has no zero pages. Offsets are not checked
// here: the Writer checks them against its blocks.
func AppendHeader(b []byte, h *Header, pageSize uint64, l Layout) ([]byte, error) {
	if !validPageSize(pageSize) {
		return b, fmt.Errorf("%w: page size %d is not a power of two between 1 KiB and %d", ErrInvalid, pageSize, PacketSize)
	}
	ppp := PagesPerPacket(pageSize)
	n := len(h.Normal) + len(h.Zero)
	switch {
	case h.PagesAlloc > uint32(ppp):
		return b, fmt.Errorf("%w: pages_alloc %d exceeds the %d pages of a packet", ErrInvalid, h.PagesAlloc, ppp)
	case n > int(h.PagesAlloc):
		return b, fmt.Errorf("%w: %d pages in a packet of capacity %d", ErrInvalid, n, h.PagesAlloc)
	case len(h.Block) > MaxBlockName:
		return b, fmt.Errorf("%w: block name of %d bytes, at most %d fit", ErrInvalid, len(h.Block), MaxBlockName)
	case l == LayoutQEMU72 && len(h.Zero) > 0:
		return b, fmt.Errorf("%w: QEMU 7.2 packets cannot list zero pages: send them as ZERO records on the main channel", ErrInvalid)
	case h.Flags&^knownFlags != 0 || h.Flags&FlagDeviceState != 0:
		return b, fmt.Errorf("%w: flags %#x", ErrInvalid, h.Flags)
	}
	start := len(b)
	b = binary.BigEndian.AppendUint32(b, Magic)
	b = binary.BigEndian.AppendUint32(b, Version)
	b = binary.BigEndian.AppendUint32(b, h.Flags)
	b = binary.BigEndian.AppendUint32(b, h.PagesAlloc)
	b = binary.BigEndian.AppendUint32(b, uint32(len(h.Normal)))
	b = binary.BigEndian.AppendUint32(b, h.NextPacketSize)
	b = binary.BigEndian.AppendUint64(b, h.PacketNum)
	b = binary.BigEndian.AppendUint32(b, uint32(len(h.Zero))) // reserved (0) in 7.2
	b = append(b, make([]byte, 4+24)...)
	b = append(b, h.Block...)
	b = append(b, make([]byte, BlockNameSize-len(h.Block))...)
	for _, o := range h.Normal {
		b = binary.BigEndian.AppendUint64(b, o)
	}
	for _, o := range h.Zero {
		b = binary.BigEndian.AppendUint64(b, o)
	}
	return append(b, make([]byte, HeaderSize(pageSize)-(len(b)-start))...), nil
}
