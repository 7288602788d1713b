package stream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
)

// Defaults that replace the zero fields of Limits.
const (
	DefaultMaxDevicePayload = 16 << 20
	DefaultMaxJSON          = 1 << 20
	DefaultMaxBlocks        = 1024
)

// decoderBufSize is the Decoder's read buffer. On a socket a fill reads what
// has arrived, up to this much, in one system call.
const decoderBufSize = 256 << 10

// blobChunk is how much a Decoder reads at a time for a length-prefixed blob,
// so memory grows with the bytes actually received, not with a length read
// from the stream.
const blobChunk = 64 << 10

// Limits is what the destination can accept. The zero value of every field
// means its default.
type Limits struct {
	// PageSize is the target page size (DefaultPageSize if 0). It must be a
	// power of two between MinPageSize and MaxPageSize.
	PageSize uint64
	// Blocks maps the destination's RAM block idstrs to their sizes. A
	// MEM_SIZE entry must name one of them and be no bigger; page records must
	// name one of them and lie inside it (inside the size the source
	// announced, if it did). If Blocks is nil the Decoder accepts the blocks
	// the MEM_SIZE record announces and checks pages against those: the mode
	// for tools that inspect a stream.
	Blocks map[string]uint64
	// MaxDevicePayload bounds a FULL section's payload
	// (DefaultMaxDevicePayload if 0).
	MaxDevicePayload int
	// MaxJSON bounds the handshake and the vmdesc (DefaultMaxJSON if 0).
	MaxJSON int
	// MaxIDStr bounds section idstrs (MaxIDStr if 0 or larger).
	MaxIDStr int
	// MaxBlocks bounds the number of MEM_SIZE entries (DefaultMaxBlocks if 0).
	MaxBlocks int
	// MaxMachineName bounds the configuration's machine name (MaxMachineName
	// if 0).
	MaxMachineName int
	// RequireHandshake makes a stream whose first section is not the migctl
	// handshake an error (class ErrMismatch): the source is not migctl.
	RequireHandshake bool
	// MaxPackage, when positive, lets the stream carry PACKAGED commands
	// (postcopy's package) of at most this many bytes: Next returns the
	// blob in Record.Data and Decoder.Package reads it. 0 refuses them
	// (class ErrUnsupported), as a destination that does not take postcopy.
	MaxPackage int
}

func (l Limits) normalize() (Limits, error) {
	if l.PageSize == 0 {
		l.PageSize = DefaultPageSize
	}
	if !validPageSize(l.PageSize) {
		return l, fmt.Errorf("%w: Limits.PageSize %d is not a power of two between %d and %d", ErrInvalid, l.PageSize, MinPageSize, MaxPageSize)
	}
	if l.MaxDevicePayload <= 0 {
		l.MaxDevicePayload = DefaultMaxDevicePayload
	}
	if l.MaxJSON <= 0 {
		l.MaxJSON = DefaultMaxJSON
	}
	if l.MaxIDStr <= 0 || l.MaxIDStr > MaxIDStr {
		l.MaxIDStr = MaxIDStr
	}
	if l.MaxBlocks <= 0 {
		l.MaxBlocks = DefaultMaxBlocks
	}
	if l.MaxMachineName <= 0 {
		l.MaxMachineName = MaxMachineName
	}
	return l, nil
}

// Decoder states.
const (
	dsHeader   = iota // magic and version next
	dsConfig          // a configuration section may come next
	dsTop             // a section, command or EOF next
	dsRAM             // RAM records next
	dsPage            // page bytes next (ReadPage/SkipPage)
	dsPayload         // a FULL section's be32 length and payload next
	dsFooter          // a footer next
	dsAfterEOF        // a vmdesc or the end next
	dsDone
)

type decBlock struct {
	name      string
	dest      uint64 // destination's size; 0 in tool mode
	size      uint64 // limit for page offsets: announced size, else dest
	announced bool
}

// Decoder reads a migration stream record by record (pull-based), so that a
// loader can read each page's bytes straight into guest memory with
// ReadPage. It checks every length against its Limits before using it, never
// allocates more than the bytes actually received (bounded by the Limits),
// and returns errors, never panics, on any input.
//
// A Decoder is owned by one goroutine: Next, ReadPage and SkipPage must not
// be called concurrently. Stats may be called from any goroutine. After an
// error every call returns the same error.
type Decoder struct {
	rb       *reader
	lim      Limits
	pageSize uint64
	state    int
	err      error // sticky

	off atomic.Int64 // bytes consumed

	sec        Section // the open section
	anySection bool
	handshake  bool // handshake section seen
	isHS       bool // the open FULL section is the handshake
	inFull     bool // the open section is a FULL section

	ramStarted bool
	ramEnded   bool // END section opened
	ramInStart bool // the open RAM section is the START
	memSize    bool // MEM_SIZE seen
	ramSec     Section
	adoptRAM   bool // NewReattachedDecoder: the first RAM continuation names the RAM section
	blocks     map[string]*decBlock
	last       *decBlock

	scratch [MaxIDStr + 1]byte
	buf     []byte // device, command and JSON payloads

	pages, zeros atomic.Uint64

	vmdesc bool // the vmdesc was read (NextTrailer may follow)
	pkg    bool // a package's decoder (Decoder.Package): its end is io.EOF
}

// DecoderStats counts what a Decoder has read.
type DecoderStats struct {
	Bytes     uint64 // stream bytes consumed
	Pages     uint64 // pages read or skipped
	ZeroPages uint64 // ZERO records
}

// NewDecoder returns a Decoder reading r through a 256 KiB buffer (smaller
// if r reports a smaller Len, as bytes.Reader does). Invalid Limits are
// reported by the first call to Next.
//
// If r is a socket (a *net.TCPConn or *net.UnixConn, or what r's Unwrap()
// any method returns, as for transport's tcp: and unix: Conns), ReadPage
// reads the part of a page its buffer lacks with readv on the socket itself,
// bypassing r's Read method: a wrapper whose Read does more than pass the
// bytes on (decryption, bytes it holds back) must not return the socket from
// Unwrap() any. transport's Conns only pass them on.
func NewDecoder(r io.Reader, lim Limits) *Decoder {
	size := decoderBufSize
	if l, ok := r.(interface{ Len() int }); ok {
		size = min(size, max(l.Len(), 16))
	}
	d := &Decoder{rb: newReader(r, size)}
	l, err := lim.normalize()
	if err != nil {
		d.err = err
		return d
	}
	d.lim = l
	d.pageSize = l.PageSize
	d.blocks = make(map[string]*decBlock, len(l.Blocks))
	for name, size := range l.Blocks {
		d.blocks[name] = &decBlock{name: name, dest: size, size: size}
	}
	return d
}

// Stats returns the counters so far. It is safe to call from any goroutine.
func (d *Decoder) Stats() DecoderStats {
	return DecoderStats{Bytes: uint64(d.off.Load()), Pages: d.pages.Load(), ZeroPages: d.zeros.Load()}
}

// Offset returns the number of stream bytes consumed so far.
func (d *Decoder) Offset() int64 { return d.off.Load() }

// PageSize returns the page size the Decoder reads pages with.
func (d *Decoder) PageSize() uint64 { return d.pageSize }

// Next returns the next record. Before calling Next again after a KindPage
// record, call ReadPage or SkipPage. After KindEOF, Next reads the trailing
// vmdesc if the peer sends one (on a socket it blocks until the peer sends it
// or closes) and then returns io.EOF.
func (d *Decoder) Next() (Record, error) {
	if d.err != nil {
		return Record{}, d.err
	}
	if d.state == dsPage {
		return Record{}, orderf("Next called before ReadPage or SkipPage consumed the pending page")
	}
	rec, err := d.next()
	if err != nil {
		d.err = err
	}
	return rec, err
}

// ReadPage reads the pending page's bytes into dst, which must be exactly
// PageSize bytes (typically the guest memory at the record's offset). The
// part of the page the Decoder's buffer holds is copied from it; the rest is
// read from r straight into dst, with no copy in between.
func (d *Decoder) ReadPage(dst []byte) error {
	if d.err != nil {
		return d.err
	}
	if d.state != dsPage {
		return orderf("ReadPage with no page record pending")
	}
	if uint64(len(dst)) != d.pageSize {
		return fmt.Errorf("%w: ReadPage needs a %d-byte buffer, got %d", ErrInvalid, d.pageSize, len(dst))
	}
	var n int
	var err error
	if d.rb.direct {
		n, err = d.rb.readPage(dst)
	} else {
		d.rb.copied += uint64(len(dst))
		n, err = io.ReadFull(d.rb, dst)
	}
	d.off.Add(int64(n))
	if err != nil {
		d.err = d.ioErr(err, "page data")
		return d.err
	}
	d.state = dsRAM
	d.pages.Add(1)
	return nil
}

// SkipPage discards the pending page's bytes.
func (d *Decoder) SkipPage() error {
	if d.err != nil {
		return d.err
	}
	if d.state != dsPage {
		return orderf("SkipPage with no page record pending")
	}
	n, err := d.rb.discard(int(d.pageSize))
	d.off.Add(int64(n))
	if err != nil {
		d.err = d.ioErr(err, "page data")
		return d.err
	}
	d.state = dsRAM
	d.pages.Add(1)
	return nil
}

// --- low-level reading ---

func (d *Decoder) readFull(p []byte, what string) error {
	if b := d.rb; b.buffered() >= len(p) {
		b.r += copy(p, b.buf[b.r:b.w])
		d.off.Add(int64(len(p)))
		return nil
	}
	n, err := io.ReadFull(d.rb, p)
	d.off.Add(int64(n))
	if err != nil {
		return d.ioErr(err, what)
	}
	return nil
}

func (d *Decoder) readU8(what string) (byte, error) {
	err := d.readFull(d.scratch[:1], what)
	return d.scratch[0], err
}

func (d *Decoder) readBE16(what string) (uint16, error) {
	err := d.readFull(d.scratch[:2], what)
	return binary.BigEndian.Uint16(d.scratch[:2]), err
}

func (d *Decoder) readBE32(what string) (uint32, error) {
	err := d.readFull(d.scratch[:4], what)
	return binary.BigEndian.Uint32(d.scratch[:4]), err
}

func (d *Decoder) readBE64(what string) (uint64, error) {
	err := d.readFull(d.scratch[:8], what)
	return binary.BigEndian.Uint64(d.scratch[:8]), err
}

// readName reads a u8-counted name into scratch and returns it (valid until
// the next read). An empty name is corrupt.
func (d *Decoder) readName(what string) ([]byte, error) {
	pos := d.Offset()
	n, err := d.readU8(what)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, d.corrupt(pos, nil, "empty %s", what)
	}
	if err := d.readFull(d.scratch[:n], what); err != nil {
		return nil, err
	}
	return d.scratch[:n], nil
}

// readBlob reads n bytes into d.buf, growing it as bytes arrive.
func (d *Decoder) readBlob(n int, what string) ([]byte, error) {
	buf := d.buf[:0]
	for len(buf) < n {
		chunk := min(n-len(buf), max(blobChunk, len(buf)))
		if cap(buf)-len(buf) < chunk {
			nb := make([]byte, len(buf), len(buf)+chunk)
			copy(nb, buf)
			buf = nb
		}
		m, err := io.ReadFull(d.rb, buf[len(buf):len(buf)+chunk])
		buf = buf[:len(buf)+m]
		d.off.Add(int64(m))
		if err != nil {
			d.buf = buf
			return nil, d.ioErr(err, what)
		}
	}
	d.buf = buf
	return buf, nil
}

// ioErr turns a read error into the Decoder's error: running out of bytes is
// corruption (the stream ends without its EOF marker); anything else is the
// reader's error, passed on.
func (d *Decoder) ioErr(err error, what string) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &DecodeError{Offset: d.Offset(), Class: ErrCorrupt, Detail: "stream ends inside " + what, Err: io.ErrUnexpectedEOF}
	}
	return fmt.Errorf("stream: reading %s at byte %d: %w", what, d.Offset(), err)
}

func (d *Decoder) corrupt(pos int64, reason error, format string, args ...any) error {
	return &DecodeError{Offset: pos, Class: ErrCorrupt, Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

func (d *Decoder) tooLarge(pos int64, format string, args ...any) error {
	return &DecodeError{Offset: pos, Class: ErrTooLarge, Detail: fmt.Sprintf(format, args...)}
}

func (d *Decoder) unsupported(pos int64, format string, args ...any) error {
	return &DecodeError{Offset: pos, Class: ErrUnsupported, Detail: fmt.Sprintf(format, args...)}
}

// --- the state machine ---

func (d *Decoder) next() (Record, error) {
	for {
		switch d.state {
		case dsHeader:
			if err := d.readHeader(); err != nil {
				return Record{}, err
			}
		case dsConfig, dsTop:
			return d.nextTop()
		case dsRAM:
			return d.nextRAM()
		case dsPayload:
			return d.nextPayload()
		case dsFooter:
			return d.nextFooter()
		case dsAfterEOF:
			return d.nextVMDesc()
		default:
			return Record{}, io.EOF
		}
	}
}

func (d *Decoder) readHeader() error {
	magic, err := d.readBE32("the stream header")
	if err != nil {
		return err
	}
	if magic != Magic {
		return d.corrupt(0, nil, "stream starts with %#08x, not the QEVM magic %#08x: not a migration stream", magic, Magic)
	}
	version, err := d.readBE32("the stream header")
	if err != nil {
		return err
	}
	if version != Version {
		return d.corrupt(4, nil, "stream version %d, only version %d is supported", version, Version)
	}
	d.state = dsConfig
	return nil
}

func (d *Decoder) nextTop() (Record, error) {
	pos := d.Offset()
	n, err := io.ReadFull(d.rb, d.scratch[:1])
	d.off.Add(int64(n))
	if err == io.EOF && d.pkg {
		d.state = dsDone
		return Record{}, io.EOF
	}
	if err == io.EOF {
		return Record{}, &DecodeError{Offset: pos, Class: ErrCorrupt, Detail: "stream ends before its EOF marker (0x00)", Err: io.ErrUnexpectedEOF}
	}
	if err != nil {
		return Record{}, d.ioErr(err, "a section type")
	}
	typ := d.scratch[0]
	wasConfig := d.state == dsConfig
	d.state = dsTop
	switch typ {
	case SecConfig:
		if !wasConfig {
			return Record{}, d.corrupt(pos, nil, "configuration section after the start of the stream")
		}
		return d.readConfig(pos)
	case SecStart, SecFull:
		return d.readSectionHeader(pos, typ)
	case SecPart, SecEnd:
		return d.readRAMContinuation(pos, typ)
	case SecCommand:
		return d.readCommand(pos)
	case SecEOF:
		if d.lim.RequireHandshake && !d.handshake {
			return Record{}, d.noHandshake(pos)
		}
		d.state = dsAfterEOF
		return Record{Kind: KindEOF, Pos: pos}, nil
	case SecVMDesc:
		return Record{}, d.corrupt(pos, nil, "vmdesc (0x06) before the EOF marker")
	default:
		return Record{}, d.corrupt(pos, nil, "unknown section type %#02x", typ)
	}
}

func (d *Decoder) noHandshake(pos int64) error {
	return &DecodeError{Offset: pos, Class: ErrMismatch,
		Detail: fmt.Sprintf("stream does not start with the %q section: the source is not migctl, or too old", HandshakeIDStr)}
}

func (d *Decoder) readConfig(pos int64) (Record, error) {
	n, err := d.readBE32("the configuration section")
	if err != nil {
		return Record{}, err
	}
	if uint64(n) > uint64(d.lim.MaxMachineName) {
		return Record{}, d.tooLarge(pos, "machine name of %d bytes, limit %d", n, d.lim.MaxMachineName)
	}
	name, err := d.readBlob(int(n), "the machine name")
	if err != nil {
		return Record{}, err
	}
	return Record{Kind: KindConfig, Pos: pos, Machine: string(name)}, nil
}

func (d *Decoder) readSectionHeader(pos int64, typ byte) (Record, error) {
	what := "a section header"
	id, err := d.readBE32(what)
	if err != nil {
		return Record{}, err
	}
	namePos := d.Offset()
	idlen, err := d.readU8(what)
	if err != nil {
		return Record{}, err
	}
	if idlen == 0 {
		return Record{}, d.corrupt(namePos, nil, "section %d has an empty idstr", id)
	}
	if int(idlen) > d.lim.MaxIDStr {
		return Record{}, d.tooLarge(namePos, "section idstr of %d bytes, limit %d", idlen, d.lim.MaxIDStr)
	}
	if err := d.readFull(d.scratch[:idlen], what); err != nil {
		return Record{}, err
	}
	idstr := string(d.scratch[:idlen])
	instance, err := d.readBE32(what)
	if err != nil {
		return Record{}, err
	}
	version, err := d.readBE32(what)
	if err != nil {
		return Record{}, err
	}
	sec := Section{ID: id, IDStr: idstr, Instance: instance, Version: version}
	if d.lim.RequireHandshake && !d.anySection && idstr != HandshakeIDStr {
		return Record{}, d.noHandshake(pos)
	}
	first := !d.anySection
	d.anySection = true
	d.sec = sec
	d.inFull = typ == SecFull
	if typ == SecStart {
		if idstr != RAMIDStr || instance != 0 {
			return Record{}, d.unsupported(pos, "iterable section %q instance %d: only RAM (\"ram\", 0) is supported", idstr, instance)
		}
		if version != RAMVersion {
			return Record{}, d.unsupported(pos, "RAM section version %d, want %d", version, RAMVersion)
		}
		if d.ramStarted || d.adoptRAM {
			return Record{}, d.corrupt(pos, nil, "second RAM SECTION_START (id %d)", id)
		}
		d.ramStarted, d.ramInStart = true, true
		d.ramSec = sec
		d.state = dsRAM
		return Record{Kind: KindSectionStart, Pos: pos, Section: sec}, nil
	}
	// FULL
	if idstr == RAMIDStr {
		return Record{}, d.corrupt(pos, nil, "RAM in a FULL section (id %d)", id)
	}
	d.isHS = idstr == HandshakeIDStr
	if d.isHS {
		switch {
		case d.handshake:
			return Record{}, d.corrupt(pos, nil, "second %q section", HandshakeIDStr)
		case !first:
			return Record{}, d.corrupt(pos, nil, "%q section after other sections: it must be the first", HandshakeIDStr)
		case instance != 0:
			return Record{}, d.corrupt(pos, nil, "%q section with instance %d, want 0", HandshakeIDStr, instance)
		case version != HandshakeVersion && version != HandshakeVersionUUID:
			return Record{}, d.unsupported(pos, "%q section version %d, this build reads versions %d and %d", HandshakeIDStr, version, HandshakeVersion, HandshakeVersionUUID)
		}
		d.handshake = true
	}
	d.state = dsPayload
	return Record{Kind: KindSectionFull, Pos: pos, Section: sec}, nil
}

func (d *Decoder) readRAMContinuation(pos int64, typ byte) (Record, error) {
	id, err := d.readBE32("a section header")
	if err != nil {
		return Record{}, err
	}
	name := "SECTION_PART"
	kind := KindSectionPart
	if typ == SecEnd {
		name, kind = "SECTION_END", KindSectionEnd
	}
	if d.adoptRAM && !d.ramStarted {
		d.ramStarted, d.adoptRAM = true, false
		d.ramSec = Section{ID: id, IDStr: RAMIDStr, Instance: 0, Version: RAMVersion}
	}
	switch {
	case !d.ramStarted || id != d.ramSec.ID:
		return Record{}, d.corrupt(pos, nil, "%s for section id %d, which no SECTION_START opened", name, id)
	case d.ramEnded:
		return Record{}, d.corrupt(pos, nil, "%s for section id %d after its SECTION_END", name, id)
	}
	if typ == SecEnd {
		d.ramEnded = true
	}
	d.ramInStart = false
	d.sec = d.ramSec
	d.inFull = false
	d.state = dsRAM
	return Record{Kind: kind, Pos: pos, Section: d.ramSec}, nil
}

func (d *Decoder) readCommand(pos int64) (Record, error) {
	what := "a command"
	c, err := d.readBE16(what)
	if err != nil {
		return Record{}, err
	}
	n, err := d.readBE16(what)
	if err != nil {
		return Record{}, err
	}
	cmd := Command(c)
	if cmd == CmdPackaged && d.lim.MaxPackage <= 0 {
		return Record{}, d.unsupported(pos, "command %v (packaged postcopy device state)", cmd)
	}
	if cmd == 0 || cmd >= cmdMax {
		return Record{}, d.corrupt(pos, nil, "unknown command %d", c)
	}
	data, err := d.readBlob(int(n), "command data")
	if err != nil {
		return Record{}, err
	}
	if msg := checkCommand(cmd, data); msg != "" {
		return Record{}, d.corrupt(pos, nil, "%s", msg)
	}
	if cmd == CmdPackaged {
		length := binary.BigEndian.Uint32(data)
		if uint64(length) > uint64(d.lim.MaxPackage) {
			return Record{}, d.tooLarge(pos, "package of %d bytes, limit %d", length, d.lim.MaxPackage)
		}
		blob, err := d.readBlob(int(length), "the package")
		if err != nil {
			return Record{}, err
		}
		return Record{Kind: KindCommand, Pos: pos, Command: cmd, Data: blob, Value: uint64(length)}, nil
	}
	rec := Record{Kind: KindCommand, Pos: pos, Command: cmd, Data: data}
	if cmd == CmdPing {
		rec.Value = uint64(binary.BigEndian.Uint32(data))
	}
	return rec, nil
}

func (d *Decoder) nextRAM() (Record, error) {
	pos := d.Offset()
	w, err := d.readBE64("a RAM record")
	if err != nil {
		return Record{}, err
	}
	ps := d.pageSize
	flags := w & (ps - 1)
	addr := w &^ (ps - 1)
	sec := d.ramSec
	if flags&^flagBits != 0 {
		off := w &^ flagBits
		return Record{}, d.corrupt(pos, ErrUnaligned, "record offset %#x is not a multiple of the page size %#x", off, ps)
	}
	cont := flags&FlagContinue != 0
	switch f := flags &^ FlagContinue; f {
	case FlagMemSize:
		if cont || !d.ramInStart || d.memSize {
			return Record{}, d.corrupt(pos, nil, "MEM_SIZE record outside the start of the RAM section")
		}
		return d.readMemSize(pos, addr)
	case FlagZero, FlagPage:
		return d.readPageRecord(pos, f, cont, addr)
	case FlagEOS:
		if w != FlagEOS {
			return Record{}, d.corrupt(pos, nil, "EOS record %#x carries other bits", w)
		}
		d.state = dsFooter
		return Record{Kind: KindEOS, Pos: pos, Section: sec}, nil
	case FlagMultifdFlush:
		if w != FlagMultifdFlush {
			return Record{}, d.corrupt(pos, nil, "MULTIFD_FLUSH record %#x carries other bits", w)
		}
		return Record{Kind: KindFlush, Pos: pos, Section: sec}, nil
	case FlagXBZRLE:
		return Record{}, d.unsupported(pos, "XBZRLE page: turn the xbzrle capability off on the source")
	case FlagHook:
		return Record{}, d.unsupported(pos, "RDMA hook in the RAM stream")
	case FlagCompressPage:
		return Record{}, d.unsupported(pos, "compressed page: turn the compress capability off on the source")
	default:
		return Record{}, d.corrupt(pos, nil, "RAM record with unknown flag combination %#x", flags)
	}
}

func (d *Decoder) readMemSize(pos int64, total uint64) (Record, error) {
	d.memSize = true
	var blocks []Block
	remaining := total
	for remaining > 0 {
		epos := d.Offset()
		if len(blocks) >= d.lim.MaxBlocks {
			return Record{}, d.tooLarge(epos, "MEM_SIZE lists more than %d RAM blocks", d.lim.MaxBlocks)
		}
		nb, err := d.readName("RAM block idstr")
		if err != nil {
			return Record{}, err
		}
		b := d.blocks[string(nb)]
		name := string(nb)
		if b == nil && d.lim.Blocks != nil {
			return Record{}, &DecodeError{Offset: epos, Class: ErrMismatch, Reason: ErrUnknownBlock, Block: name,
				Detail: fmt.Sprintf("source has RAM block %q, this destination does not", name)}
		}
		size, err := d.readBE64("RAM block size")
		if err != nil {
			return Record{}, err
		}
		if b != nil && b.announced {
			return Record{}, d.corrupt(epos, nil, "RAM block %q listed twice in MEM_SIZE", name)
		}
		if size > remaining {
			return Record{}, d.corrupt(epos, nil, "RAM block %q size %#x exceeds what is left of the MEM_SIZE total %#x (%#x)", name, size, total, remaining)
		}
		if b != nil && size > b.dest {
			return Record{}, &DecodeError{Offset: epos, Class: ErrMismatch, Reason: ErrBlockSize, Block: name,
				Detail: fmt.Sprintf("RAM block %q is %#x bytes on the source, only %#x here", name, size, b.dest)}
		}
		if b == nil {
			b = &decBlock{name: name}
			d.blocks[name] = b
		}
		b.size, b.announced = size, true
		remaining -= size
		blocks = append(blocks, Block{Name: b.name, Size: size})
	}
	return Record{Kind: KindMemSize, Pos: pos, Section: d.ramSec, Blocks: blocks, Value: total}, nil
}

func (d *Decoder) readPageRecord(pos int64, f uint64, cont bool, addr uint64) (Record, error) {
	what := "page"
	kind := KindPage
	if f == FlagZero {
		what, kind = "zero page", KindZero
	}
	var b *decBlock
	if cont {
		b = d.last
		if b == nil {
			return Record{}, d.corrupt(pos, ErrNoBlock, "%s at %#x has CONTINUE but no earlier record named a block", what, addr)
		}
	} else {
		nb, err := d.readName("RAM block idstr")
		if err != nil {
			return Record{}, err
		}
		b = d.blocks[string(nb)]
		if b == nil {
			name := string(nb)
			return Record{}, &DecodeError{Offset: pos, Class: ErrMismatch, Reason: ErrUnknownBlock, Block: name,
				Detail: fmt.Sprintf("%s at %#x in unknown RAM block %q", what, addr, name)}
		}
		d.last = b
	}
	if addr >= b.size || b.size-addr < d.pageSize {
		return Record{}, &DecodeError{Offset: pos, Class: ErrCorrupt, Reason: ErrPageOutside, Block: b.name,
			Detail: fmt.Sprintf("%s at %#x outside block %q (size %#x)", what, addr, b.name, b.size)}
	}
	flags := f
	if cont {
		flags |= FlagContinue
	}
	rec := Record{Kind: kind, Pos: pos, Section: d.ramSec, Block: b.name, Offset: addr, Flags: flags}
	if kind == KindZero {
		fpos := d.Offset()
		fill, err := d.readU8("zero page fill byte")
		if err != nil {
			return Record{}, err
		}
		if fill != 0 {
			return Record{}, d.corrupt(fpos, nil, "zero page at %#x in %q has fill byte %#02x, want 0", addr, b.name, fill)
		}
		d.zeros.Add(1)
		return rec, nil
	}
	d.state = dsPage
	return rec, nil
}

func (d *Decoder) nextPayload() (Record, error) {
	pos := d.Offset()
	n, err := d.readBE32("a device payload length")
	if err != nil {
		return Record{}, err
	}
	sec := d.sec
	limit, what := d.lim.MaxDevicePayload, "device"
	if d.isHS {
		limit, what = d.lim.MaxJSON, "handshake"
	}
	if uint64(n) > uint64(limit) {
		return Record{}, d.tooLarge(pos, "%s %q payload of %d bytes, limit %d", what, sec.IDStr, n, limit)
	}
	data, err := d.readBlob(int(n), what+" payload")
	if err != nil {
		return Record{}, err
	}
	d.state = dsFooter
	if !d.isHS {
		return Record{Kind: KindDevice, Pos: pos, Section: sec, Data: data}, nil
	}
	h, msg := parseHandshake(data, sec.Version)
	if msg != "" {
		return Record{}, d.corrupt(pos+4, nil, "%s", msg)
	}
	return Record{Kind: KindHandshake, Pos: pos, Section: sec, Data: data, Handshake: h}, nil
}

func (d *Decoder) nextFooter() (Record, error) {
	pos := d.Offset()
	sec := d.sec
	typ, err := d.readU8("a section footer")
	if err != nil {
		return Record{}, err
	}
	hint := ""
	if d.inFull && !d.isHS {
		hint = " (if this is QEMU's own device state: only migctl's length-prefixed device sections can be decoded)"
	}
	if typ != SecFooter {
		return Record{}, d.corrupt(pos, ErrFooter, "section %d (%q) is not followed by its footer: found byte %#02x, want %#02x%s", sec.ID, sec.IDStr, typ, SecFooter, hint)
	}
	id, err := d.readBE32("a section footer")
	if err != nil {
		return Record{}, err
	}
	if id != sec.ID {
		return Record{}, d.corrupt(pos, ErrFooter, "footer names section %d, but section %d (%q) is open%s", id, sec.ID, sec.IDStr, hint)
	}
	d.state = dsTop
	return Record{Kind: KindFooter, Pos: pos, Section: sec}, nil
}

func (d *Decoder) nextVMDesc() (Record, error) {
	pos := d.Offset()
	n, err := io.ReadFull(d.rb, d.scratch[:1])
	d.off.Add(int64(n))
	if err == io.EOF {
		d.state = dsDone
		return Record{}, io.EOF
	}
	if err != nil {
		return Record{}, d.ioErr(err, "the vmdesc")
	}
	if d.scratch[0] != SecVMDesc {
		return Record{}, d.corrupt(pos, nil, "byte %#02x after the EOF marker, want the vmdesc (0x06) or the end", d.scratch[0])
	}
	ln, err := d.readBE32("the vmdesc length")
	if err != nil {
		return Record{}, err
	}
	if uint64(ln) > uint64(d.lim.MaxJSON) {
		return Record{}, d.tooLarge(pos, "vmdesc of %d bytes, limit %d", ln, d.lim.MaxJSON)
	}
	data, err := d.readBlob(int(ln), "the vmdesc")
	if err != nil {
		return Record{}, err
	}
	d.state = dsDone
	d.vmdesc = true
	return Record{Kind: KindVMDesc, Pos: pos, Data: data}, nil
}
