package mappedram

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"strings"

	"github.com/migctl/migctl/stream"
)

// migctl's integrity data (QEMU's layout has none). All integers big-endian;
// CRCs are CRC-32C (Castagnoli).
const (
	// RecordSize is the size of a block's integrity record, written right
	// after the block's bitmap (at MappedRAMBlock.ReservedOffset): it is the
	// reserve passed to stream.Encoder.StartRAMMapped and ScanMappedRAM.
	RecordSize = 32
	// RecordMagic opens a record: "MCRI".
	RecordMagic = 0x4d435249
	// TrailerSize is the size of the completion marker, the file's last
	// bytes.
	TrailerSize = 64
	// TrailerMagic opens the trailer.
	TrailerMagic = "MIGCTLMR"
	// FormatVersion is the version of both the record and the trailer.
	FormatVersion = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// Record is a block's integrity record (32 bytes):
//
//	off size  field
//	  0 be32  magic "MCRI" (0x4d435249)
//	  4 be32  version 1
//	  8 be32  CRC-32C of the block's 28-byte MappedRAMHeader as stored
//	 12 be32  CRC-32C of the block's bitmap as stored
//	 16 be64  block size (must equal the MEM_SIZE entry)
//	 24 be32  pages present (bits set in the bitmap)
//	 28 be32  CRC-32C of bytes 0..27
type Record struct {
	HeaderCRC, BitmapCRC uint32
	Size                 uint64
	Present              uint32
}

// AppendBinary appends the 32-byte record.
func (r Record) AppendBinary(b []byte) ([]byte, error) {
	start := len(b)
	b = binary.BigEndian.AppendUint32(b, RecordMagic)
	b = binary.BigEndian.AppendUint32(b, FormatVersion)
	b = binary.BigEndian.AppendUint32(b, r.HeaderCRC)
	b = binary.BigEndian.AppendUint32(b, r.BitmapCRC)
	b = binary.BigEndian.AppendUint64(b, r.Size)
	b = binary.BigEndian.AppendUint32(b, r.Present)
	return binary.BigEndian.AppendUint32(b, crc(b[start:])), nil
}

// parseRecord decodes a record; it returns a reason string if it is not one.
func parseRecord(b []byte) (Record, string) {
	switch {
	case binary.BigEndian.Uint32(b) != RecordMagic:
		return Record{}, "no integrity record (the save did not complete, or the file is not migctl's)"
	case crc(b[:28]) != binary.BigEndian.Uint32(b[28:]):
		return Record{}, "integrity record fails its checksum"
	case binary.BigEndian.Uint32(b[4:]) != FormatVersion:
		return Record{}, fmt.Sprintf("integrity record version %d, this build reads %d", binary.BigEndian.Uint32(b[4:]), FormatVersion)
	}
	return Record{
		HeaderCRC: binary.BigEndian.Uint32(b[8:]),
		BitmapCRC: binary.BigEndian.Uint32(b[12:]),
		Size:      binary.BigEndian.Uint64(b[16:]),
		Present:   binary.BigEndian.Uint32(b[24:]),
	}, ""
}

// Trailer is the completion marker, the last 64 bytes of the file, written
// after everything else has reached the disk:
//
//	off size  field
//	  0 8     magic "MIGCTLMR"
//	  8 be32  version 1
//	 12 be32  number of RAM blocks
//	 16 be64  stream start: file offset of the stream's "QEVM"
//	 24 be64  stream end: file offset of this trailer
//	 32 be32  CRC-32C of the blocks' integrity records, concatenated in
//	          MEM_SIZE order
//	 36 be32  CRC-32C of the main stream: every byte the main channel wrote
//	          (stream.MappedRAMIndex.Segments, headers included), in order
//	 40 20    reserved, zero
//	 60 be32  CRC-32C of bytes 0..59
type Trailer struct {
	Blocks      uint32
	StreamStart uint64
	StreamEnd   uint64
	RecordsCRC  uint32
	StreamCRC   uint32
}

// AppendBinary appends the 64-byte trailer.
func (t Trailer) AppendBinary(b []byte) ([]byte, error) {
	start := len(b)
	b = append(b, TrailerMagic...)
	b = binary.BigEndian.AppendUint32(b, FormatVersion)
	b = binary.BigEndian.AppendUint32(b, t.Blocks)
	b = binary.BigEndian.AppendUint64(b, t.StreamStart)
	b = binary.BigEndian.AppendUint64(b, t.StreamEnd)
	b = binary.BigEndian.AppendUint32(b, t.RecordsCRC)
	b = binary.BigEndian.AppendUint32(b, t.StreamCRC)
	b = append(b, make([]byte, 20)...)
	return binary.BigEndian.AppendUint32(b, crc(b[start:])), nil
}

func parseTrailer(b []byte) (Trailer, error) {
	if string(b[:8]) != TrailerMagic {
		return Trailer{}, errIncomplete
	}
	if crc(b[:60]) != binary.BigEndian.Uint32(b[60:]) {
		return Trailer{}, errors.New("completion marker fails its checksum")
	}
	if v := binary.BigEndian.Uint32(b[8:]); v != FormatVersion {
		return Trailer{}, fmt.Errorf("completion marker version %d, this build reads %d", v, FormatVersion)
	}
	for _, c := range b[40:60] {
		if c != 0 {
			return Trailer{}, errors.New("completion marker has non-zero reserved bytes")
		}
	}
	return Trailer{
		Blocks:      binary.BigEndian.Uint32(b[12:]),
		StreamStart: binary.BigEndian.Uint64(b[16:]),
		StreamEnd:   binary.BigEndian.Uint64(b[24:]),
		RecordsCRC:  binary.BigEndian.Uint32(b[32:]),
		StreamCRC:   binary.BigEndian.Uint32(b[36:]),
	}, nil
}

var errIncomplete = errors.New("no completion marker")

// ErrIncomplete is the class of a file that lacks its completion marker (or
// a block its integrity record): the save did not finish, or the file is
// not a migctl mapped-ram file. QEMU's format would load such a file as
// zero pages; migctl refuses it.
var ErrIncomplete = errors.New("mapped-ram file is incomplete")

// ErrChecksum is the reason of an integrity failure: a header, bitmap,
// record or the main stream does not match its CRC-32C (class
// stream.ErrCorrupt).
var ErrChecksum = errors.New("mapped-ram checksum mismatch")

// ErrInvalid is returned (wrapped) for bad arguments.
var ErrInvalid = errors.New("mapped-ram: invalid argument")

// Error describes a file that cannot be loaded. Its class is ErrIncomplete
// or one of stream.ErrCorrupt, stream.ErrMismatch, stream.ErrTooLarge,
// stream.ErrUnsupported; Reason is ErrChecksum, stream.ErrPageOutside or
// nil. (Errors from the main stream's structure are *stream.DecodeError.)
type Error struct {
	Offset int64 // file offset, or -1
	Class  error
	Reason error
	Block  string
	Detail string
	Err    error
}

// Error formats "mapped-ram: DETAIL (at file byte N): CAUSE".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("mapped-ram: ")
	b.WriteString(e.Detail)
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " (at file byte %d)", e.Offset)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the class, the reason and the cause.
func (e *Error) Unwrap() []error {
	var errs []error
	for _, x := range []error{e.Class, e.Reason, e.Err} {
		if x != nil {
			errs = append(errs, x)
		}
	}
	return errs
}

func bad(off int64, block string, reason error, format string, args ...any) *Error {
	return &Error{Offset: off, Class: stream.ErrCorrupt, Reason: reason, Block: block, Detail: fmt.Sprintf(format, args...)}
}

func crc32Update(c uint32, b []byte) uint32 { return crc32.Update(c, castagnoli, b) }
