package stream

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"sync/atomic"
	"unicode/utf8"
)

// encoderBufSize is the Encoder's write buffer: large enough that a run of
// 4 KiB pages reaches the writer in 256 KiB writes. In vector mode it is the
// number of queued bytes (copied or referenced) that triggers a writev, and
// the capacity of the arena holding the copied bytes.
const encoderBufSize = 256 << 10

// vecMax bounds the segments (iovecs) an Encoder queues in vector mode. With
// 4 KiB pages a 256 KiB flush needs about 130; Linux's IOV_MAX is 1024 (the
// standard library splits longer vectors anyway).
const vecMax = 1024

// Encoder states.
const (
	esNew     = iota // nothing written yet: only WriteHeader
	esTop            // between sections
	esRAMOpen        // inside a RAM PART or END section
	esClosed         // Close returned
)

// Encoder writes a QEMU-format migration stream (see the package doc for the
// order of calls). It buffers its output: call Flush when the peer must see
// what was written so far (after each section in a live migration), and Close
// to finish the stream.
//
// Output modes. Writing to a socket (a *net.TCPConn or *net.UnixConn, given
// directly or as what w's Unwrap() any method returns: transport's tcp: and
// unix: Conns), the Encoder queues its output as segments and hands them to
// writev (vector mode, see ZeroCopy): the bytes it produces itself are copied
// into an arena, the pages given to PutPageRef are referenced, not copied.
// Writing to anything else (files, pipes, exec:, TLS, buffers) it copies
// everything through a 256 KiB bufio.Writer, PutPageRef included. The bytes
// on the wire are the same in both modes.
//
// An Encoder is owned by one goroutine: its methods must not be called
// concurrently. Stats is the exception and may be called from any goroutine.
//
// Methods return an error wrapping ErrOrder or ErrInvalid, without writing
// anything, when called out of order or with arguments that cannot be
// encoded; the Encoder stays usable. A write error from the underlying writer
// is sticky: every later call returns it.
type Encoder struct {
	bw    *bufio.Writer // copy mode; nil in vector mode
	err   error         // sticky write error
	state int

	// Vector mode (sock != nil). vec holds the queued segments in stream
	// order: slices of arena (bytes the Encoder copied) and pages queued by
	// PutPageRef. arena's capacity never grows, so the segments cut from it
	// stay valid until flushVec resets it; arena[open:] is the segment still
	// growing. queued counts the bytes in vec and in the open segment.
	sock   net.Conn
	vec    net.Buffers
	wv     net.Buffers // what WriteTo consumes (a field: a local would escape)
	arena  []byte
	open   int
	queued int

	nextID uint32 // next section id

	// Handshake and devices.
	handshake   *Handshake // as written, nil if none
	anySection  bool       // a START or FULL section has been written
	devices     []VMDescDevice
	seenDevices map[devKey]bool

	// RAM.
	pageSize   uint64
	ramStarted bool
	ramEnded   bool // an END section was opened
	ramID      uint32
	blocks     map[string]*encBlock
	last       *encBlock // block of the previous page/zero record (CONTINUE)

	scratch [1 + 4 + 1 + MaxIDStr + 4 + 4 + 8]byte

	bytes, pages, zeros atomic.Uint64
}

type devKey struct {
	idstr    string
	instance uint32
}

type encBlock struct {
	name string
	size uint64
}

// EncoderStats counts what an Encoder has produced. Bytes includes bytes
// still in the Encoder's buffer.
type EncoderStats struct {
	Bytes     uint64 // stream bytes encoded
	Pages     uint64 // PAGE records
	ZeroPages uint64 // ZERO records
}

// NewEncoder returns an Encoder writing to w: with writev if w is a socket
// (vector mode, see the Encoder's doc), else through a 256 KiB buffer. The
// caller owns w: the Encoder never closes it.
//
// In vector mode the Encoder writes to the socket itself, bypassing w's Write
// method: a wrapper whose Write does more than pass the bytes on (encryption,
// accounting, pacing) must not return the socket from Unwrap() any.
// transport's Conns only pass them on.
func NewEncoder(w io.Writer) *Encoder { return newEncoder(w, true) }

// newEncoder is NewEncoder; vector false forces copy mode (main's path, for
// tests and benchmarks).
func newEncoder(w io.Writer, vector bool) *Encoder {
	e := &Encoder{
		pageSize:    DefaultPageSize,
		seenDevices: make(map[devKey]bool),
	}
	if s := socketOf(w); s != nil && vector {
		e.sock = s
		e.arena = make([]byte, 0, encoderBufSize)
		e.vec = make(net.Buffers, 0, vecMax)
	} else {
		e.bw = bufio.NewWriterSize(w, encoderBufSize)
	}
	return e
}

// socketOf returns the stream socket behind v that writev and readv can use:
// v itself, or what its Unwrap() any method returns, if that is a
// *net.TCPConn or a *net.UnixConn; else nil. (net.Buffers.WriteTo uses
// writev for exactly these; for other writers it would make one Write call
// per segment.)
func socketOf(v any) net.Conn {
	if u, ok := v.(interface{ Unwrap() any }); ok {
		v = u.Unwrap()
	}
	switch c := v.(type) {
	case *net.TCPConn:
		return c
	case *net.UnixConn:
		return c
	}
	return nil
}

// ZeroCopy reports whether the Encoder is in vector mode: it writes to a
// socket with writev and PutPageRef queues pages by reference. If false,
// PutPageRef copies pages exactly as PutPage does.
func (e *Encoder) ZeroCopy() bool { return e.sock != nil }

// Stats returns the counters so far. It is safe to call from any goroutine.
func (e *Encoder) Stats() EncoderStats {
	return EncoderStats{Bytes: e.bytes.Load(), Pages: e.pages.Load(), ZeroPages: e.zeros.Load()}
}

// PageSize returns the page size of the RAM records: the one given to
// StartRAM, else the handshake's, else DefaultPageSize.
func (e *Encoder) PageSize() uint64 { return e.pageSize }

// Flush writes any buffered data to the underlying writer. When it returns,
// the Encoder holds no reference to a page given to PutPageRef (also when it
// fails).
func (e *Encoder) Flush() error {
	if e.err != nil {
		return e.err
	}
	if e.sock != nil {
		e.flushVec()
		return e.err
	}
	if err := e.bw.Flush(); err != nil {
		e.err = fmt.Errorf("stream: write: %w", err)
	}
	return e.err
}

// write appends bytes the caller may reuse as soon as write returns.
func (e *Encoder) write(p []byte) {
	if e.err != nil {
		return
	}
	if e.sock == nil {
		n, err := e.bw.Write(p)
		e.bytes.Add(uint64(n))
		if err != nil {
			e.err = fmt.Errorf("stream: write: %w", err)
		}
		return
	}
	e.bytes.Add(uint64(len(p)))
	if len(p) > cap(e.arena)-len(e.arena) {
		// No room: send p from the caller's memory with the queue, now,
		// before write returns.
		e.seal()
		e.vec = append(e.vec, p)
		e.flushVec()
		return
	}
	e.arena = append(e.arena, p...)
	e.queued += len(p)
	if e.queued >= encoderBufSize {
		e.flushVec()
	}
}

// ref queues page by reference (vector mode only).
func (e *Encoder) ref(page []byte) {
	if e.err != nil {
		return
	}
	e.bytes.Add(uint64(len(page)))
	e.seal()
	e.vec = append(e.vec, page)
	e.queued += len(page)
	if e.queued >= encoderBufSize || len(e.vec) >= vecMax-1 {
		e.flushVec()
	}
}

// seal closes the arena's open segment and queues it.
func (e *Encoder) seal() {
	if n := len(e.arena); n > e.open {
		e.vec = append(e.vec, e.arena[e.open:n:n])
		e.open = n
	}
}

// flushVec writes the queue with writev, then drops it (and with it every
// reference to the caller's pages), whether or not the write succeeded.
func (e *Encoder) flushVec() {
	e.seal()
	if len(e.vec) > 0 && e.err == nil {
		e.wv = e.vec // WriteTo consumes e.wv; e.vec keeps the length to clear
		if _, err := e.wv.WriteTo(e.sock); err != nil {
			e.err = fmt.Errorf("stream: write: %w", err)
		}
		e.wv = nil
	}
	clear(e.vec)
	e.vec = e.vec[:0]
	e.arena = e.arena[:0]
	e.open, e.queued = 0, 0
}

func (e *Encoder) writeByte(c byte) {
	e.scratch[0] = c
	e.write(e.scratch[:1])
}

func (e *Encoder) writeBE32(v uint32) {
	binary.BigEndian.PutUint32(e.scratch[:4], v)
	e.write(e.scratch[:4])
}

func (e *Encoder) writeBE64(v uint64) {
	binary.BigEndian.PutUint64(e.scratch[:8], v)
	e.write(e.scratch[:8])
}

// writeSectionHeader writes a START or FULL header.
func (e *Encoder) writeSectionHeader(typ byte, id uint32, idstr string, instance, version uint32) {
	b := e.scratch[:0]
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, byte(len(idstr)))
	b = append(b, idstr...)
	b = binary.BigEndian.AppendUint32(b, instance)
	b = binary.BigEndian.AppendUint32(b, version)
	e.write(b)
}

func (e *Encoder) writeFooter(id uint32) {
	b := e.scratch[:0]
	b = append(b, SecFooter)
	b = binary.BigEndian.AppendUint32(b, id)
	e.write(b)
}

// checkTop returns an error unless the Encoder is between sections.
func (e *Encoder) checkTop(what string) error {
	if e.err != nil {
		return e.err
	}
	switch e.state {
	case esNew:
		return orderf("%s before WriteHeader", what)
	case esRAMOpen:
		return orderf("%s while a RAM section is open: call CloseRAMSection first", what)
	case esClosed:
		return orderf("%s after Close", what)
	}
	return nil
}

// checkName validates a section or RAM block idstr.
func checkName(kind, name string) error {
	if name == "" {
		return invalidf("%s idstr is empty", kind)
	}
	if len(name) > MaxIDStr {
		return invalidf("%s idstr %.40q... is %d bytes, more than %d", kind, name, len(name), MaxIDStr)
	}
	if !utf8.ValidString(name) {
		return invalidf("%s idstr %q is not valid UTF-8 (vmdesc and analyze-migration.py need text)", kind, name)
	}
	return nil
}

func validPageSize(n uint64) bool {
	return n >= MinPageSize && n <= MaxPageSize && n&(n-1) == 0
}

// WriteHeader writes the stream header (magic "QEVM", version 3) and, if
// machine is not empty, the configuration section carrying it as the machine
// name. migctl passes the guest's identity. machine must be valid UTF-8 of at
// most MaxMachineName bytes (analyze-migration.py decodes it as text and
// fails on an empty one, hence empty means "no configuration section").
func (e *Encoder) WriteHeader(machine string) error {
	if e.err != nil {
		return e.err
	}
	if e.state != esNew {
		return orderf("WriteHeader called twice")
	}
	if len(machine) > MaxMachineName {
		return invalidf("machine name is %d bytes, more than %d", len(machine), MaxMachineName)
	}
	if !utf8.ValidString(machine) {
		return invalidf("machine name %q is not valid UTF-8", machine)
	}
	e.writeBE32(Magic)
	e.writeBE32(Version)
	if machine != "" {
		e.writeByte(SecConfig)
		e.writeBE32(uint32(len(machine)))
		e.write([]byte(machine))
	}
	e.state = esTop
	return e.err
}

// WriteHandshake writes h as the first FULL section (idstr HandshakeIDStr,
// instance 0, version HandshakeVersion, or HandshakeVersionUUID when h
// carries a UUID), with a JSON payload. It must come
// after WriteHeader and before any other section (commands may precede it).
// A zero Protocol is written as HandshakeProtocol and an empty Side as
// SideSource; PageSize must be a valid page size. If h.RAMBlocks is not nil,
// StartRAM will insist on the same blocks.
func (e *Encoder) WriteHandshake(h *Handshake) error {
	if err := e.checkTop("WriteHandshake"); err != nil {
		return err
	}
	if e.handshake != nil {
		return orderf("WriteHandshake called twice")
	}
	if e.anySection {
		return orderf("WriteHandshake after another section: the handshake must be the first")
	}
	hs := *h
	if hs.Protocol == 0 {
		hs.Protocol = HandshakeProtocol
	}
	if hs.Side == "" {
		hs.Side = SideSource
	}
	if hs.Side != SideSource && hs.Side != SideDestination {
		return invalidf("handshake side %q is neither %q nor %q", hs.Side, SideSource, SideDestination)
	}
	if hs.UUID != "" && !validUUID(hs.UUID) {
		return invalidf("handshake UUID %.64q: write it in canonical lowercase form (8-4-4-4-12 hexadecimal digits)", hs.UUID)
	}
	if !validPageSize(hs.PageSize) {
		return invalidf("handshake page size %d is not a power of two between %d and %d", hs.PageSize, MinPageSize, MaxPageSize)
	}
	js, err := json.Marshal(&hs)
	if err != nil {
		return invalidf("handshake: %v", err)
	}
	if len(js) > DefaultMaxJSON {
		return invalidf("handshake JSON is %d bytes, more than a default decoder accepts (%d)", len(js), DefaultMaxJSON)
	}
	e.writeFull(HandshakeIDStr, 0, hs.sectionVersion(), js)
	e.handshake = &hs
	e.pageSize = hs.PageSize
	return e.err
}

// WriteDevice writes a device's state as a FULL section: the header, be32
// len(payload), the payload, the footer. It is described in the vmdesc as two
// fields, {"size", uint32, 4} and {"data", buffer, len(payload)}. idstr must be
// valid UTF-8 of 1..255 bytes (at most 127 for analyze-migration.py, which
// reads the length as a signed byte), not "ram" nor HandshakeIDStr, and each
// (idstr, instance) may be written once.
func (e *Encoder) WriteDevice(idstr string, instance, version uint32, payload []byte) error {
	if err := e.checkTop("WriteDevice"); err != nil {
		return err
	}
	if err := checkName("device", idstr); err != nil {
		return err
	}
	if idstr == RAMIDStr || idstr == HandshakeIDStr {
		return invalidf("device idstr %q is reserved", idstr)
	}
	if uint64(len(payload)) > math.MaxUint32 {
		return invalidf("device %q payload is %d bytes, more than a be32 length can carry", idstr, len(payload))
	}
	if e.seenDevices[devKey{idstr, instance}] {
		return invalidf("device %q instance %d written twice", idstr, instance)
	}
	e.writeFull(idstr, instance, version, payload)
	return e.err
}

func (e *Encoder) writeFull(idstr string, instance, version uint32, payload []byte) {
	id := e.nextID
	e.nextID++
	e.writeSectionHeader(SecFull, id, idstr, instance, version)
	e.writeBE32(uint32(len(payload)))
	e.write(payload)
	e.writeFooter(id)
	e.anySection = true
	e.seenDevices[devKey{idstr, instance}] = true
	e.devices = append(e.devices, VMDescDevice{
		Name:       idstr,
		InstanceID: instance,
		VMSDName:   idstr,
		Version:    version,
		Fields:     deviceFields(len(payload)),
	})
}

// WriteCommand writes a COMMAND record. data must have the length QEMU's
// table gives for cmd (e.g. 4 bytes for PING, none for OPEN_RETURN_PATH).
// PACKAGED is not supported (its blob would follow outside the command).
func (e *Encoder) WriteCommand(cmd Command, data []byte) error {
	if err := e.checkTop("WriteCommand"); err != nil {
		return err
	}
	if cmd == CmdPackaged {
		return fmt.Errorf("stream: command %v: %w", cmd, ErrUnsupported)
	}
	if msg := checkCommand(cmd, data); msg != "" {
		return invalidf("%s", msg)
	}
	b := e.scratch[:0]
	b = append(b, SecCommand)
	b = binary.BigEndian.AppendUint16(b, uint16(cmd))
	b = binary.BigEndian.AppendUint16(b, uint16(len(data)))
	e.write(b)
	e.write(data)
	return e.err
}

// OpenReturnPath writes COMMAND OPEN_RETURN_PATH: the destination starts
// answering on the return path (see WriteRP).
func (e *Encoder) OpenReturnPath() error { return e.WriteCommand(CmdOpenReturnPath, nil) }

// Ping writes COMMAND PING(v); the destination answers RPPong with v.
func (e *Encoder) Ping(v uint32) error {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return e.WriteCommand(CmdPing, b[:])
}

// StartRAM writes the RAM SECTION_START: MEM_SIZE with the total, the block
// list (u8 len, idstr, be64 size per block, in the order given), EOS and the
// footer. pageSize is the target page size of every later page record. Block
// names follow WriteDevice's rules; sizes must be non-zero multiples of
// pageSize. If a handshake was written, its page size and (if set) its RAM
// blocks must agree.
func (e *Encoder) StartRAM(pageSize uint64, blocks []Block) error {
	if err := e.checkTop("StartRAM"); err != nil {
		return err
	}
	if e.ramStarted {
		return orderf("StartRAM called twice")
	}
	if !validPageSize(pageSize) {
		return invalidf("page size %d is not a power of two between %d and %d", pageSize, MinPageSize, MaxPageSize)
	}
	if e.handshake != nil && e.handshake.PageSize != pageSize {
		return invalidf("page size %d differs from the handshake's %d", pageSize, e.handshake.PageSize)
	}
	m := make(map[string]*encBlock, len(blocks))
	var total uint64
	for _, b := range blocks {
		if err := checkName("RAM block", b.Name); err != nil {
			return err
		}
		if m[b.Name] != nil {
			return invalidf("RAM block %q listed twice", b.Name)
		}
		if b.Size == 0 || b.Size%pageSize != 0 {
			return invalidf("RAM block %q size %#x is not a non-zero multiple of the page size %#x", b.Name, b.Size, pageSize)
		}
		if total+b.Size < total || total+b.Size > math.MaxInt64 {
			return invalidf("RAM blocks add up to more than 2^63 bytes")
		}
		total += b.Size
		m[b.Name] = &encBlock{name: b.Name, size: b.Size}
	}
	if hs := e.handshake; hs != nil && hs.RAMBlocks != nil {
		if len(hs.RAMBlocks) != len(blocks) {
			return invalidf("StartRAM lists %d blocks, the handshake %d", len(blocks), len(hs.RAMBlocks))
		}
		for _, b := range blocks {
			if sz, ok := hs.RAMBlocks[b.Name]; !ok || sz != b.Size {
				return invalidf("RAM block %q (%#x bytes) differs from the handshake's list", b.Name, b.Size)
			}
		}
	}
	id := e.nextID
	e.nextID++
	e.writeSectionHeader(SecStart, id, RAMIDStr, 0, RAMVersion)
	e.writeBE64(total | FlagMemSize)
	for _, b := range blocks {
		s := e.scratch[:0]
		s = append(s, byte(len(b.Name)))
		s = append(s, b.Name...)
		s = binary.BigEndian.AppendUint64(s, b.Size)
		e.write(s)
	}
	e.writeBE64(FlagEOS)
	e.writeFooter(id)
	e.anySection = true
	e.ramStarted = true
	e.ramID = id
	e.pageSize = pageSize
	e.blocks = m
	return e.err
}

func (e *Encoder) beginRAM(typ byte, what string) error {
	if err := e.checkTop(what); err != nil {
		return err
	}
	if !e.ramStarted {
		return orderf("%s before StartRAM", what)
	}
	if e.ramEnded {
		return orderf("%s after the RAM END section", what)
	}
	b := e.scratch[:0]
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, e.ramID)
	e.write(b)
	e.state = esRAMOpen
	if typ == SecEnd {
		e.ramEnded = true
	}
	return e.err
}

// BeginRAMPart opens a RAM SECTION_PART: PutPage, PutZero and PutFlush add
// records to it until CloseRAMSection.
func (e *Encoder) BeginRAMPart() error { return e.beginRAM(SecPart, "BeginRAMPart") }

// BeginRAMEnd opens the final RAM SECTION_END (the pages sent with the guest
// stopped). No RAM section may follow it.
func (e *Encoder) BeginRAMEnd() error { return e.beginRAM(SecEnd, "BeginRAMEnd") }

// CloseRAMSection ends the open RAM section with EOS and its footer.
func (e *Encoder) CloseRAMSection() error {
	if e.err != nil {
		return e.err
	}
	if e.state != esRAMOpen {
		return orderf("CloseRAMSection with no RAM section open")
	}
	e.writeBE64(FlagEOS)
	e.writeFooter(e.ramID)
	e.state = esTop
	return e.err
}

// checkPage validates a page or zero record and returns its block.
func (e *Encoder) checkPage(what, block string, offset uint64) (*encBlock, error) {
	if e.err != nil {
		return nil, e.err
	}
	if e.state != esRAMOpen {
		return nil, orderf("%s with no RAM section open: call BeginRAMPart or BeginRAMEnd", what)
	}
	b := e.last
	if b == nil || b.name != block {
		b = e.blocks[block]
		if b == nil {
			return nil, invalidf("%s: unknown RAM block %q (not listed in StartRAM)", what, block)
		}
	}
	if offset&(e.pageSize-1) != 0 {
		return nil, invalidf("%s: offset %#x in block %q is not a multiple of the page size %#x", what, offset, block, e.pageSize)
	}
	if offset >= b.size || b.size-offset < e.pageSize {
		return nil, invalidf("%s: offset %#x outside block %q (size %#x)", what, offset, block, b.size)
	}
	return b, nil
}

// putRecordHeader writes offset|flags, plus the block's idstr unless it is
// the block of the previous record, in which case CONTINUE is set instead.
func (e *Encoder) putRecordHeader(b *encBlock, word uint64) {
	s := e.scratch[:0]
	if b == e.last {
		s = binary.BigEndian.AppendUint64(s, word|FlagContinue)
	} else {
		s = binary.BigEndian.AppendUint64(s, word)
		s = append(s, byte(len(b.name)))
		s = append(s, b.name...)
		e.last = b
	}
	e.write(s)
}

// PutPage appends a PAGE record for the page at offset in block; page must be
// exactly PageSize bytes. It copies page into the Encoder's buffer (the caller
// may reuse page at once) and does not allocate.
func (e *Encoder) PutPage(block string, offset uint64, page []byte) error {
	return e.putPage("PutPage", block, offset, page, false)
}

// PutPageRef appends a PAGE record like PutPage, without copying page when
// the Encoder is in vector mode (ZeroCopy): it queues a reference to page and
// the kernel reads the page's bytes when the Encoder writes its queue with
// writev, from page straight into the socket. In copy mode it is PutPage.
//
// The rule for the caller: page must stay mapped until the Encoder has
// written it out, which happens at the latest when the next Flush or Close
// returns (earlier when the queue fills; an error drops the queue), and its
// bytes are read then. What goes on the wire is what page holds at that moment, not at
// the call. So either leave page unchanged until then, or, for guest RAM the
// guest keeps writing, make sure every change made after the call is sent
// again later: the guest package's dirty-log rule (a writer sets the dirty
// bit after it wrote the page) guarantees it for a sender that, as the
// engine's, clears a page's bit before queueing the page and syncs the log
// after the pass. A
// change made after the call sets the page's bit after the change ends, so
// a later sync reports it and a later pass queues the page again, after that
// sync, to be read after the change; the stream's later record wins at the
// destination, and the last sync, after the guest stopped, leaves nothing
// unsent. Reading later than PutPage never breaks this, it only sends newer
// (possibly torn) bytes that are sent again anyway. Unmapping page while it
// is queued and then calling Flush or Close reads unmapped memory (SIGSEGV).
// Whether it is cheaper than PutPage depends on the host and the memory's
// backing: see Copies in the package documentation.
func (e *Encoder) PutPageRef(block string, offset uint64, page []byte) error {
	return e.putPage("PutPageRef", block, offset, page, true)
}

func (e *Encoder) putPage(what, block string, offset uint64, page []byte, ref bool) error {
	if uint64(len(page)) != e.pageSize && e.err == nil {
		return invalidf("%s: page is %d bytes, want the page size %d", what, len(page), e.pageSize)
	}
	b, err := e.checkPage(what, block, offset)
	if err != nil {
		return err
	}
	e.putRecordHeader(b, offset|FlagPage)
	if ref && e.sock != nil {
		e.ref(page)
	} else {
		e.write(page)
	}
	e.pages.Add(1)
	return e.err
}

// PutZero appends a ZERO record (one fill byte, 0) for the page at offset in
// block. It does not allocate.
func (e *Encoder) PutZero(block string, offset uint64) error {
	b, err := e.checkPage("PutZero", block, offset)
	if err != nil {
		return err
	}
	e.putRecordHeader(b, offset|FlagZero)
	e.writeByte(0)
	e.zeros.Add(1)
	return e.err
}

// PutFlush appends a MULTIFD_FLUSH record: a barrier telling a multifd
// destination to wait for every channel's sync packet.
func (e *Encoder) PutFlush() error {
	if e.err != nil {
		return e.err
	}
	if e.state != esRAMOpen {
		return orderf("PutFlush with no RAM section open")
	}
	e.writeBE64(FlagMultifdFlush)
	return e.err
}

// VMDesc returns the description of the FULL sections written so far, as
// Close will write it.
func (e *Encoder) VMDesc() *VMDesc {
	d := &VMDesc{PageSize: e.pageSize, Devices: make([]VMDescDevice, len(e.devices))}
	copy(d.Devices, e.devices)
	return d
}

// Close finishes the stream: the EOF byte, then the vmdesc (0x06, be32
// length, one-line JSON, padded with spaces so analyze-migration.py's tail
// scan finds it), then it flushes. It does not close the underlying writer.
// Calling Close again after success returns nil.
func (e *Encoder) Close() error {
	if e.err != nil {
		return e.err
	}
	if e.state == esClosed {
		return nil
	}
	if err := e.checkTop("Close"); err != nil {
		return err
	}
	js, err := json.Marshal(e.VMDesc())
	if err != nil {
		return invalidf("vmdesc: %v", err)
	}
	js = padVMDesc(js)
	if len(js) > MaxVMDesc {
		return invalidf("vmdesc is %d bytes, more than the %d analyze-migration.py can find", len(js), MaxVMDesc)
	}
	e.writeByte(SecEOF)
	e.writeByte(SecVMDesc)
	e.writeBE32(uint32(len(js)))
	e.write(js)
	if err := e.Flush(); err != nil {
		return err
	}
	e.state = esClosed
	return nil
}
