package stream

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
)

// The postcopy preempt channel (capability postcopy-preempt): a second
// connection on which the source sends only the pages the destination
// faulted on, so they never queue behind the background stream of the main
// channel. QEMU's preempt channel carries bare RAM page records (§2.2
// layouts, no section headers; the last block of a CONTINUE record is the
// channel's own) and is told apart by the order connections arrive in;
// migctl's starts with PreemptMagic, so the destination can classify it by
// its first bytes like the main stream and multifd channels, and ends with
// a lone EOS record once the source has sent every page.

// PreemptMagic opens migctl's preempt channel ("MGPC").
const PreemptMagic = 0x4d475043

// PageWriter writes the preempt channel. It buffers: call Flush after each
// batch of urgent pages. It is owned by one goroutine.
type PageWriter struct {
	bw       *bufio.Writer
	pageSize uint64
	blocks   map[string]uint64
	last     string
	err      error
	scratch  [8 + 1 + MaxIDStr]byte
}

// NewPageWriter returns a PageWriter for pages of pageSize bytes of the
// blocks named (name → size), and writes the channel's magic.
func NewPageWriter(w io.Writer, pageSize uint64, blocks map[string]uint64) *PageWriter {
	p := &PageWriter{bw: bufio.NewWriterSize(w, 64<<10), pageSize: pageSize, blocks: blocks}
	var m [4]byte
	binary.BigEndian.PutUint32(m[:], PreemptMagic)
	p.write(m[:])
	return p
}

func (p *PageWriter) write(b []byte) {
	if p.err == nil {
		if _, err := p.bw.Write(b); err != nil {
			p.err = fmt.Errorf("stream: preempt channel: %w", err)
		}
	}
}

func (p *PageWriter) header(block string, off, flag uint64) error {
	if p.err != nil {
		return p.err
	}
	size, ok := p.blocks[block]
	if !ok || off%p.pageSize != 0 || off >= size || size-off < p.pageSize {
		return invalidf("preempt page %s@%#x: unknown block or offset outside it", block, off)
	}
	b := p.scratch[:0]
	if block == p.last {
		b = binary.BigEndian.AppendUint64(b, off|flag|FlagContinue)
	} else {
		b = binary.BigEndian.AppendUint64(b, off|flag)
		b = append(b, byte(len(block)))
		b = append(b, block...)
		p.last = block
	}
	p.write(b)
	return p.err
}

// PutPage writes a PAGE record (page is exactly the page size).
func (p *PageWriter) PutPage(block string, off uint64, page []byte) error {
	if uint64(len(page)) != p.pageSize {
		return invalidf("preempt page of %d bytes, want %d", len(page), p.pageSize)
	}
	if err := p.header(block, off, FlagPage); err != nil {
		return err
	}
	p.write(page)
	return p.err
}

// PutZero writes a ZERO record.
func (p *PageWriter) PutZero(block string, off uint64) error {
	if err := p.header(block, off, FlagZero); err != nil {
		return err
	}
	p.write([]byte{0})
	return p.err
}

// Flush writes what is buffered.
func (p *PageWriter) Flush() error {
	if p.err == nil {
		if err := p.bw.Flush(); err != nil {
			p.err = fmt.Errorf("stream: preempt channel: %w", err)
		}
	}
	return p.err
}

// Close writes the EOS record and flushes; the channel carries nothing
// after it.
func (p *PageWriter) Close() error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], FlagEOS)
	p.write(b[:])
	return p.Flush()
}

// PageRecord is one record of the preempt channel: KindPage (read its
// bytes with PageReader.ReadPage), KindZero or KindEOS.
type PageRecord struct {
	Kind   Kind
	Block  string
	Offset uint64
}

// PageReader reads the preempt channel, bounding every record by the
// destination's blocks. It is owned by one goroutine.
type PageReader struct {
	r        *bufio.Reader
	pageSize uint64
	blocks   map[string]uint64
	last     string
	pending  bool // a PAGE record's bytes are next
	magic    bool
	err      error
	off      int64
	scratch  [MaxIDStr]byte
}

// NewPageReader returns a reader of the preempt channel r for pages of
// pageSize bytes of blocks (name → size on this destination).
func NewPageReader(r io.Reader, pageSize uint64, blocks map[string]uint64) *PageReader {
	return &PageReader{r: bufio.NewReaderSize(r, 64<<10), pageSize: pageSize, blocks: blocks}
}

// Offset is the number of bytes consumed.
func (p *PageReader) Offset() int64 { return p.off }

func (p *PageReader) read(b []byte, what string) error {
	n, err := io.ReadFull(p.r, b)
	p.off += int64(n)
	if err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return &DecodeError{Offset: p.off, Class: ErrCorrupt, Detail: "preempt channel ends inside " + what, Err: io.ErrUnexpectedEOF}
		}
		return fmt.Errorf("stream: preempt channel: reading %s: %w", what, err)
	}
	return nil
}

func (p *PageReader) corrupt(format string, args ...any) error {
	return &DecodeError{Offset: p.off, Class: ErrCorrupt, Detail: "preempt channel: " + fmt.Sprintf(format, args...)}
}

// Next reads the next record. After a KindPage record call ReadPage before
// Next. After KindEOS the channel is done. Errors are sticky.
func (p *PageReader) Next() (PageRecord, error) {
	if p.err != nil {
		return PageRecord{}, p.err
	}
	rec, err := p.next()
	p.err = err
	return rec, err
}

func (p *PageReader) next() (PageRecord, error) {
	if p.pending {
		return PageRecord{}, orderf("PageReader.Next before ReadPage")
	}
	var w [8]byte
	if !p.magic {
		if err := p.read(w[:4], "the magic"); err != nil {
			return PageRecord{}, err
		}
		if m := binary.BigEndian.Uint32(w[:4]); m != PreemptMagic {
			return PageRecord{}, p.corrupt("magic %#08x, want %#08x", m, PreemptMagic)
		}
		p.magic = true
	}
	if err := p.read(w[:], "a record"); err != nil {
		return PageRecord{}, err
	}
	word := binary.BigEndian.Uint64(w[:])
	ps := p.pageSize
	flags, addr := word&(ps-1), word&^(ps-1)
	if flags&^flagBits != 0 {
		return PageRecord{}, p.corrupt("record %#x is not page aligned", word)
	}
	cont := flags&FlagContinue != 0
	kind := KindPage
	switch flags &^ FlagContinue {
	case FlagEOS:
		if word != FlagEOS {
			return PageRecord{}, p.corrupt("EOS record %#x carries other bits", word)
		}
		return PageRecord{Kind: KindEOS}, nil
	case FlagPage:
	case FlagZero:
		kind = KindZero
	default:
		return PageRecord{}, p.corrupt("record with flags %#x: only PAGE, ZERO and EOS travel here", flags)
	}
	block := p.last
	if cont {
		if block == "" {
			return PageRecord{}, p.corrupt("CONTINUE record at %#x before any record named a block", addr)
		}
	} else {
		var n [1]byte
		if err := p.read(n[:], "a block name"); err != nil {
			return PageRecord{}, err
		}
		if n[0] == 0 {
			return PageRecord{}, p.corrupt("empty block name")
		}
		if err := p.read(p.scratch[:n[0]], "a block name"); err != nil {
			return PageRecord{}, err
		}
		block = string(p.scratch[:n[0]])
	}
	size, ok := p.blocks[block]
	if !ok {
		return PageRecord{}, &DecodeError{Offset: p.off, Class: ErrMismatch, Reason: ErrUnknownBlock, Block: block, Detail: fmt.Sprintf("preempt channel: page in unknown RAM block %q", block)}
	}
	if addr >= size || size-addr < ps {
		return PageRecord{}, &DecodeError{Offset: p.off, Class: ErrCorrupt, Reason: ErrPageOutside, Block: block, Detail: fmt.Sprintf("preempt channel: page at %#x outside block %q (size %#x)", addr, block, size)}
	}
	p.last = block
	if kind == KindZero {
		var fill [1]byte
		if err := p.read(fill[:], "a zero page's fill byte"); err != nil {
			return PageRecord{}, err
		}
		if fill[0] != 0 {
			return PageRecord{}, p.corrupt("zero page fill byte %#02x", fill[0])
		}
	} else {
		p.pending = true
	}
	return PageRecord{Kind: kind, Block: block, Offset: addr}, nil
}

// ReadPage reads the pending PAGE record's bytes into dst (the page size).
func (p *PageReader) ReadPage(dst []byte) error {
	if p.err != nil {
		return p.err
	}
	if !p.pending {
		return orderf("PageReader.ReadPage with no page pending")
	}
	if uint64(len(dst)) != p.pageSize {
		return invalidf("ReadPage needs a %d-byte buffer, got %d", p.pageSize, len(dst))
	}
	p.pending = false
	if err := p.read(dst, "page data"); err != nil {
		p.err = err
		return err
	}
	return nil
}
