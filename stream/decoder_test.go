package stream

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
)

// base returns a valid stream prefix: header and RAM START with the test
// blocks (section id 0). Its length is baseLen.
func base() *raw {
	r := &raw{}
	return r.header().ramStart(testBlocks...)
}

var baseLen = int64(base().Len())

// part returns base plus an open RAM SECTION_PART; records start at partLen.
func part() *raw { return base().u8(SecPart).be32(0) }

var partLen = baseLen + 5

func TestDecoderErrors(t *testing.T) {
	const blk0 = 8 + 17 + 8 // first MEM_SIZE entry
	lim := testLimits()
	withLim := func(f func(*Limits)) Limits {
		l := testLimits()
		f(&l)
		return l
	}
	cases := []struct {
		name   string
		stream []byte
		lim    Limits
		class  error
		reason error
		off    int64
		substr string
	}{
		{"bad magic", new(raw).be32(0x12345678).be32(3).Bytes(), lim, ErrCorrupt, nil, 0, "not the QEVM magic"},
		{"version 2", new(raw).be32(Magic).be32(2).Bytes(), lim, ErrCorrupt, nil, 4, "stream version 2"},
		{"empty", nil, lim, ErrCorrupt, io.ErrUnexpectedEOF, 0, "stream ends inside the stream header"},
		{"no EOF marker", new(raw).header().Bytes(), lim, ErrCorrupt, io.ErrUnexpectedEOF, 8, "ends before its EOF marker"},
		{"unknown section type", new(raw).header().u8(0x09).Bytes(), lim, ErrCorrupt, nil, 8, "unknown section type"},
		{"late configuration", base().u8(SecConfig).be32(1).str("x").Bytes(), lim, ErrCorrupt, nil, baseLen, "configuration section after"},
		{"vmdesc before EOF", new(raw).header().u8(SecVMDesc).Bytes(), lim, ErrCorrupt, nil, 8, "before the EOF marker"},
		{"machine name too long", new(raw).header().u8(SecConfig).be32(5000).Bytes(), lim, ErrTooLarge, nil, 8, "machine name of 5000 bytes"},

		// MEM_SIZE.
		{"unknown block", new(raw).header().ramStart(Block{"pc.ram", ramSize}, Block{"vga.vram", testPS}).Bytes(), lim,
			ErrMismatch, ErrUnknownBlock, blk0 + 1 + 6 + 8, `source has RAM block "vga.vram", this destination does not`},
		{"block bigger", new(raw).header().ramStart(Block{"pc.ram", 2 * ramSize}).Bytes(), lim,
			ErrMismatch, ErrBlockSize, blk0, `RAM block "pc.ram" is 0x20000 bytes on the source, only 0x10000 here`},
		{"sizes exceed total", new(raw).header().sectionHeader(SecStart, 0, "ram", 0, 4).be64(testPS | FlagMemSize).str("pc.ram").be64(2 * testPS).Bytes(), lim,
			ErrCorrupt, nil, blk0, "exceeds what is left of the MEM_SIZE total"},
		{"block listed twice", new(raw).header().ramStart(Block{"pc.ram", testPS}, Block{"pc.ram", testPS}).Bytes(), lim,
			ErrCorrupt, nil, blk0 + 15, `"pc.ram" listed twice`},
		{"too many blocks", new(raw).header().ramStart(Block{"a", testPS}, Block{"b", testPS}).Bytes(), Limits{MaxBlocks: 1},
			ErrTooLarge, nil, blk0 + 10, "more than 1 RAM blocks"},
		{"empty block name", new(raw).header().sectionHeader(SecStart, 0, "ram", 0, 4).be64(testPS | FlagMemSize).str("").Bytes(), lim,
			ErrCorrupt, nil, blk0, "empty RAM block idstr"},
		{"MEM_SIZE in PART", part().be64(testPS | FlagMemSize).Bytes(), lim, ErrCorrupt, nil, partLen, "MEM_SIZE record outside"},

		// Page records.
		{"page outside block", part().be64(ramSize | FlagPage).str("pc.ram").Bytes(), lim,
			ErrCorrupt, ErrPageOutside, partLen, `page at 0x10000 outside block "pc.ram" (size 0x10000)`},
		{"zero page outside block", part().be64(romSize | FlagZero).str(romName).u8(0).Bytes(), lim,
			ErrCorrupt, ErrPageOutside, partLen, `zero page at 0x2000 outside block "/rom@etc/acpi/tables" (size 0x2000)`},
		{"page outside announced size", part().be64(ramSize | FlagPage).str("pc.ram").Bytes(), withLim(func(l *Limits) { l.Blocks["pc.ram"] = 4 * ramSize }),
			ErrCorrupt, ErrPageOutside, partLen, "(size 0x10000)"},
		{"page outside, no MEM_SIZE", new(raw).header().sectionHeader(SecStart, 0, "ram", 0, 4).be64(ramSize | FlagPage).str("pc.ram").Bytes(), lim,
			ErrCorrupt, ErrPageOutside, 8 + 17, "(size 0x10000)"},
		{"unaligned offset", part().be64(0x1400 | FlagPage).str("pc.ram").Bytes(), lim,
			ErrCorrupt, ErrUnaligned, partLen, "record offset 0x1400 is not a multiple of the page size 0x1000"},
		{"CONTINUE without block", part().be64(FlagPage | FlagContinue).Bytes(), lim,
			ErrCorrupt, ErrNoBlock, partLen, "page at 0x0 has CONTINUE but no earlier record named a block"},
		{"page in unknown block", part().be64(FlagPage).str("nope").Bytes(), lim,
			ErrMismatch, ErrUnknownBlock, partLen, `page at 0x0 in unknown RAM block "nope"`},
		{"zero fill byte", part().be64(FlagZero).str("pc.ram").u8(1).Bytes(), lim,
			ErrCorrupt, nil, partLen + 8 + 7, "fill byte 0x01, want 0"},
		{"PAGE|ZERO", part().be64(FlagPage | FlagZero).Bytes(), lim, ErrCorrupt, nil, partLen, "unknown flag combination 0xa"},
		{"EOS with offset", part().be64(testPS | FlagEOS).Bytes(), lim, ErrCorrupt, nil, partLen, "EOS record 0x1010 carries other bits"},
		{"FLUSH with CONTINUE", part().be64(FlagMultifdFlush | FlagContinue).Bytes(), lim, ErrCorrupt, nil, partLen, "MULTIFD_FLUSH record"},
		{"XBZRLE", part().be64(FlagXBZRLE).Bytes(), lim, ErrUnsupported, nil, partLen, "XBZRLE"},
		{"HOOK", part().be64(FlagHook).Bytes(), lim, ErrUnsupported, nil, partLen, "RDMA hook"},
		{"COMPRESS_PAGE", part().be64(FlagCompressPage).Bytes(), lim, ErrUnsupported, nil, partLen, "compressed page"},
		{"page truncated", part().be64(FlagPage).str("pc.ram").bytes(make([]byte, 100)).Bytes(), lim,
			ErrCorrupt, io.ErrUnexpectedEOF, partLen + 8 + 7 + 100, "stream ends inside page data"},

		// Sections and footers.
		{"missing footer", part().be64(FlagEOS).u8(SecEOF).Bytes(), lim, ErrCorrupt, ErrFooter, partLen + 8, "section 0 (\"ram\") is not followed by its footer: found byte 0x0"},
		{"footer of another section", part().be64(FlagEOS).footer(5).Bytes(), lim, ErrCorrupt, ErrFooter, partLen + 8, "footer names section 5, but section 0 (\"ram\") is open"},
		{"PART of unknown section", base().u8(SecPart).be32(9).Bytes(), lim, ErrCorrupt, nil, baseLen, "SECTION_PART for section id 9, which no SECTION_START opened"},
		{"PART after END", base().u8(SecEnd).be32(0).be64(FlagEOS).footer(0).u8(SecPart).be32(0).Bytes(), lim,
			ErrCorrupt, nil, baseLen + 18, "SECTION_PART for section id 0 after its SECTION_END"},
		{"second START", base().sectionHeader(SecStart, 1, "ram", 0, 4).Bytes(), lim, ErrCorrupt, nil, baseLen, "second RAM SECTION_START"},
		{"other iterable", new(raw).header().sectionHeader(SecStart, 0, "block-dirty-bitmap", 0, 1).Bytes(), lim, ErrUnsupported, nil, 8, `iterable section "block-dirty-bitmap"`},
		{"RAM version 3", new(raw).header().sectionHeader(SecStart, 0, "ram", 0, 3).Bytes(), lim, ErrUnsupported, nil, 8, "RAM section version 3, want 4"},
		{"RAM in FULL", new(raw).header().sectionHeader(SecFull, 0, "ram", 0, 4).Bytes(), lim, ErrCorrupt, nil, 8, "RAM in a FULL section"},
		{"empty idstr", new(raw).header().sectionHeader(SecFull, 0, "", 0, 4).Bytes(), lim, ErrCorrupt, nil, 13, "empty idstr"},
		{"idstr too long", new(raw).header().sectionHeader(SecFull, 0, "0123456789", 0, 4).Bytes(), withLim(func(l *Limits) { l.MaxIDStr = 8 }),
			ErrTooLarge, nil, 13, "idstr of 10 bytes, limit 8"},
		{"device too large", new(raw).header().sectionHeader(SecFull, 0, "dev", 0, 1).be32(17).Bytes(), withLim(func(l *Limits) { l.MaxDevicePayload = 16 }),
			ErrTooLarge, nil, 8 + 17, `device "dev" payload of 17 bytes, limit 16`},
		{"device truncated", new(raw).header().sectionHeader(SecFull, 0, "dev", 0, 1).be32(1000).bytes(make([]byte, 10)).Bytes(), lim,
			ErrCorrupt, io.ErrUnexpectedEOF, 8 + 17 + 4 + 10, "ends inside device payload"},

		// Handshake.
		{"handshake too large", hsStream(strings.Repeat(" ", 20) + `{"protocol":1,"side":"source"}`), withLim(func(l *Limits) { l.MaxJSON = 16 }),
			ErrTooLarge, nil, 8 + 30, "handshake \"migctl/handshake\" payload of 50 bytes, limit 16"},
		{"handshake not JSON", hsStream(`{`), lim, ErrCorrupt, nil, 8 + 34, "handshake is not valid JSON"},
		{"handshake bad side", hsStream(`{"protocol":1,"side":"middle"}`), lim, ErrCorrupt, nil, 8 + 34, `handshake side "middle"`},
		{"handshake no protocol", hsStream(`{"side":"source"}`), lim, ErrCorrupt, nil, 8 + 34, "handshake protocol 0"},
		{"handshake not first", new(raw).header().sectionHeader(SecFull, 0, "dev", 0, 1).be32(0).footer(0).sectionHeader(SecFull, 1, HandshakeIDStr, 0, 1).Bytes(), lim,
			ErrCorrupt, nil, 8 + 17 + 4 + 5, "must be the first"},
		{"handshake version 3", new(raw).header().sectionHeader(SecFull, 0, HandshakeIDStr, 0, 3).Bytes(), lim, ErrUnsupported, nil, 8, "version 3, this build reads versions 1 and 2"},
		{"handshake instance 1", new(raw).header().sectionHeader(SecFull, 0, HandshakeIDStr, 1, 1).Bytes(), lim, ErrCorrupt, nil, 8, "instance 1"},
		{"handshake required", base().Bytes(), withLim(func(l *Limits) { l.RequireHandshake = true }), ErrMismatch, nil, 8, "does not start with the \"migctl/handshake\" section"},
		{"handshake required, none at all", new(raw).header().u8(SecEOF).Bytes(), withLim(func(l *Limits) { l.RequireHandshake = true }), ErrMismatch, nil, 8, "the source is not migctl"},

		// Commands.
		{"command 0", new(raw).header().u8(SecCommand).be16(0).be16(0).Bytes(), lim, ErrCorrupt, nil, 8, "unknown command 0"},
		{"command 12", new(raw).header().u8(SecCommand).be16(12).be16(0).Bytes(), lim, ErrCorrupt, nil, 8, "unknown command 12"},
		{"PING of 3 bytes", new(raw).header().u8(SecCommand).be16(2).be16(3).bytes([]byte{1, 2, 3}).Bytes(), lim, ErrCorrupt, nil, 8, "PING carries 3 bytes, want 4"},
		{"OPEN_RETURN_PATH with data", new(raw).header().u8(SecCommand).be16(1).be16(1).u8(0).Bytes(), lim, ErrCorrupt, nil, 8, "OPEN_RETURN_PATH carries 1 bytes, want 0"},
		{"RECV_BITMAP bad name", new(raw).header().u8(SecCommand).be16(10).be16(3).bytes([]byte{5, 'a', 'b'}).Bytes(), lim, ErrCorrupt, nil, 8, "u8-counted block name"},
		{"PACKAGED", new(raw).header().u8(SecCommand).be16(7).be16(4).be32(100).Bytes(), lim, ErrUnsupported, nil, 8, "PACKAGED"},
		{"command truncated", new(raw).header().u8(SecCommand).be16(2).be16(4).u8(1).Bytes(), lim, ErrCorrupt, io.ErrUnexpectedEOF, 14, "ends inside command data"},

		// After EOF.
		{"garbage after EOF", new(raw).header().u8(SecEOF).u8(0x42).Bytes(), lim, ErrCorrupt, nil, 9, "byte 0x42 after the EOF marker"},
		{"vmdesc too large", new(raw).header().u8(SecEOF).u8(SecVMDesc).be32(11).Bytes(), withLim(func(l *Limits) { l.MaxJSON = 10 }),
			ErrTooLarge, nil, 9, "vmdesc of 11 bytes, limit 10"},
		{"vmdesc truncated", new(raw).header().u8(SecEOF).u8(SecVMDesc).be32(100).bytes([]byte("{}")).Bytes(), lim,
			ErrCorrupt, io.ErrUnexpectedEOF, 16, "ends inside the vmdesc"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := decodeErr(c.stream, c.lim)
			wantDecodeError(t, err, c.class, c.reason, c.off, c.substr)
			// Exactly one class.
			n := 0
			for _, cl := range []error{ErrCorrupt, ErrMismatch, ErrTooLarge, ErrUnsupported} {
				if errors.Is(err, cl) {
					n++
				}
			}
			if n != 1 {
				t.Errorf("error %q matches %d classes", err, n)
			}
		})
	}
}

// hsStream is a stream whose first section is a handshake with payload js
// (the payload starts at byte 8+30+4).
func hsStream(js string) []byte {
	return new(raw).header().sectionHeader(SecFull, 0, HandshakeIDStr, 0, 1).be32(uint32(len(js))).bytes([]byte(js)).footer(0).u8(SecEOF).Bytes()
}

func TestDecodeErrorMessage(t *testing.T) {
	err := decodeErr(part().be64(ramSize|FlagPage).str("pc.ram").Bytes(), testLimits())
	want := `stream: page at 0x10000 outside block "pc.ram" (size 0x10000) (at stream byte 95)`
	if err == nil || err.Error() != want || partLen != 95 {
		t.Errorf("got  %v\nwant %s", err, want)
	}
	var de *DecodeError
	if !errors.As(err, &de) || de.Block != "pc.ram" {
		t.Errorf("DecodeError.Block = %q", de.Block)
	}
}

func TestDecoderUsage(t *testing.T) {
	var buf bytes.Buffer
	writeSample(t, &buf, true)
	d := NewDecoder(bytes.NewReader(buf.Bytes()), testLimits())
	if err := d.ReadPage(make([]byte, testPS)); !errors.Is(err, ErrOrder) {
		t.Errorf("ReadPage before any page: %v", err)
	}
	if err := d.SkipPage(); !errors.Is(err, ErrOrder) {
		t.Errorf("SkipPage before any page: %v", err)
	}
	var rec Record
	var err error
	for rec.Kind != KindPage {
		rec, err = d.Next()
		must(t, err)
	}
	if _, err := d.Next(); !errors.Is(err, ErrOrder) {
		t.Errorf("Next with a page pending: %v", err)
	}
	if err := d.ReadPage(make([]byte, 100)); !errors.Is(err, ErrInvalid) {
		t.Errorf("ReadPage into 100 bytes: %v", err)
	}
	// Neither error is sticky: the page can still be read.
	p := make([]byte, testPS)
	must(t, d.ReadPage(p))
	if !bytes.Equal(p, pattern("pc.ram", 0)) {
		t.Error("page differs")
	}
	rec, err = d.Next()
	must(t, err)
	if rec.Kind != KindPage {
		t.Fatalf("second record %v", rec.Kind)
	}
	must(t, d.SkipPage())
	rec, err = d.Next()
	must(t, err)
	if rec.Kind != KindZero {
		t.Errorf("after SkipPage: %v, want the zero page", rec.Kind)
	}
	if s := d.Stats(); s.Pages != 2 || s.ZeroPages != 1 || s.Bytes != uint64(d.Offset()) {
		t.Errorf("stats %+v offset %d", s, d.Offset())
	}
}

func TestDecoderInvalidLimits(t *testing.T) {
	for _, ps := range []uint64{512, 3000, 128 << 10} {
		_, err := NewDecoder(bytes.NewReader(nil), Limits{PageSize: ps}).Next()
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("page size %d: %v", ps, err)
		}
	}
}

func TestDecoderNoVMDesc(t *testing.T) {
	d := NewDecoder(bytes.NewReader(new(raw).header().u8(SecEOF).Bytes()), Limits{})
	rec, err := d.Next()
	if err != nil || rec.Kind != KindEOF || rec.Pos != 8 {
		t.Fatalf("%+v %v", rec, err)
	}
	for range 2 {
		if _, err := d.Next(); err != io.EOF {
			t.Fatalf("after EOF without vmdesc: %v", err)
		}
	}
}

func TestDecoderStickyError(t *testing.T) {
	d := NewDecoder(bytes.NewReader(part().be64(FlagXBZRLE).Bytes()), testLimits())
	var first error
	for i := 0; i < 10 && first == nil; i++ {
		_, first = d.Next()
	}
	if _, err := d.Next(); err != first {
		t.Errorf("second error %v, want the first %v", err, first)
	}
	if err := d.ReadPage(make([]byte, testPS)); err != first {
		t.Errorf("ReadPage after error: %v", err)
	}
}

type failingReader struct {
	data []byte
	err  error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestDecoderReaderError(t *testing.T) {
	boom := errors.New("connection reset")
	var buf bytes.Buffer
	writeSample(t, &buf, true)
	d := NewDecoder(&failingReader{data: buf.Bytes()[:5000], err: boom}, testLimits())
	_, _, err := decodeAll(d)
	if !errors.Is(err, boom) || errors.Is(err, ErrCorrupt) {
		t.Fatalf("error %v: want the reader's error, not corruption", err)
	}
	if !strings.Contains(err.Error(), "at byte") {
		t.Errorf("error %q does not say where", err)
	}
}

// TestDecoderBoundedAlloc: a length field promising 16 MiB with 10 bytes
// behind it must not allocate 16 MiB.
func TestDecoderBoundedAlloc(t *testing.T) {
	stream := new(raw).header().sectionHeader(SecFull, 0, "dev", 0, 1).be32(DefaultMaxDevicePayload).bytes(make([]byte, 10)).Bytes()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 10 {
		if err := decodeErr(stream, Limits{}); !errors.Is(err, ErrCorrupt) {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / 10; per > 1<<20 {
		t.Errorf("each decode allocated %d bytes for a 10-byte payload", per)
	}
}

// TestNoAllocPerPage: the page paths of Encoder and Decoder do not allocate.
func TestNoAllocPerPage(t *testing.T) {
	const n = 64
	var buf bytes.Buffer
	buf.Grow(n * 2 * (testPS + 32))
	e := NewEncoder(&buf)
	must(t, e.WriteHeader(""))
	must(t, e.StartRAM(testPS, testBlocks))
	must(t, e.BeginRAMPart())
	page := pattern("pc.ram", 0)
	i := uint64(0)
	allocs := testing.AllocsPerRun(n-1, func() {
		off := (i % 16) * testPS
		i++
		must(t, e.PutPage("pc.ram", off, page))
		must(t, e.PutZero(romName, 0))
	})
	if allocs != 0 {
		t.Errorf("PutPage+PutZero: %v allocations per call", allocs)
	}
	must(t, e.CloseRAMSection())
	must(t, e.Close())

	d := NewDecoder(bytes.NewReader(buf.Bytes()), testLimits())
	for {
		rec, err := d.Next()
		must(t, err)
		if rec.Kind == KindSectionPart {
			break
		}
	}
	dst := make([]byte, testPS)
	allocs = testing.AllocsPerRun(n-1, func() {
		rec, err := d.Next()
		must(t, err)
		if rec.Kind != KindPage {
			t.Fatalf("got %v", rec.Kind)
		}
		must(t, d.ReadPage(dst))
		if rec, err = d.Next(); err != nil || rec.Kind != KindZero {
			t.Fatalf("got %v %v", rec.Kind, err)
		}
	})
	if allocs != 0 {
		t.Errorf("Next+ReadPage: %v allocations per page", allocs)
	}
}

// TestDecoderQEMUDevice: a QEMU vmstate payload (not length-prefixed) is
// reported with a hint rather than as bare corruption.
func TestDecoderQEMUDevice(t *testing.T) {
	// A "timer" vmstate: be64 cpu_ticks_offset, be64 dummy, be64 cpu_clock_offset.
	s := new(raw).header().sectionHeader(SecFull, 0, "timer", 0, 2).be64(0).be64(0).be64(7).footer(0).Bytes()
	wantDecodeError(t, decodeErr(s, Limits{}), ErrCorrupt, ErrFooter, -1, "only migctl's length-prefixed device sections")
}
