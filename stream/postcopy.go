package stream

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
)

// Postcopy's wire pieces (qemu-wire.md §6, docs/stream.md "Postcopy"): the
// commands the source sends on the main stream (POSTCOPY_ADVISE,
// POSTCOPY_RAM_DISCARD, PACKAGED with POSTCOPY_LISTEN inside,
// POSTCOPY_RUN, RECV_BITMAP and POSTCOPY_RESUME when it recovers), the
// return-path messages the destination answers with (REQ_PAGES_ID,
// REQ_PAGES, RECV_BITMAP and its bitmap, RESUME_ACK), the preempt
// channel's bare page records, and what a recovered channel needs: an
// Encoder or Decoder that carries on on a new connection (Resume).

// PingPackageLoaded is the value of the PING the source puts last in the
// package (QEMU_VM_PING_PACKAGED_LOADED): its PONG says the destination
// loaded the package, which moves the source from postcopy-device on.
const PingPackageLoaded = 0x42

// DefaultMaxPackage is the largest package Limits.MaxPackage allows when
// a destination turns packages on without choosing a bound.
const DefaultMaxPackage = 64 << 20

// PostcopyAdvise returns POSTCOPY_ADVISE's data: the OR of every RAM
// block's host page size, then the target page size (be64 each).
func PostcopyAdvise(hostPageSizes, targetPageSize uint64) []byte {
	b := binary.BigEndian.AppendUint64(nil, hostPageSizes)
	return binary.BigEndian.AppendUint64(b, targetPageSize)
}

// ParseAdvise decodes POSTCOPY_ADVISE's data; ok is false for the empty
// form (dirty-bitmap postcopy only), which carries no page sizes.
func ParseAdvise(data []byte) (hostPageSizes, targetPageSize uint64, ok bool) {
	if len(data) != 16 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(data), binary.BigEndian.Uint64(data[8:]), true
}

// Range is a byte range of a RAM block: POSTCOPY_RAM_DISCARD carries them.
type Range struct {
	Start, Length uint64
}

// maxDiscardRanges bounds the ranges of one POSTCOPY_RAM_DISCARD command:
// QEMU sends at most 12; a command's data is at most 65535 bytes.
const maxDiscardRanges = 12

// WriteDiscard writes POSTCOPY_RAM_DISCARD commands for ranges of block
// (byte ranges, each a multiple of the page size), maxDiscardRanges per
// command, as QEMU's postcopy_discard_send_range does.
func (e *Encoder) WriteDiscard(block string, ranges []Range) error {
	if err := checkName("RAM block", block); err != nil {
		return err
	}
	for len(ranges) > 0 {
		n := min(len(ranges), maxDiscardRanges)
		b := []byte{0, byte(len(block))}
		b = append(b, block...)
		b = append(b, 0)
		for _, r := range ranges[:n] {
			if r.Length == 0 || r.Start%e.pageSize != 0 || r.Length%e.pageSize != 0 {
				return invalidf("discard range %#x+%#x of %q is empty or not page aligned", r.Start, r.Length, block)
			}
			b = binary.BigEndian.AppendUint64(b, r.Start)
			b = binary.BigEndian.AppendUint64(b, r.Length)
		}
		if err := e.WriteCommand(CmdPostcopyDiscard, b); err != nil {
			return err
		}
		ranges = ranges[n:]
	}
	return nil
}

// ParseDiscard decodes POSTCOPY_RAM_DISCARD's data (already checked by the
// Decoder's command table): the block and its byte ranges, as sent. The
// caller bounds them by the block.
func ParseDiscard(data []byte) (block string, ranges []Range, err error) {
	if msg := checkCommand(CmdPostcopyDiscard, data); msg != "" {
		return "", nil, fmt.Errorf("%w: %s", ErrCorrupt, msg)
	}
	nl := int(data[1])
	block = string(data[2 : 2+nl])
	for p := data[3+nl:]; len(p) >= 16; p = p[16:] {
		ranges = append(ranges, Range{Start: binary.BigEndian.Uint64(p), Length: binary.BigEndian.Uint64(p[8:])})
	}
	return block, ranges, nil
}

// WritePackage builds a package — a nested stream of commands and FULL
// sections that build writes with the Encoder it is given — and writes it
// as one PACKAGED command: be32 length, then the blob outside the command,
// so the destination reads all of it before it loads any of it. Section
// ids continue the main stream's.
func (e *Encoder) WritePackage(build func(p *Encoder) error) error {
	if err := e.checkTop("WritePackage"); err != nil {
		return err
	}
	var buf bytes.Buffer
	p := newEncoder(&buf, false)
	p.state, p.nextID, p.pageSize = esTop, e.nextID, e.pageSize
	p.handshake, p.anySection = e.handshake, true
	p.seenDevices = e.seenDevices
	if err := build(p); err != nil {
		return err
	}
	if p.state != esTop {
		return orderf("the package was left inside a RAM section")
	}
	if err := p.Flush(); err != nil {
		return err
	}
	if buf.Len() > 1<<32-1 {
		return invalidf("package of %d bytes, more than 2^32-1", buf.Len())
	}
	e.nextID = p.nextID
	e.devices = append(e.devices, p.devices...)
	var hdr [9]byte
	hdr[0] = SecCommand
	binary.BigEndian.PutUint16(hdr[1:], uint16(CmdPackaged))
	binary.BigEndian.PutUint16(hdr[3:], 4)
	binary.BigEndian.PutUint32(hdr[5:], uint32(buf.Len()))
	e.write(hdr[:])
	e.write(buf.Bytes())
	return e.err
}

// Package returns a Decoder over a package's blob (the Data of a
// KindCommand record whose Command is CmdPackaged): it starts between
// sections, knows the RAM blocks of d, and returns io.EOF where the blob
// ends between two records. d must not be used while the package
// decoder reads (it shares d's block table).
func (d *Decoder) Package(blob []byte) *Decoder {
	p := &Decoder{rb: newReader(bytes.NewReader(blob), max(len(blob), 16)), lim: d.lim, pageSize: d.pageSize, state: dsTop}
	p.lim.RequireHandshake = false
	p.lim.MaxPackage = 0 // no package inside a package
	p.anySection, p.handshake = true, d.handshake
	p.ramStarted, p.ramEnded, p.ramSec, p.memSize = d.ramStarted, d.ramEnded, d.ramSec, d.memSize
	p.blocks = d.blocks
	p.pkg = true
	return p
}

// NewReattachedDecoder returns a Decoder for the rest of a stream whose
// beginning another process read: a migctl that takes over a guest process
// in postcopy (`migctl serve --destination --reattach`) never saw the
// header, the handshake nor the RAM SECTION_START. Call Resume with the
// recovered channel before Next. The RAM section is adopted from the first
// SECTION_PART or SECTION_END (as "ram", instance 0, RAMVersion: the only
// iterable section the stream carries); a SECTION_START, a handshake or a
// second RAM section id is an error, as in any stream after its start.
// lim's blocks and page size are this side's (the guest process's);
// RequireHandshake is ignored.
func NewReattachedDecoder(lim Limits) *Decoder {
	lim.RequireHandshake = false
	d := NewDecoder(bytes.NewReader(nil), lim)
	d.anySection, d.handshake, d.memSize = true, true, true
	d.adoptRAM = true
	return d
}

// Resume makes the Decoder read the rest of a stream from r, a new
// connection after postcopy recovery: it keeps what the stream announced
// (the RAM blocks, the RAM section, the page size), forgets what the broken
// connection had buffered and the last block of a CONTINUE record (the
// first record after recovery names its block), and expects a section, a
// command or EOF next. A sticky error of the old connection is cleared.
func (d *Decoder) Resume(r io.Reader) {
	d.rb = newReader(r, decoderBufSize)
	d.err = nil
	d.state = dsTop
	d.last = nil
	d.ramEnded = false // a recovered source may send RAM sections again
	d.inFull, d.isHS = false, false
}

// Resume makes the Encoder write the rest of a stream to w, a new
// connection after postcopy recovery: it keeps what the stream announced
// (section ids, the RAM blocks and section, the page size), drops what it
// had buffered for the broken connection and any RAM section it had open,
// clears a sticky write error, and names the block in the next page record
// (QEMU resets the last block on both sides). No header is written: the
// destination knows the stream.
func (e *Encoder) Resume(w io.Writer) {
	fresh := newEncoder(w, true)
	e.bw, e.sock, e.vec, e.arena, e.open, e.queued = fresh.bw, fresh.sock, fresh.vec, fresh.arena, 0, 0
	e.err = nil
	if e.state == esRAMOpen || e.state == esClosed {
		e.state = esTop
	}
	e.ramEnded = false // pages lost with the link are sent again
	e.last = nil
}

// RecvBitmapCommand returns RECV_BITMAP's data for block: u8 length, name.
func RecvBitmapCommand(block string) []byte {
	b := []byte{byte(len(block))}
	return append(b, block...)
}

// ParseRecvBitmapCommand returns the block a RECV_BITMAP command or
// return-path message names.
func ParseRecvBitmapCommand(data []byte) (string, error) {
	if len(data) < 2 || int(data[0]) != len(data)-1 {
		return "", fmt.Errorf("%w: RECV_BITMAP carries %d bytes that are not a u8-counted block name", ErrCorrupt, len(data))
	}
	return string(data[1:]), nil
}

// RecvBitmapEnd is the end mark after a received bitmap (QEMU's
// RAMBLOCK_RECV_BITMAP_ENDING).
const RecvBitmapEnd = 0x0123456789abcdef

// RecvBitmapBytes is the size of a received bitmap of pages pages on the
// wire: one bit per page, in 64-bit words.
func RecvBitmapBytes(pages int) int { return (pages + 63) / 64 * 8 }

// WriteRecvBitmap writes, in one Write, the return-path message
// RECV_BITMAP(block) and, after it, the bitmap: be64 size, the words
// little-endian (page p is bit p%64 of word p/64), be64 RecvBitmapEnd.
func WriteRecvBitmap(w io.Writer, block string, words []uint64) error {
	if err := checkName("RAM block", block); err != nil {
		return err
	}
	m := RPMessage{Type: RPRecvBitmap, Data: RecvBitmapCommand(block)}
	b := make([]byte, 0, 4+len(m.Data)+16+8*len(words))
	b = binary.BigEndian.AppendUint16(b, uint16(m.Type))
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Data)))
	b = append(b, m.Data...)
	b = binary.BigEndian.AppendUint64(b, uint64(8*len(words)))
	for _, wd := range words {
		b = binary.LittleEndian.AppendUint64(b, wd)
	}
	b = binary.BigEndian.AppendUint64(b, RecvBitmapEnd)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("stream: writing the received bitmap of %q: %w", block, err)
	}
	return nil
}

// ReadRecvBitmap reads the bitmap that follows a RECV_BITMAP return-path
// message of a block of pages pages. The size must be exactly
// RecvBitmapBytes(pages), checked before anything is allocated; bits past
// the last page must be clear; the end mark must follow.
func ReadRecvBitmap(r io.Reader, pages int) ([]uint64, error) {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, rpReadErr(err, "received bitmap size")
	}
	want := RecvBitmapBytes(pages)
	if n := binary.BigEndian.Uint64(hdr[:]); n != uint64(want) {
		return nil, &DecodeError{Offset: -1, Class: ErrCorrupt, Detail: fmt.Sprintf("received bitmap of %d bytes for %d pages, want %d", n, pages, want)}
	}
	raw := make([]byte, want+8)
	if _, err := io.ReadFull(r, raw); err != nil {
		return nil, rpReadErr(err, "received bitmap")
	}
	if end := binary.BigEndian.Uint64(raw[want:]); end != RecvBitmapEnd {
		return nil, &DecodeError{Offset: -1, Class: ErrCorrupt, Detail: fmt.Sprintf("received bitmap ends with %#x, want the end mark %#x", end, uint64(RecvBitmapEnd))}
	}
	words := make([]uint64, want/8)
	for i := range words {
		words[i] = binary.LittleEndian.Uint64(raw[8*i:])
	}
	if tail := pages % 64; tail != 0 && len(words) > 0 && words[len(words)-1]>>tail != 0 {
		return nil, &DecodeError{Offset: -1, Class: ErrCorrupt, Detail: fmt.Sprintf("received bitmap marks %d pages past the block's %d", bits.OnesCount64(words[len(words)-1]>>tail), pages)}
	}
	return words, nil
}

// NewResumeAck returns RESUME_ACK(1) (MIGRATION_RESUME_ACK_VALUE).
func NewResumeAck() RPMessage { return rpUint32(RPResumeAck, 1) }

// NewReqPagesID returns REQ_PAGES_ID: length bytes from start of block.
func NewReqPagesID(block string, start uint64, length uint32) RPMessage {
	b := binary.BigEndian.AppendUint64(nil, start)
	b = binary.BigEndian.AppendUint32(b, length)
	b = append(b, byte(len(block)))
	return RPMessage{Type: RPReqPagesID, Data: append(b, block...)}
}

// NewReqPages returns REQ_PAGES: length bytes from start of the block the
// previous request named.
func NewReqPages(start uint64, length uint32) RPMessage {
	b := binary.BigEndian.AppendUint64(nil, start)
	return RPMessage{Type: RPReqPages, Data: binary.BigEndian.AppendUint32(b, length)}
}

// PageRequest decodes REQ_PAGES_ID (block set, named true) or REQ_PAGES
// (block empty: the previous request's). ok is false for other messages.
func (m RPMessage) PageRequest() (block string, named bool, start uint64, length uint32, ok bool) {
	switch m.Type {
	case RPReqPagesID:
		if len(m.Data) < 14 || int(m.Data[12]) != len(m.Data)-13 {
			return "", false, 0, 0, false
		}
		return string(m.Data[13:]), true, binary.BigEndian.Uint64(m.Data), binary.BigEndian.Uint32(m.Data[8:]), true
	case RPReqPages:
		if len(m.Data) != 12 {
			return "", false, 0, 0, false
		}
		return "", false, binary.BigEndian.Uint64(m.Data), binary.BigEndian.Uint32(m.Data[8:]), true
	}
	return "", false, 0, 0, false
}
