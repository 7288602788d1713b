package stream

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
)

// mapped-ram (QEMU >= 9.0, capability mapped-ram; qemu-wire.md §4): the RAM
// section keeps its framing, but inside the MEM_SIZE record each block's
// entry (u8 len, idstr, be64 size) is followed by a 28-byte MappedRAMHeader,
// and the main channel then seeks past a region of the file that holds the
// block's bitmap and its pages at fixed offsets. See docs/mapped-ram.md.

// Mapped-ram constants (QEMU migration/ram.c).
const (
	// MappedRAMHeaderSize is the size of the packed header.
	MappedRAMHeaderSize = 28
	// MappedRAMVersion is MAPPED_RAM_HDR_VERSION, the only version written;
	// QEMU's reader accepts versions up to it.
	MappedRAMVersion = 1
	// MappedRAMAlignment is MAPPED_RAM_FILE_OFFSET_ALIGNMENT: pages_offset
	// is rounded up to it (large enough for any O_DIRECT block size).
	MappedRAMAlignment = 1 << 20
)

// MappedRAMHeader is the per-block header (big-endian, packed):
//
//	off size  field
//	  0 be32  version (1)
//	  4 be64  page_size (the target page size)
//	 12 be64  bitmap_offset: absolute file offset of the block's bitmap
//	 20 be64  pages_offset: absolute file offset of page 0 of the block
type MappedRAMHeader struct {
	Version      uint32
	PageSize     uint64
	BitmapOffset uint64
	PagesOffset  uint64
}

// AppendBinary appends the 28-byte header.
func (h MappedRAMHeader) AppendBinary(b []byte) ([]byte, error) {
	b = binary.BigEndian.AppendUint32(b, h.Version)
	b = binary.BigEndian.AppendUint64(b, h.PageSize)
	b = binary.BigEndian.AppendUint64(b, h.BitmapOffset)
	return binary.BigEndian.AppendUint64(b, h.PagesOffset), nil
}

// ParseMappedRAMHeader decodes 28 bytes; it does not validate the values.
func ParseMappedRAMHeader(b []byte) (MappedRAMHeader, error) {
	if len(b) != MappedRAMHeaderSize {
		return MappedRAMHeader{}, fmt.Errorf("%w: mapped-ram header of %d bytes, want %d", ErrInvalid, len(b), MappedRAMHeaderSize)
	}
	return MappedRAMHeader{
		Version:      binary.BigEndian.Uint32(b),
		PageSize:     binary.BigEndian.Uint64(b[4:]),
		BitmapOffset: binary.BigEndian.Uint64(b[12:]),
		PagesOffset:  binary.BigEndian.Uint64(b[20:]),
	}, nil
}

// MappedRAMBitmapSize is the size of a block's bitmap in the file: one bit
// per page, in whole 64-bit words (QEMU: BITS_TO_LONGS(pages) *
// sizeof(unsigned long) on a 64-bit host).
func MappedRAMBitmapSize(blockSize, pageSize uint64) uint64 {
	pages := blockSize / pageSize
	return (pages + 63) / 64 * 8
}

// MappedRAMBlock is where one RAM block lives in a mapped-ram file.
type MappedRAMBlock struct {
	Name string
	Size uint64
	// HeaderOffset is the file offset of the block's MappedRAMHeader.
	HeaderOffset uint64
	Header       MappedRAMHeader
	// ReservedOffset is the first byte after the bitmap: Reserve bytes from
	// there (before PagesOffset) belong to the writer (migctl puts its
	// integrity record there). QEMU leaves the gap as a hole.
	ReservedOffset uint64
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// mappedRAMLayout computes a block's header for a header at pos.
func mappedRAMLayout(pos, size, pageSize, reserve uint64) (MappedRAMHeader, uint64, error) {
	bitmap := pos + MappedRAMHeaderSize
	reserved := bitmap + MappedRAMBitmapSize(size, pageSize)
	pages := roundUp(reserved+reserve, MappedRAMAlignment)
	if pages < reserved || pages+size < pages || pages+size > math.MaxInt64 {
		return MappedRAMHeader{}, 0, invalidf("mapped-ram block of %#x bytes at file offset %#x overflows the file", size, pos)
	}
	return MappedRAMHeader{Version: MappedRAMVersion, PageSize: pageSize, BitmapOffset: bitmap, PagesOffset: pages}, reserved, nil
}

// checkRAMBlocks validates a block list as StartRAM does and returns the
// blocks by name and their total.
func (e *Encoder) checkRAMBlocks(pageSize uint64, blocks []Block) (map[string]*encBlock, uint64, error) {
	if !validPageSize(pageSize) {
		return nil, 0, invalidf("page size %d is not a power of two between %d and %d", pageSize, MinPageSize, MaxPageSize)
	}
	if e.handshake != nil && e.handshake.PageSize != pageSize {
		return nil, 0, invalidf("page size %d differs from the handshake's %d", pageSize, e.handshake.PageSize)
	}
	m := make(map[string]*encBlock, len(blocks))
	var total uint64
	for _, b := range blocks {
		if err := checkName("RAM block", b.Name); err != nil {
			return nil, 0, err
		}
		if m[b.Name] != nil {
			return nil, 0, invalidf("RAM block %q listed twice", b.Name)
		}
		if b.Size == 0 || b.Size%pageSize != 0 {
			return nil, 0, invalidf("RAM block %q size %#x is not a non-zero multiple of the page size %#x", b.Name, b.Size, pageSize)
		}
		if total+b.Size < total || total+b.Size > math.MaxInt64 {
			return nil, 0, invalidf("RAM blocks add up to more than 2^63 bytes")
		}
		total += b.Size
		m[b.Name] = &encBlock{name: b.Name, size: b.Size}
	}
	if hs := e.handshake; hs != nil && hs.RAMBlocks != nil {
		if len(hs.RAMBlocks) != len(blocks) {
			return nil, 0, invalidf("the RAM section lists %d blocks, the handshake %d", len(blocks), len(hs.RAMBlocks))
		}
		for _, b := range blocks {
			if sz, ok := hs.RAMBlocks[b.Name]; !ok || sz != b.Size {
				return nil, 0, invalidf("RAM block %q (%#x bytes) differs from the handshake's list", b.Name, b.Size)
			}
		}
	}
	return m, total, nil
}

// StartRAMMapped writes the RAM SECTION_START of a mapped-ram file, as QEMU
// does: MEM_SIZE with the total, then per block u8 len, idstr, be64 size and
// the block's MappedRAMHeader, after which the main channel seeks to the end
// of the block's page region (pages_offset + size); then EOS and the footer.
// f must be the file the Encoder writes to (the Encoder flushes before every
// seek); offsets are absolute in it. Each block's bitmap starts right after
// its header; reserve bytes after the bitmap are left for the caller;
// pages_offset is the next MappedRAMAlignment boundary. The regions are left
// unwritten (holes): the caller writes pages at their offsets, and the
// bitmaps at the end.
//
// Later RAM sections (BeginRAMPart, BeginRAMEnd) carry no page records in
// mapped-ram: only CloseRAMSection's EOS. No MULTIFD_FLUSH is written (QEMU
// syncs its channels locally for files).
func (e *Encoder) StartRAMMapped(pageSize uint64, blocks []Block, f io.Seeker, reserve uint64) ([]MappedRAMBlock, error) {
	if err := e.checkTop("StartRAMMapped"); err != nil {
		return nil, err
	}
	if e.ramStarted {
		return nil, orderf("StartRAMMapped after the RAM section started")
	}
	if reserve > MappedRAMAlignment {
		return nil, invalidf("mapped-ram reserve of %d bytes, at most %d", reserve, MappedRAMAlignment)
	}
	m, total, err := e.checkRAMBlocks(pageSize, blocks)
	if err != nil {
		return nil, err
	}
	id := e.nextID
	e.nextID++
	e.writeSectionHeader(SecStart, id, RAMIDStr, 0, RAMVersion)
	e.writeBE64(total | FlagMemSize)
	out := make([]MappedRAMBlock, 0, len(blocks))
	for _, b := range blocks {
		s := e.scratch[:0]
		s = append(s, byte(len(b.Name)))
		s = append(s, b.Name...)
		s = binary.BigEndian.AppendUint64(s, b.Size)
		e.write(s)
		if err := e.Flush(); err != nil {
			return nil, err
		}
		pos, err := f.Seek(0, io.SeekCurrent)
		if err != nil {
			e.err = fmt.Errorf("stream: mapped-ram: %w", err)
			return nil, e.err
		}
		h, reserved, err := mappedRAMLayout(uint64(pos), b.Size, pageSize, reserve)
		if err != nil {
			e.err = err
			return nil, err
		}
		hb, _ := h.AppendBinary(e.scratch[:0])
		e.write(hb)
		if err := e.Flush(); err != nil {
			return nil, err
		}
		if _, err := f.Seek(int64(h.PagesOffset+b.Size), io.SeekStart); err != nil {
			e.err = fmt.Errorf("stream: mapped-ram: %w", err)
			return nil, e.err
		}
		out = append(out, MappedRAMBlock{Name: b.Name, Size: b.Size, HeaderOffset: uint64(pos), Header: h, ReservedOffset: reserved})
	}
	e.writeBE64(FlagEOS)
	e.writeFooter(id)
	e.anySection = true
	e.ramStarted = true
	e.ramID = id
	e.pageSize = pageSize
	e.blocks = m
	return out, e.err
}

// Segment is a byte range of a mapped-ram file that the main channel wrote.
type Segment struct {
	Offset, Length int64
	// Header marks a block's 28-byte MappedRAMHeader: part of what the main
	// channel wrote, but not of the plain stream a Decoder reads.
	Header bool
}

// MappedRAMIndex locates the parts of a mapped-ram file's main stream.
type MappedRAMIndex struct {
	Blocks []MappedRAMBlock
	// Segments are, in order, every range of the file the main channel
	// wrote from the stream's start to its end: the page regions, bitmaps
	// and gaps are what lies between them.
	Segments []Segment
}

// StreamReader returns the file's main stream without its mapped-ram parts
// (headers and regions): an ordinary stream a Decoder reads (its MEM_SIZE
// lists the blocks; its RAM sections carry no pages).
func (x *MappedRAMIndex) StreamReader(r io.ReaderAt) io.Reader {
	var rs []io.Reader
	for _, s := range x.Segments {
		if !s.Header {
			rs = append(rs, io.NewSectionReader(r, s.Offset, s.Length))
		}
	}
	return io.MultiReader(rs...)
}

// scanner reads a file's main stream sequentially through ReadAt.
type scanner struct {
	r        io.ReaderAt
	pos, end int64
	segStart int64
	segs     []Segment
	buf      [MaxIDStr + 1]byte
}

func (s *scanner) fail(pos int64, reason error, format string, args ...any) error {
	return &DecodeError{Offset: pos, Class: ErrCorrupt, Reason: reason, Detail: "mapped-ram: " + fmt.Sprintf(format, args...)}
}

func (s *scanner) read(n int, what string) ([]byte, error) {
	if int64(n) > s.end-s.pos {
		return nil, &DecodeError{Offset: s.pos, Class: ErrCorrupt, Detail: "mapped-ram: stream ends inside " + what, Err: io.ErrUnexpectedEOF}
	}
	b := s.buf[:n]
	if n == 0 {
		return b, nil
	}
	if _, err := s.r.ReadAt(b, s.pos); err != nil {
		return nil, fmt.Errorf("stream: mapped-ram: reading %s at file byte %d: %w", what, s.pos, err)
	}
	s.pos += int64(n)
	return b, nil
}

func (s *scanner) u8(what string) (byte, error) {
	b, err := s.read(1, what)
	if err != nil {
		return 0, err
	}
	return b[0], nil
}

func (s *scanner) be16(what string) (uint16, error) {
	b, err := s.read(2, what)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint16(b), nil
}

func (s *scanner) be32(what string) (uint32, error) {
	b, err := s.read(4, what)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(b), nil
}

func (s *scanner) be64(what string) (uint64, error) {
	b, err := s.read(8, what)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b), nil
}

func (s *scanner) skip(n int64, what string) error {
	if n > s.end-s.pos {
		return &DecodeError{Offset: s.pos, Class: ErrCorrupt, Detail: "mapped-ram: stream ends inside " + what, Err: io.ErrUnexpectedEOF}
	}
	s.pos += n
	return nil
}

// cut closes the current segment at pos and opens the next one at next.
func (s *scanner) cut(header bool, next int64) {
	if s.pos > s.segStart {
		s.segs = append(s.segs, Segment{Offset: s.segStart, Length: s.pos - s.segStart, Header: header})
	}
	s.segStart = next
	s.pos = next
}

// ScanMappedRAM walks the main stream of a mapped-ram file written by
// migctl, from the stream's first byte at start to its end at end (the file
// size, or where a trailer begins), up to the end of the RAM SECTION_START,
// and returns where each block and each piece of the main stream lies. It
// reads only what the main channel wrote: the configuration, commands and
// migctl's length-prefixed FULL sections before the RAM section, and the
// MEM_SIZE record with its headers. It checks every length against lim (a
// nil lim.Blocks accepts the blocks as announced) and every header against
// the layout migctl writes: version 1, lim's page size, the bitmap right
// after the header, a page-aligned pages_offset past the bitmap and reserve
// bytes, each block's region ending where the next entry starts, and the
// whole inside [start, end). It returns *DecodeError for bad input.
func ScanMappedRAM(r io.ReaderAt, start, end int64, lim Limits, reserve uint64) (*MappedRAMIndex, error) {
	l, err := lim.normalize()
	if err != nil {
		return nil, err
	}
	if start < 0 || end < start {
		return nil, fmt.Errorf("%w: stream range [%d, %d)", ErrInvalid, start, end)
	}
	s := &scanner{r: r, pos: start, end: end, segStart: start}
	magic, err := s.be32("the stream header")
	if err != nil {
		return nil, err
	}
	if magic != Magic {
		return nil, s.fail(start, nil, "file starts with %#08x at byte %d, not the QEVM magic", magic, start)
	}
	if v, err := s.be32("the stream header"); err != nil {
		return nil, err
	} else if v != Version {
		return nil, s.fail(start+4, nil, "stream version %d, want %d", v, Version)
	}
	first := true
	for {
		pos := s.pos
		typ, err := s.u8("a section type")
		if err != nil {
			return nil, err
		}
		switch typ {
		case SecConfig:
			if !first {
				return nil, s.fail(pos, nil, "configuration section after the start of the stream")
			}
			n, err := s.be32("the configuration")
			if err != nil {
				return nil, err
			}
			if int64(n) > int64(l.MaxMachineName) {
				return nil, &DecodeError{Offset: pos, Class: ErrTooLarge, Detail: fmt.Sprintf("mapped-ram: machine name of %d bytes, limit %d", n, l.MaxMachineName)}
			}
			if err := s.skip(int64(n), "the machine name"); err != nil {
				return nil, err
			}
		case SecCommand:
			if _, err := s.be16("a command"); err != nil {
				return nil, err
			}
			n, err := s.be16("a command")
			if err != nil {
				return nil, err
			}
			if err := s.skip(int64(n), "command data"); err != nil {
				return nil, err
			}
		case SecFull:
			id, err := s.be32("a section header")
			if err != nil {
				return nil, err
			}
			nl, err := s.u8("a section header")
			if err != nil {
				return nil, err
			}
			if nl == 0 || int(nl) > l.MaxIDStr {
				return nil, s.fail(pos, nil, "section %d idstr of %d bytes", id, nl)
			}
			if err := s.skip(int64(nl)+8, "a section header"); err != nil {
				return nil, err
			}
			n, err := s.be32("a device payload length")
			if err != nil {
				return nil, err
			}
			if int64(n) > int64(max(l.MaxDevicePayload, l.MaxJSON)) {
				return nil, &DecodeError{Offset: pos, Class: ErrTooLarge, Detail: fmt.Sprintf("mapped-ram: section %d payload of %d bytes, limit %d", id, n, max(l.MaxDevicePayload, l.MaxJSON))}
			}
			if err := s.skip(int64(n), "a device payload"); err != nil {
				return nil, err
			}
			if err := s.footer(id); err != nil {
				return nil, err
			}
		case SecStart:
			blocks, err := s.ramStart(pos, l, reserve)
			if err != nil {
				return nil, err
			}
			s.pos = end
			s.cut(false, end)
			return &MappedRAMIndex{Blocks: blocks, Segments: s.segs}, nil
		case SecEOF:
			return nil, s.fail(pos, nil, "stream ends (EOF marker) without a RAM section")
		default:
			return nil, s.fail(pos, nil, "section type %#02x before the RAM section of a mapped-ram file", typ)
		}
		first = false
	}
}

func (s *scanner) footer(id uint32) error {
	pos := s.pos
	t, err := s.u8("a section footer")
	if err != nil {
		return err
	}
	fid, err := s.be32("a section footer")
	if err != nil {
		return err
	}
	if t != SecFooter || fid != id {
		return s.fail(pos, ErrFooter, "section %d is not followed by its footer", id)
	}
	return nil
}

func (s *scanner) ramStart(pos int64, l Limits, reserve uint64) ([]MappedRAMBlock, error) {
	id, err := s.be32("a section header")
	if err != nil {
		return nil, err
	}
	nl, err := s.u8("a section header")
	if err != nil {
		return nil, err
	}
	name, err := s.read(int(nl), "a section header")
	if err != nil {
		return nil, err
	}
	if string(name) != RAMIDStr {
		return nil, s.fail(pos, nil, "iterable section %q: only RAM", name)
	}
	inst, err := s.be32("a section header")
	if err != nil {
		return nil, err
	}
	ver, err := s.be32("a section header")
	if err != nil {
		return nil, err
	}
	if inst != 0 || ver != RAMVersion {
		return nil, s.fail(pos, nil, "RAM section instance %d version %d, want 0 and %d", inst, ver, RAMVersion)
	}
	wpos := s.pos
	w, err := s.be64("the MEM_SIZE record")
	if err != nil {
		return nil, err
	}
	ps := l.PageSize
	if w&(ps-1) != FlagMemSize {
		return nil, s.fail(wpos, nil, "RAM section starts with record %#x, not MEM_SIZE", w)
	}
	remaining := w &^ (ps - 1)
	var blocks []MappedRAMBlock
	seen := map[string]bool{}
	for remaining > 0 {
		epos := s.pos
		if len(blocks) >= l.MaxBlocks {
			return nil, &DecodeError{Offset: epos, Class: ErrTooLarge, Detail: fmt.Sprintf("mapped-ram: more than %d RAM blocks", l.MaxBlocks)}
		}
		n, err := s.u8("a RAM block idstr")
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, s.fail(epos, nil, "empty RAM block idstr")
		}
		nb, err := s.read(int(n), "a RAM block idstr")
		if err != nil {
			return nil, err
		}
		bname := string(nb)
		size, err := s.be64("a RAM block size")
		if err != nil {
			return nil, err
		}
		switch dest, ok := l.Blocks[bname]; {
		case seen[bname]:
			return nil, s.fail(epos, nil, "RAM block %q listed twice", bname)
		case !ok && l.Blocks != nil:
			return nil, &DecodeError{Offset: epos, Class: ErrMismatch, Reason: ErrUnknownBlock, Block: bname,
				Detail: fmt.Sprintf("mapped-ram: file has RAM block %q, this destination does not", bname)}
		case ok && size > dest:
			return nil, &DecodeError{Offset: epos, Class: ErrMismatch, Reason: ErrBlockSize, Block: bname,
				Detail: fmt.Sprintf("mapped-ram: RAM block %q is %#x bytes in the file, only %#x here", bname, size, dest)}
		case size == 0 || size%ps != 0 || size > remaining:
			return nil, s.fail(epos, nil, "RAM block %q size %#x is not a page multiple within the MEM_SIZE total (%#x left)", bname, size, remaining)
		}
		seen[bname] = true
		remaining -= size
		hpos := s.pos
		hb, err := s.read(MappedRAMHeaderSize, "a mapped-ram header")
		if err != nil {
			return nil, err
		}
		h, _ := ParseMappedRAMHeader(hb)
		want, reserved, lerr := mappedRAMLayout(uint64(hpos), size, ps, reserve)
		switch {
		case h.Version != MappedRAMVersion:
			return nil, &DecodeError{Offset: hpos, Class: ErrUnsupported, Block: bname, Detail: fmt.Sprintf("mapped-ram header version %d, this build reads %d", h.Version, MappedRAMVersion)}
		case h.PageSize != ps:
			return nil, &DecodeError{Offset: hpos, Class: ErrMismatch, Block: bname, Detail: fmt.Sprintf("mapped-ram: block %q saved with %d-byte pages, this destination's are %d", bname, h.PageSize, ps)}
		case lerr != nil:
			return nil, s.fail(hpos, nil, "block %q: %v", bname, lerr)
		case h.BitmapOffset != want.BitmapOffset:
			return nil, s.fail(hpos, nil, "block %q bitmap at %#x, want %#x (right after its header)", bname, h.BitmapOffset, want.BitmapOffset)
		case h.PagesOffset%ps != 0 || h.PagesOffset < reserved+reserve:
			return nil, s.fail(hpos, nil, "block %q pages at %#x: not page aligned after its bitmap and reserve (which end at %#x)", bname, h.PagesOffset, reserved+reserve)
		case h.PagesOffset > uint64(s.end) || size > uint64(s.end)-h.PagesOffset:
			return nil, s.fail(hpos, ErrPageOutside, "block %q pages [%#x, %#x) lie beyond the stream's end %#x", bname, h.PagesOffset, h.PagesOffset+size, s.end)
		}
		blocks = append(blocks, MappedRAMBlock{Name: bname, Size: size, HeaderOffset: uint64(hpos), Header: h, ReservedOffset: reserved})
		// The header is a segment of its own; the stream resumes after the
		// page region.
		s.pos = hpos
		s.cut(false, hpos)
		s.pos = hpos + MappedRAMHeaderSize
		s.cut(true, int64(h.PagesOffset+size))
	}
	for {
		rpos := s.pos
		w, err := s.be64("a RAM record")
		if err != nil {
			return nil, err
		}
		if w == FlagEOS {
			break
		}
		if w != FlagMultifdFlush {
			return nil, s.fail(rpos, nil, "record %#x after the mapped-ram block list, want EOS", w)
		}
	}
	if err := s.footer(id); err != nil {
		return nil, err
	}
	return blocks, nil
}
