// Package control encodes and decodes QEMU's RDMA migration control
// messages (migration/rdma.c): the 16-byte RDMAControlHeader and the payloads
// of READY, QEMU_FILE, RAM_BLOCKS_REQUEST/RESULT, COMPRESS,
// REGISTER_REQUEST/RESULT, REGISTER_FINISHED, UNREGISTER_REQUEST/FINISHED and
// ERROR, plus the RDMACapabilities connection private data. Every integer is
// big-endian; every length read is bounded before use.
//
// Two documented extensions, both ignored or absent in QEMU's own use:
//   - ERROR may carry a UTF-8 reason (QEMU sends len 0: "peer failed").
//   - RAM_BLOCKS_REQUEST may carry the requester's block names (counted
//     strings) so the answer comes in the requester's block order; QEMU sends
//     len 0 and learns the order from the MEM_SIZE record of the stream.
package control

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Type is a control message type (RDMAControlHeader.type).
type Type uint32

// Control message types, numbered as in QEMU.
const (
	TypeNone               Type = 0
	TypeError              Type = 1
	TypeReady              Type = 2
	TypeQEMUFile           Type = 3
	TypeRAMBlocksRequest   Type = 4
	TypeRAMBlocksResult    Type = 5
	TypeCompress           Type = 6
	TypeRegisterRequest    Type = 7
	TypeRegisterResult     Type = 8
	TypeRegisterFinished   Type = 9
	TypeUnregisterRequest  Type = 10
	TypeUnregisterFinished Type = 11
)

var typeNames = [...]string{"NONE", "ERROR", "READY", "QEMU FILE", "RAM BLOCKS REQUEST", "RAM BLOCKS RESULT",
	"COMPRESS", "REGISTER REQUEST", "REGISTER RESULT", "REGISTER FINISHED", "UNREGISTER REQUEST", "UNREGISTER FINISHED"}

func (t Type) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint32(t))
}

// Sizes and limits, from migration/rdma.c and the errata of qemu-wire.md §9.
const (
	HeaderSize              = 16        // RDMAControlHeader: be32 len, be32 type, be32 repeat, u32 padding
	MaxBuffer               = 512 << 10 // RDMA_CONTROL_MAX_BUFFER: largest SEND, header included
	MaxPayload              = MaxBuffer - HeaderSize
	MaxCommands             = 4096        // RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE: bound on repeat
	MaxQEMUFile             = 32 << 10    // RDMA_SEND_INCREMENT: QEMUFile bytes per QEMU_FILE message
	MaxBlocks               = MaxCommands // migctl's bound on RAM_BLOCKS entries
	MaxErrorReason          = 4096        // migctl's bound on an ERROR reason
	DestBlockSize           = 32          // RDMADestBlock
	CompressSize            = 24          // RDMACompress
	RegisterSize            = 24          // RDMARegister
	RegisterResultSz        = 16          // RDMARegisterResult
	CapabilitiesSize        = 8           // RDMACapabilities
	ChunkShift              = 20          // RDMA_REG_CHUNK_SHIFT
	ChunkSize               = 1 << ChunkShift
	Version                 = 1    // RDMA_CONTROL_VERSION_CURRENT
	CapPinAll        uint32 = 0x01 // RDMA_CAPABILITY_PIN_ALL
	KnownCaps               = CapPinAll
)

// ErrMalformed matches (errors.Is) every decoding error.
var ErrMalformed = errors.New("rdma control: malformed message")

// DecodeError says what was wrong with a control message.
type DecodeError struct {
	Type   Type
	Reason string
}

func (e *DecodeError) Error() string {
	return "rdma control: malformed " + e.Type.String() + " message: " + e.Reason
}

// Is makes errors.Is(err, ErrMalformed) match.
func (e *DecodeError) Is(target error) bool { return target == ErrMalformed }

func malformed(t Type, format string, args ...any) error {
	return &DecodeError{Type: t, Reason: fmt.Sprintf(format, args...)}
}

// Header is RDMAControlHeader.
type Header struct {
	Len    uint32 // payload bytes after the header
	Type   Type
	Repeat uint32 // commands of this type in the payload
}

// DestBlock is RDMADestBlock: one destination RAM block.
type DestBlock struct {
	HostAddr uint64 // the block's virtual address at the destination
	Offset   uint64 // the block's offset in the destination's ram_addr space
	Length   uint64
	RKey     uint32 // the whole block's remote key; valid only with pin-all
}

// Compress is RDMACompress: fill Length bytes at Offset (destination
// ram_addr space) of block Block with Value (always 0).
type Compress struct {
	Value  uint32
	Block  uint32
	Offset uint64
	Length uint64
}

// Reg is RDMARegister: register the chunk holding Addr (destination
// ram_addr space) of block Block and Chunks further chunks (0 = one chunk).
// In UNREGISTER_REQUEST Addr holds a chunk number instead.
type Reg struct {
	Addr   uint64
	Block  uint32
	Chunks uint64
}

// RegResult is RDMARegisterResult.
type RegResult struct {
	RKey     uint32
	HostAddr uint64 // the block's virtual address at the destination
}

// Caps is RDMACapabilities, the connection's private data.
type Caps struct {
	Version uint32
	Flags   uint32
}

// Message is a decoded control message. Exactly the fields of its Type are
// used. Decoded slices (Data) alias the buffer passed to Decode.
type Message struct {
	Type   Type
	Repeat uint32 // as received; Encode chooses QEMU's value for Type

	Data    []byte      // QEMU_FILE: the bytes
	Reason  string      // ERROR: migctl's reason (empty from QEMU)
	Names   []string    // RAM_BLOCKS_REQUEST: migctl's block order (empty from QEMU)
	Blocks  []DestBlock // RAM_BLOCKS_RESULT
	Comp    Compress    // COMPRESS
	Regs    []Reg       // REGISTER_REQUEST, UNREGISTER_REQUEST
	Results []RegResult // REGISTER_RESULT
}

var be = binary.BigEndian

// AppendHeader appends the 16 header bytes.
func AppendHeader(b []byte, h Header) []byte {
	b = be.AppendUint32(b, h.Len)
	b = be.AppendUint32(b, uint32(h.Type))
	b = be.AppendUint32(b, h.Repeat)
	return be.AppendUint32(b, 0)
}

// ParseHeader decodes a header. It checks only that 16 bytes are there.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, malformed(TypeNone, "%d bytes, a header needs %d", len(b), HeaderSize)
	}
	return Header{Len: be.Uint32(b), Type: Type(be.Uint32(b[4:])), Repeat: be.Uint32(b[8:])}, nil
}

// Append encodes m after b with the header fields QEMU uses for its type:
// repeat 1 for everything but QEMU_FILE (repeat 0, QEMU ≥ 8.2's zeroed
// header) and UNREGISTER_FINISHED (0); REGISTER_REQUEST/RESULT and
// UNREGISTER_REQUEST carry len(Regs)/len(Results) as repeat. It returns an
// error for a message that breaks a bound (the receiver would refuse it).
func Append(b []byte, m Message) ([]byte, error) {
	var h = Header{Type: m.Type, Repeat: 1}
	var p []byte
	switch m.Type {
	case TypeReady, TypeRegisterFinished:
	case TypeUnregisterFinished:
		h.Repeat = 0
	case TypeError:
		if len(m.Reason) > MaxErrorReason {
			m.Reason = m.Reason[:MaxErrorReason]
		}
		p = append(p, m.Reason...)
	case TypeQEMUFile:
		if len(m.Data) > MaxQEMUFile {
			return b, malformed(m.Type, "%d bytes, at most %d per message", len(m.Data), MaxQEMUFile)
		}
		h.Repeat = 0
		p = m.Data
	case TypeRAMBlocksRequest:
		if len(m.Names) > MaxBlocks {
			return b, malformed(m.Type, "%d names, at most %d", len(m.Names), MaxBlocks)
		}
		for _, n := range m.Names {
			if len(n) == 0 || len(n) > 255 {
				return b, malformed(m.Type, "block name %q: 1..255 bytes", n)
			}
			p = append(p, byte(len(n)))
			p = append(p, n...)
		}
	case TypeRAMBlocksResult:
		if len(m.Blocks) > MaxBlocks {
			return b, malformed(m.Type, "%d blocks, at most %d", len(m.Blocks), MaxBlocks)
		}
		for _, d := range m.Blocks {
			p = be.AppendUint64(p, d.HostAddr)
			p = be.AppendUint64(p, d.Offset)
			p = be.AppendUint64(p, d.Length)
			p = be.AppendUint32(p, d.RKey)
			p = be.AppendUint32(p, 0)
		}
	case TypeCompress:
		p = be.AppendUint32(p, m.Comp.Value)
		p = be.AppendUint32(p, m.Comp.Block)
		p = be.AppendUint64(p, m.Comp.Offset)
		p = be.AppendUint64(p, m.Comp.Length)
	case TypeRegisterRequest, TypeUnregisterRequest:
		if len(m.Regs) == 0 || len(m.Regs) > MaxCommands {
			return b, malformed(m.Type, "%d entries, want 1..%d", len(m.Regs), MaxCommands)
		}
		h.Repeat = uint32(len(m.Regs))
		for _, r := range m.Regs {
			p = be.AppendUint64(p, r.Addr)
			p = be.AppendUint32(p, r.Block)
			p = be.AppendUint32(p, 0)
			p = be.AppendUint64(p, r.Chunks)
		}
	case TypeRegisterResult:
		if len(m.Results) == 0 || len(m.Results) > MaxCommands {
			return b, malformed(m.Type, "%d entries, want 1..%d", len(m.Results), MaxCommands)
		}
		h.Repeat = uint32(len(m.Results))
		for _, r := range m.Results {
			p = be.AppendUint32(p, r.RKey)
			p = be.AppendUint32(p, 0)
			p = be.AppendUint64(p, r.HostAddr)
		}
	default:
		return b, malformed(m.Type, "unknown type")
	}
	if len(p) > MaxPayload {
		return b, malformed(m.Type, "payload of %d bytes exceeds the %d-byte control buffer", len(p), MaxBuffer)
	}
	h.Len = uint32(len(p))
	b = AppendHeader(b, h)
	return append(b, p...), nil
}

// Decode decodes one control message occupying exactly b (a received SEND).
// It bounds every length and count; on error it returns a *DecodeError.
func Decode(b []byte) (Message, error) {
	h, err := ParseHeader(b)
	if err != nil {
		return Message{}, err
	}
	m := Message{Type: h.Type, Repeat: h.Repeat}
	if len(b) > MaxBuffer {
		return m, malformed(h.Type, "%d bytes exceed the %d-byte control buffer", len(b), MaxBuffer)
	}
	p := b[HeaderSize:]
	if uint64(h.Len) != uint64(len(p)) {
		return m, malformed(h.Type, "header says %d payload bytes, %d arrived", h.Len, len(p))
	}
	if h.Repeat > MaxCommands {
		return m, malformed(h.Type, "repeat %d exceeds %d", h.Repeat, MaxCommands)
	}
	wantLen := func(n int) error {
		if len(p) != n {
			return malformed(h.Type, "payload of %d bytes, want %d", len(p), n)
		}
		return nil
	}
	switch h.Type {
	case TypeReady, TypeRegisterFinished, TypeUnregisterFinished:
		return m, wantLen(0)
	case TypeError:
		if len(p) > MaxErrorReason {
			return m, malformed(h.Type, "reason of %d bytes exceeds %d", len(p), MaxErrorReason)
		}
		m.Reason = string(p)
	case TypeQEMUFile:
		if len(p) > MaxQEMUFile {
			return m, malformed(h.Type, "%d bytes, at most %d per message", len(p), MaxQEMUFile)
		}
		m.Data = p
	case TypeRAMBlocksRequest:
		for len(p) > 0 {
			n := int(p[0])
			if n == 0 || 1+n > len(p) {
				return m, malformed(h.Type, "block name of %d bytes with %d left", n, len(p)-1)
			}
			if len(m.Names) == MaxBlocks {
				return m, malformed(h.Type, "more than %d names", MaxBlocks)
			}
			m.Names = append(m.Names, string(p[1:1+n]))
			p = p[1+n:]
		}
	case TypeRAMBlocksResult:
		if len(p)%DestBlockSize != 0 || len(p)/DestBlockSize > MaxBlocks {
			return m, malformed(h.Type, "payload of %d bytes is not 0..%d blocks of %d", len(p), MaxBlocks, DestBlockSize)
		}
		m.Blocks = make([]DestBlock, 0, len(p)/DestBlockSize)
		for ; len(p) > 0; p = p[DestBlockSize:] {
			m.Blocks = append(m.Blocks, DestBlock{HostAddr: be.Uint64(p), Offset: be.Uint64(p[8:]),
				Length: be.Uint64(p[16:]), RKey: be.Uint32(p[24:])})
		}
	case TypeCompress:
		if err := wantLen(CompressSize); err != nil {
			return m, err
		}
		m.Comp = Compress{Value: be.Uint32(p), Block: be.Uint32(p[4:]), Offset: be.Uint64(p[8:]), Length: be.Uint64(p[16:])}
	case TypeRegisterRequest, TypeUnregisterRequest:
		if h.Repeat == 0 {
			return m, malformed(h.Type, "repeat 0")
		}
		if err := wantLen(int(h.Repeat) * RegisterSize); err != nil {
			return m, err
		}
		m.Regs = make([]Reg, 0, h.Repeat)
		for ; len(p) > 0; p = p[RegisterSize:] {
			m.Regs = append(m.Regs, Reg{Addr: be.Uint64(p), Block: be.Uint32(p[8:]), Chunks: be.Uint64(p[16:])})
		}
	case TypeRegisterResult:
		// QEMU's header says len 16 whatever repeat is (errata §9): accept
		// one result per 16 bytes, at least one.
		if len(p) == 0 || len(p)%RegisterResultSz != 0 || len(p)/RegisterResultSz > MaxCommands {
			return m, malformed(h.Type, "payload of %d bytes is not 1..%d results of %d", len(p), MaxCommands, RegisterResultSz)
		}
		m.Results = make([]RegResult, 0, len(p)/RegisterResultSz)
		for ; len(p) > 0; p = p[RegisterResultSz:] {
			m.Results = append(m.Results, RegResult{RKey: be.Uint32(p), HostAddr: be.Uint64(p[8:])})
		}
	default:
		return m, malformed(h.Type, "unknown type")
	}
	return m, nil
}

// AppendCaps appends RDMACapabilities (be32 version, be32 flags).
func AppendCaps(b []byte, c Caps) []byte {
	b = be.AppendUint32(b, c.Version)
	return be.AppendUint32(b, c.Flags)
}

// ParseCaps decodes RDMACapabilities from connection private data (which a
// provider may pad: extra bytes are ignored, as rdma_cm pads).
func ParseCaps(b []byte) (Caps, error) {
	if len(b) < CapabilitiesSize {
		return Caps{}, &DecodeError{Type: TypeNone, Reason: fmt.Sprintf("capabilities: %d bytes of private data, want %d", len(b), CapabilitiesSize)}
	}
	return Caps{Version: be.Uint32(b), Flags: be.Uint32(b[4:])}, nil
}
