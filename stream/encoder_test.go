package stream

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestEncoderBytes(t *testing.T) {
	// The RAM-only example of qemu-wire.md §2.5, byte for byte (plus EOF and
	// an empty vmdesc).
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(t, e.WriteHeader(""))
	must(t, e.StartRAM(testPS, []Block{{"pc.ram", 2 * testPS}}))
	must(t, e.BeginRAMEnd())
	page := pattern("pc.ram", 0)
	must(t, e.PutPage("pc.ram", 0, page))
	must(t, e.PutZero("pc.ram", testPS))
	must(t, e.CloseRAMSection())
	must(t, e.Close())

	want := new(raw).header().
		sectionHeader(SecStart, 0, "ram", 0, 4).
		be64(0x2004).str("pc.ram").be64(0x2000).be64(0x10).footer(0).
		u8(SecEnd).be32(0).
		be64(0x8).str("pc.ram").bytes(page).
		be64(0x1022).u8(0).
		be64(0x10).footer(0).
		u8(SecEOF).u8(SecVMDesc)
	js := `{"page_size":4096,"devices":[]}`
	want.be32(uint32(len(js))).bytes([]byte(js))
	if !bytes.Equal(buf.Bytes(), want.Bytes()) {
		t.Errorf("stream differs:\n got %x\nwant %x", buf.Bytes(), want.Bytes())
	}
}

func TestEncoderDevice(t *testing.T) {
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(t, e.WriteHeader("pc-q35"))
	must(t, e.WriteDevice("timer", 3, 2, []byte{0xaa, 0xbb}))
	must(t, e.Close())
	want := new(raw).header().u8(SecConfig).be32(6).bytes([]byte("pc-q35")).
		sectionHeader(SecFull, 0, "timer", 3, 2).be32(2).bytes([]byte{0xaa, 0xbb}).footer(0).u8(SecEOF).Bytes()
	if !bytes.HasPrefix(buf.Bytes(), want) {
		t.Fatalf("stream differs:\n got %x\nwant %x...", buf.Bytes(), want)
	}
	js := buf.Bytes()[len(want)+5:]
	wantJS := `{"page_size":4096,"devices":[{"name":"timer","instance_id":3,"vmsd_name":"timer","version":2,` +
		`"fields":[{"name":"size","type":"uint32","size":4},{"name":"data","type":"buffer","size":2}]}]}`
	if string(js) != wantJS {
		t.Errorf("vmdesc\n got %s\nwant %s", js, wantJS)
	}
}

func TestEncoderMisuse(t *testing.T) {
	page := make([]byte, testPS)
	fresh := func() *Encoder { return NewEncoder(&bytes.Buffer{}) }
	started := func() *Encoder {
		e := fresh()
		must(t, e.WriteHeader(guestName))
		must(t, e.StartRAM(testPS, testBlocks))
		return e
	}
	open := func() *Encoder {
		e := started()
		must(t, e.BeginRAMPart())
		return e
	}
	cases := []struct {
		name string
		call func() error
		want error
		sub  string
	}{
		{"StartRAM before header", func() error { return fresh().StartRAM(testPS, testBlocks) }, ErrOrder, "before WriteHeader"},
		{"header twice", func() error { e := started(); return e.WriteHeader("") }, ErrOrder, "twice"},
		{"machine too long", func() error { return fresh().WriteHeader(strings.Repeat("m", MaxMachineName+1)) }, ErrInvalid, "machine name"},
		{"machine not UTF-8", func() error { return fresh().WriteHeader("\xff") }, ErrInvalid, "UTF-8"},
		{"StartRAM twice", func() error { return started().StartRAM(testPS, testBlocks) }, ErrOrder, "twice"},
		{"bad page size", func() error { e := fresh(); e.WriteHeader(""); return e.StartRAM(3000, testBlocks) }, ErrInvalid, "power of two"},
		{"block not page multiple", func() error { e := fresh(); e.WriteHeader(""); return e.StartRAM(testPS, []Block{{"a", 100}}) }, ErrInvalid, "multiple"},
		{"block twice", func() error {
			e := fresh()
			e.WriteHeader("")
			return e.StartRAM(testPS, []Block{{"a", testPS}, {"a", testPS}})
		}, ErrInvalid, "twice"},
		{"block name too long", func() error {
			e := fresh()
			e.WriteHeader("")
			return e.StartRAM(testPS, []Block{{strings.Repeat("n", 256), testPS}})
		}, ErrInvalid, "more than 255"},
		{"PutPage outside a section", func() error { return started().PutPage("pc.ram", 0, page) }, ErrOrder, "no RAM section open"},
		{"PutZero outside a section", func() error { return started().PutZero("pc.ram", 0) }, ErrOrder, "no RAM section open"},
		{"page wrong size", func() error { return open().PutPage("pc.ram", 0, page[:100]) }, ErrInvalid, "100 bytes"},
		{"page unknown block", func() error { return open().PutPage("vga", 0, page) }, ErrInvalid, `unknown RAM block "vga"`},
		{"page unaligned", func() error { return open().PutPage("pc.ram", 100, page) }, ErrInvalid, "not a multiple"},
		{"page outside", func() error { return open().PutPage("pc.ram", ramSize, page) }, ErrInvalid, `outside block "pc.ram"`},
		{"zero outside", func() error { return open().PutZero(romName, romSize) }, ErrInvalid, "outside"},
		{"device in RAM section", func() error { return open().WriteDevice("d", 0, 1, nil) }, ErrOrder, "CloseRAMSection first"},
		{"command in RAM section", func() error { return open().Ping(1) }, ErrOrder, "CloseRAMSection first"},
		{"Close in RAM section", func() error { return open().Close() }, ErrOrder, "CloseRAMSection first"},
		{"close unopened", func() error { return started().CloseRAMSection() }, ErrOrder, "no RAM section open"},
		{"part before StartRAM", func() error { e := fresh(); e.WriteHeader(""); return e.BeginRAMPart() }, ErrOrder, "before StartRAM"},
		{"part after end", func() error {
			e := started()
			e.BeginRAMEnd()
			e.CloseRAMSection()
			return e.BeginRAMPart()
		}, ErrOrder, "after the RAM END"},
		{"device reserved ram", func() error { return started().WriteDevice("ram", 0, 1, nil) }, ErrInvalid, "reserved"},
		{"device reserved handshake", func() error { return started().WriteDevice(HandshakeIDStr, 0, 1, nil) }, ErrInvalid, "reserved"},
		{"device empty idstr", func() error { return started().WriteDevice("", 0, 1, nil) }, ErrInvalid, "empty"},
		{"device twice", func() error {
			e := started()
			must(t, e.WriteDevice("d", 0, 1, nil))
			return e.WriteDevice("d", 0, 1, nil)
		}, ErrInvalid, "written twice"},
		{"handshake after section", func() error { return started().WriteHandshake(testHandshake()) }, ErrOrder, "must be the first"},
		{"handshake bad page size", func() error {
			e := fresh()
			e.WriteHeader("")
			h := testHandshake()
			h.PageSize = 0
			return e.WriteHandshake(h)
		}, ErrInvalid, "page size 0"},
		{"handshake twice", func() error {
			e := fresh()
			e.WriteHeader("")
			must(t, e.WriteHandshake(testHandshake()))
			return e.WriteHandshake(testHandshake())
		}, ErrOrder, "twice"},
		{"StartRAM differs from handshake", func() error {
			e := fresh()
			e.WriteHeader("")
			must(t, e.WriteHandshake(testHandshake()))
			return e.StartRAM(testPS, testBlocks[:1])
		}, ErrInvalid, "the handshake"},
		{"StartRAM page size differs from handshake", func() error {
			e := fresh()
			e.WriteHeader("")
			must(t, e.WriteHandshake(testHandshake()))
			return e.StartRAM(2*testPS, testBlocks)
		}, ErrInvalid, "handshake's 4096"},
		{"PING wrong command length", func() error { return started().WriteCommand(CmdPing, []byte{1}) }, ErrInvalid, "want 4"},
		{"PACKAGED", func() error { return started().WriteCommand(CmdPackaged, []byte{0, 0, 0, 1}) }, ErrUnsupported, ""},
		{"unknown command", func() error { return started().WriteCommand(99, nil) }, ErrInvalid, "unknown command 99"},
		{"after Close", func() error {
			e := started()
			must(t, e.Close())
			return e.WriteDevice("d", 0, 1, nil)
		}, ErrOrder, "after Close"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.call()
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.sub) {
				t.Errorf("got %v, want %v containing %q", err, c.want, c.sub)
			}
		})
	}
}

// TestEncoderUsableAfterMisuse: a rejected call writes nothing.
func TestEncoderUsableAfterMisuse(t *testing.T) {
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(t, e.WriteHeader(""))
	must(t, e.StartRAM(testPS, testBlocks))
	must(t, e.BeginRAMPart())
	if err := e.PutPage("pc.ram", ramSize, pattern("pc.ram", 0)); err == nil {
		t.Fatal("page outside accepted")
	}
	must(t, e.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
	must(t, e.CloseRAMSection())
	must(t, e.Close())
	must(t, e.Close()) // idempotent
	recs, pages, err := decodeAll(NewDecoder(bytes.NewReader(buf.Bytes()), testLimits()))
	if err != nil || len(pages) != 1 || recs[len(recs)-1].Kind != KindVMDesc {
		t.Fatalf("%v, %d pages", err, len(pages))
	}
}

type failWriter struct {
	n   int // bytes accepted before failing
	err error
}

func (w *failWriter) Write(p []byte) (int, error) {
	if len(p) <= w.n {
		w.n -= len(p)
		return len(p), nil
	}
	n := w.n
	w.n = 0
	return n, w.err
}

func TestEncoderWriteErrorSticky(t *testing.T) {
	boom := errors.New("broken pipe")
	e := NewEncoder(&failWriter{n: 10, err: boom})
	must(t, e.WriteHeader(guestName))
	must(t, e.StartRAM(testPS, testBlocks))
	must(t, e.BeginRAMPart())
	var err error
	for i := uint64(0); err == nil && i < 1000; i++ {
		err = e.PutPage("pc.ram", (i%16)*testPS, pattern("pc.ram", 0))
	}
	if !errors.Is(err, boom) {
		t.Fatalf("write error %v", err)
	}
	for _, f := range []func() error{e.Flush, e.CloseRAMSection, e.Close, func() error { return e.PutZero("pc.ram", 0) }} {
		if got := f(); !errors.Is(got, boom) {
			t.Errorf("after a write error: %v", got)
		}
	}
}
