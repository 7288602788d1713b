package stream

import (
	"bytes"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// writeSample writes the stream most tests use. With live set it also has
// OPEN_RETURN_PATH, PINGs and a MULTIFD_FLUSH, as a live migration over a
// socket would; analyze-migration.py reads only the stream without them (as
// with QEMU: it knows no commands, and the 7.2 version no MULTIFD_FLUSH).
func writeSample(t testing.TB, w *bytes.Buffer, live bool) *Encoder {
	t.Helper()
	e := NewEncoder(w)
	must(t, e.WriteHeader(guestName))
	if live {
		must(t, e.OpenReturnPath())
		must(t, e.Ping(1))
	}
	must(t, e.WriteHandshake(testHandshake()))
	must(t, e.StartRAM(testPS, testBlocks))
	// PART 1: two pc.ram pages (the second with CONTINUE), a zero page, a
	// ROM page (new block), back to pc.ram (named again).
	must(t, e.BeginRAMPart())
	must(t, e.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
	must(t, e.PutPage("pc.ram", testPS, pattern("pc.ram", testPS)))
	must(t, e.PutZero("pc.ram", 2*testPS))
	must(t, e.PutPage(romName, testPS, pattern(romName, testPS)))
	must(t, e.PutPage("pc.ram", 15*testPS, pattern("pc.ram", 15*testPS)))
	must(t, e.CloseRAMSection())
	// PART 2: starts with CONTINUE on the previous section's block.
	must(t, e.BeginRAMPart())
	must(t, e.PutZero("pc.ram", 3*testPS))
	if live {
		must(t, e.PutFlush())
	}
	must(t, e.CloseRAMSection())
	if live {
		must(t, e.Ping(2))
	}
	// END: the guest is stopped.
	must(t, e.BeginRAMEnd())
	must(t, e.PutPage("pc.ram", 4*testPS, pattern("pc.ram", 4*testPS)))
	must(t, e.PutZero(romName, 0))
	must(t, e.CloseRAMSection())
	must(t, e.WriteDevice("timer", 0, 2, []byte{1, 2, 3, 4, 5, 6, 7, 8}))
	must(t, e.WriteDevice("0000:00:02.0/virtio-net", 0, 1, bytes.Repeat([]byte("net!"), 100)))
	must(t, e.WriteDevice("cpu", 1, 5, nil))
	must(t, e.Close())
	return e
}

type recSummary struct {
	Kind    Kind
	Section Section
	Block   string
	Offset  uint64
	Flags   uint64
	Value   uint64
	Machine string
	Command Command
}

func summarize(recs []Record) []recSummary {
	out := make([]recSummary, len(recs))
	for i, r := range recs {
		out[i] = recSummary{r.Kind, r.Section, r.Block, r.Offset, r.Flags, r.Value, r.Machine, r.Command}
	}
	return out
}

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	e := writeSample(t, &buf, true)
	es := e.Stats()
	if es.Bytes != uint64(buf.Len()) || es.Pages != 5 || es.ZeroPages != 3 {
		t.Errorf("encoder stats %+v, stream is %d bytes", es, buf.Len())
	}

	d := NewDecoder(bytes.NewReader(buf.Bytes()), Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": ramSize, romName: romSize}, RequireHandshake: true})
	recs, pages, err := decodeAll(d)
	if err != nil {
		t.Fatal(err)
	}
	hs := Section{0, HandshakeIDStr, 0, 1}
	ram := Section{1, "ram", 0, 4}
	timer := Section{2, "timer", 0, 2}
	net := Section{3, "0000:00:02.0/virtio-net", 0, 1}
	cpu := Section{4, "cpu", 1, 5}
	want := []recSummary{
		{Kind: KindConfig, Machine: guestName},
		{Kind: KindCommand, Command: CmdOpenReturnPath},
		{Kind: KindCommand, Command: CmdPing, Value: 1},
		{Kind: KindSectionFull, Section: hs},
		{Kind: KindHandshake, Section: hs},
		{Kind: KindFooter, Section: hs},
		{Kind: KindSectionStart, Section: ram},
		{Kind: KindMemSize, Section: ram, Value: ramSize + romSize},
		{Kind: KindEOS, Section: ram},
		{Kind: KindFooter, Section: ram},
		{Kind: KindSectionPart, Section: ram},
		{Kind: KindPage, Section: ram, Block: "pc.ram", Offset: 0, Flags: FlagPage},
		{Kind: KindPage, Section: ram, Block: "pc.ram", Offset: testPS, Flags: FlagPage | FlagContinue},
		{Kind: KindZero, Section: ram, Block: "pc.ram", Offset: 2 * testPS, Flags: FlagZero | FlagContinue},
		{Kind: KindPage, Section: ram, Block: romName, Offset: testPS, Flags: FlagPage},
		{Kind: KindPage, Section: ram, Block: "pc.ram", Offset: 15 * testPS, Flags: FlagPage},
		{Kind: KindEOS, Section: ram},
		{Kind: KindFooter, Section: ram},
		{Kind: KindSectionPart, Section: ram},
		{Kind: KindZero, Section: ram, Block: "pc.ram", Offset: 3 * testPS, Flags: FlagZero | FlagContinue},
		{Kind: KindFlush, Section: ram},
		{Kind: KindEOS, Section: ram},
		{Kind: KindFooter, Section: ram},
		{Kind: KindCommand, Command: CmdPing, Value: 2},
		{Kind: KindSectionEnd, Section: ram},
		{Kind: KindPage, Section: ram, Block: "pc.ram", Offset: 4 * testPS, Flags: FlagPage | FlagContinue},
		{Kind: KindZero, Section: ram, Block: romName, Offset: 0, Flags: FlagZero},
		{Kind: KindEOS, Section: ram},
		{Kind: KindFooter, Section: ram},
		{Kind: KindSectionFull, Section: timer},
		{Kind: KindDevice, Section: timer},
		{Kind: KindFooter, Section: timer},
		{Kind: KindSectionFull, Section: net},
		{Kind: KindDevice, Section: net},
		{Kind: KindFooter, Section: net},
		{Kind: KindSectionFull, Section: cpu},
		{Kind: KindDevice, Section: cpu},
		{Kind: KindFooter, Section: cpu},
		{Kind: KindEOF},
		{Kind: KindVMDesc},
	}
	got := summarize(recs)
	if !reflect.DeepEqual(got, want) {
		for i := range max(len(got), len(want)) {
			var g, w recSummary
			if i < len(got) {
				g = got[i]
			}
			if i < len(want) {
				w = want[i]
			}
			mark := "  "
			if g != w {
				mark = "!!"
			}
			t.Logf("%s %d got %+v\n      want %+v", mark, i, g, w)
		}
		t.Fatal("decoded records differ")
	}

	// Payloads.
	if h := recs[4].Handshake; h == nil || h.Protocol != HandshakeProtocol || h.Side != SideSource || h.GuestID != guestName {
		t.Errorf("handshake %+v", recs[4].Handshake)
	} else {
		local := testHandshake()
		local.Protocol, local.Side = HandshakeProtocol, SideDestination
		if err := local.Check(h); err != nil {
			t.Errorf("Check of an identical handshake: %v", err)
		}
	}
	if !reflect.DeepEqual(recs[7].Blocks, testBlocks) {
		t.Errorf("MEM_SIZE blocks %v, want %v", recs[7].Blocks, testBlocks)
	}
	if !bytes.Equal(recs[30].Data, []byte{1, 2, 3, 4, 5, 6, 7, 8}) ||
		!bytes.Equal(recs[33].Data, bytes.Repeat([]byte("net!"), 100)) || len(recs[36].Data) != 0 {
		t.Errorf("device payloads differ")
	}
	for _, p := range []struct {
		block string
		off   uint64
	}{{"pc.ram", 0}, {"pc.ram", testPS}, {romName, testPS}, {"pc.ram", 15 * testPS}, {"pc.ram", 4 * testPS}} {
		if !bytes.Equal(pages[pageKey(p.block, p.off)], pattern(p.block, p.off)) {
			t.Errorf("page %s@%#x differs", p.block, p.off)
		}
	}
	desc, err := ParseVMDesc(recs[len(recs)-1].Data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(desc, e.VMDesc()) {
		t.Errorf("vmdesc read back %+v, encoder has %+v", desc, e.VMDesc())
	}
	ds := d.Stats()
	if ds.Bytes != uint64(buf.Len()) || ds.Pages != 5 || ds.ZeroPages != 3 {
		t.Errorf("decoder stats %+v, stream is %d bytes", ds, buf.Len())
	}
}

// TestRoundTripToolMode decodes without knowing the blocks: they come from
// MEM_SIZE.
func TestRoundTripToolMode(t *testing.T) {
	var buf bytes.Buffer
	writeSample(t, &buf, false)
	recs, pages, err := decodeAll(NewDecoder(bytes.NewReader(buf.Bytes()), Limits{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(pages) != 5 || recs[len(recs)-1].Kind != KindVMDesc {
		t.Errorf("tool mode read %d pages, last record %v", len(pages), recs[len(recs)-1].Kind)
	}
}

// TestRoundTripRandom encodes random sequences of sections and records and
// checks the decoder returns exactly what was put in, including where
// CONTINUE is used and what each page holds.
func TestRoundTripRandom(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		ps := uint64(rapid.SampledFrom([]int{1024, 4096, 16384}).Draw(t, "pagesize"))
		nblocks := rapid.IntRange(1, 4).Draw(t, "nblocks")
		var blocks []Block
		lim := map[string]uint64{}
		for i := range nblocks {
			b := Block{Name: fmt.Sprintf("blk%d", i), Size: ps * uint64(rapid.IntRange(1, 8).Draw(t, "pages"))}
			blocks = append(blocks, b)
			lim[b.Name] = b.Size + ps*uint64(rapid.IntRange(0, 2).Draw(t, "spare"))
		}
		var buf bytes.Buffer
		e := NewEncoder(&buf)
		must(t, e.WriteHeader(rapid.StringMatching(`[a-z0-9-]{0,20}`).Draw(t, "machine")))
		must(t, e.StartRAM(ps, blocks))
		type put struct {
			block string
			off   uint64
			zero  bool
			cont  bool
			data  []byte
		}
		var puts []put
		var devices [][]byte
		last := ""
		nsec := rapid.IntRange(0, 5).Draw(t, "sections")
		for s := range nsec {
			if s == nsec-1 {
				must(t, e.BeginRAMEnd())
			} else {
				must(t, e.BeginRAMPart())
			}
			for range rapid.IntRange(0, 12).Draw(t, "records") {
				b := blocks[rapid.IntRange(0, nblocks-1).Draw(t, "block")]
				off := ps * uint64(rapid.IntRange(0, int(b.Size/ps)-1).Draw(t, "page"))
				p := put{block: b.Name, off: off, zero: rapid.Bool().Draw(t, "zero"), cont: b.Name == last}
				if p.zero {
					must(t, e.PutZero(b.Name, off))
				} else {
					p.data = bytes.Repeat([]byte{byte(len(puts) + 1)}, int(ps))
					must(t, e.PutPage(b.Name, off, p.data))
				}
				last = b.Name
				puts = append(puts, p)
			}
			must(t, e.CloseRAMSection())
		}
		for i := range rapid.IntRange(0, 3).Draw(t, "devices") {
			p := rapid.SliceOfN(rapid.Byte(), 0, 300).Draw(t, "payload")
			devices = append(devices, p)
			must(t, e.WriteDevice(fmt.Sprintf("dev%d", i), uint32(i), 1, p))
		}
		must(t, e.Close())

		d := NewDecoder(bytes.NewReader(buf.Bytes()), Limits{PageSize: ps, Blocks: lim})
		var gotPuts []put
		var gotDevices [][]byte
		for {
			rec, err := d.Next()
			if err != nil {
				if err == io.EOF {
					break
				}
				t.Fatal(err)
			}
			switch rec.Kind {
			case KindPage:
				p := make([]byte, ps)
				must(t, d.ReadPage(p))
				gotPuts = append(gotPuts, put{rec.Block, rec.Offset, false, rec.Flags&FlagContinue != 0, p})
			case KindZero:
				gotPuts = append(gotPuts, put{rec.Block, rec.Offset, true, rec.Flags&FlagContinue != 0, nil})
			case KindDevice:
				gotDevices = append(gotDevices, bytes.Clone(rec.Data))
			}
		}
		if !reflect.DeepEqual(gotPuts, puts) {
			t.Fatalf("records differ:\n got %v\nwant %v", gotPuts, puts)
		}
		if len(gotDevices) != len(devices) {
			t.Fatalf("%d devices, want %d", len(gotDevices), len(devices))
		}
		for i := range devices {
			if !bytes.Equal(gotDevices[i], devices[i]) {
				t.Fatalf("device %d payload differs", i)
			}
		}
		if err := checkAnalyzable(buf.Bytes()); err != nil {
			t.Fatalf("analyze-migration.py would fail: %v", err)
		}
	})
}

// TestTruncated cuts a valid stream at every length: each prefix must give
// ErrCorrupt (ending inside something), never a panic or a silent success.
func TestTruncated(t *testing.T) {
	var buf bytes.Buffer
	writeSample(t, &buf, true)
	full := buf.Bytes()
	// The stream is complete at the EOF byte: prefixes that end after it (in
	// the optional vmdesc) only lose the vmdesc.
	eof := bytes.LastIndex(full, []byte{SecEOF, SecVMDesc})
	// Every length near a record boundary (where all the headers are), and
	// a stride through the page bytes in between.
	recs, _, err := decodeAll(NewDecoder(bytes.NewReader(full), testLimits()))
	must(t, err)
	cuts := map[int]bool{}
	for _, r := range recs {
		for n := max(0, int(r.Pos)-24); n < min(len(full), int(r.Pos)+300); n++ {
			cuts[n] = true
		}
	}
	for n := 0; n < len(full); n += 61 {
		cuts[n] = true
	}
	for n := eof - 30; n < len(full); n++ {
		cuts[n] = true
	}
	for n := range cuts {
		err := decodeErr(full[:n], testLimits())
		switch {
		case n == eof+1:
			if err != nil {
				t.Fatalf("prefix ending at EOF marker: %v", err)
			}
		default:
			if err == nil {
				t.Fatalf("prefix of %d/%d bytes decoded without error", n, len(full))
			}
			wantDecodeError(t, err, ErrCorrupt, nil, -1, "")
			if !strings.Contains(err.Error(), "ends") {
				t.Fatalf("prefix %d: error %q does not say the stream ends", n, err)
			}
		}
	}
}
