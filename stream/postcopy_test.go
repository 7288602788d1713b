package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
)

// postcopyStream writes what a postcopy source sends: precopy, ADVISE,
// DISCARD, the package (LISTEN, a device, PING 0x42), RUN, a background
// page, END and EOF. It returns the bytes and the split offset where the
// background starts.
func postcopyStream(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(t, e.WriteHeader(guestName))
	must(t, e.WriteCommand(CmdPostcopyAdvise, PostcopyAdvise(testPS, testPS)))
	must(t, e.StartRAM(testPS, testBlocks))
	must(t, e.BeginRAMPart())
	must(t, e.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
	must(t, e.CloseRAMSection())
	must(t, e.WriteDiscard("pc.ram", []Range{{0, testPS}, {3 * testPS, 2 * testPS}}))
	must(t, e.WritePackage(func(p *Encoder) error {
		if err := p.WriteCommand(CmdPostcopyListen, nil); err != nil {
			return err
		}
		if err := p.WriteDevice("timer", 0, 1, []byte("tick")); err != nil {
			return err
		}
		return p.Ping(PingPackageLoaded)
	}))
	must(t, e.WriteCommand(CmdPostcopyRun, nil))
	must(t, e.BeginRAMEnd())
	must(t, e.PutPage("pc.ram", 3*testPS, pattern("pc.ram", 3*testPS)))
	must(t, e.CloseRAMSection())
	must(t, e.Close())
	return buf.Bytes()
}

// A postcopy stream round-trips: the discard ranges, the package's
// LISTEN, device and PING in order, and what follows it.
func TestPostcopyStreamRoundTrip(t *testing.T) {
	data := postcopyStream(t)
	lim := testLimits()
	lim.MaxPackage = DefaultMaxPackage
	d := NewDecoder(bytes.NewReader(data), lim)
	var got []string
	page := make([]byte, testPS)
	for {
		rec, err := d.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		must(t, err)
		switch rec.Kind {
		case KindPage:
			must(t, d.ReadPage(page))
			if !bytes.Equal(page, pattern(rec.Block, rec.Offset)) {
				t.Fatalf("page %s@%#x corrupted", rec.Block, rec.Offset)
			}
			got = append(got, "page")
		case KindCommand:
			switch rec.Command {
			case CmdPostcopyAdvise:
				h, tp, ok := ParseAdvise(rec.Data)
				if !ok || h != testPS || tp != testPS {
					t.Fatalf("ADVISE %d %d %v", h, tp, ok)
				}
				got = append(got, "advise")
			case CmdPostcopyDiscard:
				b, r, err := ParseDiscard(rec.Data)
				must(t, err)
				if b != "pc.ram" || len(r) != 2 || r[1] != (Range{3 * testPS, 2 * testPS}) {
					t.Fatalf("DISCARD %q %v", b, r)
				}
				got = append(got, "discard")
			case CmdPackaged:
				got = append(got, "package[")
				p := d.Package(bytes.Clone(rec.Data))
				for {
					pr, err := p.Next()
					if errors.Is(err, io.EOF) {
						break
					}
					must(t, err)
					switch {
					case pr.Kind == KindCommand && pr.Command == CmdPostcopyListen:
						got = append(got, "listen")
					case pr.Kind == KindDevice:
						got = append(got, "device:"+string(pr.Data))
					case pr.Kind == KindCommand && pr.Command == CmdPing:
						if pr.Value != PingPackageLoaded {
							t.Fatalf("ping %d", pr.Value)
						}
						got = append(got, "ping")
					}
				}
				got = append(got, "]")
			case CmdPostcopyRun:
				got = append(got, "run")
			}
		}
	}
	want := "advise page discard package[ listen device:tick ping ] run page"
	if s := join(got); s != want {
		t.Fatalf("records\n got %s\nwant %s", s, want)
	}
}

func join(s []string) string {
	var b bytes.Buffer
	for i, x := range s {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(x)
	}
	return b.String()
}

// A destination that does not take postcopy refuses the package as
// before; one that does bounds it.
func TestPackageLimits(t *testing.T) {
	data := postcopyStream(t)
	for _, c := range []struct {
		max  int
		want error
	}{{0, ErrUnsupported}, {8, ErrTooLarge}} {
		lim := testLimits()
		lim.MaxPackage = c.max
		d := NewDecoder(bytes.NewReader(data), lim)
		var err error
		for err == nil {
			var rec Record
			rec, err = d.Next()
			if rec.Kind == KindPage {
				err = d.SkipPage()
			}
		}
		if !errors.Is(err, c.want) {
			t.Fatalf("MaxPackage %d: %v, want %v", c.max, err, c.want)
		}
	}
}

// After a cut, both ends carry on on a new connection: the encoder drops
// what it buffered and names the block again; the decoder forgets its
// buffer and the CONTINUE block, and reads sections again.
func TestResumeOnNewConnection(t *testing.T) {
	var first bytes.Buffer
	e := NewEncoder(&first)
	must(t, e.WriteHeader(guestName))
	must(t, e.StartRAM(testPS, testBlocks))
	must(t, e.BeginRAMPart())
	must(t, e.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
	must(t, e.CloseRAMSection())
	must(t, e.Flush())
	must(t, e.BeginRAMPart()) // the cut comes with this section open
	must(t, e.PutPage("pc.ram", testPS, pattern("pc.ram", testPS)))

	var second bytes.Buffer
	e.Resume(&second)
	must(t, e.WriteCommand(CmdRecvBitmap, RecvBitmapCommand("pc.ram")))
	must(t, e.BeginRAMPart())
	must(t, e.PutPage("pc.ram", 2*testPS, pattern("pc.ram", 2*testPS)))
	must(t, e.PutPage("pc.ram", 3*testPS, pattern("pc.ram", 3*testPS)))
	must(t, e.CloseRAMSection())
	must(t, e.Close())
	if w := second.Bytes(); len(w) < 1 || w[0] != SecCommand {
		t.Fatalf("the resumed stream starts with % x, want a command (no header)", w[:min(8, len(w))])
	}
	// The first page record after the resume names its block.
	if !bytes.Contains(second.Bytes(), append(binary.BigEndian.AppendUint64(nil, 2*testPS|FlagPage), append([]byte{6}, "pc.ram"...)...)) {
		t.Fatal("the first page after the resume does not name its block")
	}

	d := NewDecoder(bytes.NewReader(first.Bytes()), testLimits())
	page := make([]byte, testPS)
	for {
		rec, err := d.Next()
		if err != nil { // the first connection is cut inside the PART
			break
		}
		if rec.Kind == KindPage {
			if err := d.ReadPage(page); err != nil {
				break
			}
		}
	}
	d.Resume(bytes.NewReader(second.Bytes()))
	var pages []uint64
	for {
		rec, err := d.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		must(t, err)
		if rec.Kind == KindPage {
			must(t, d.ReadPage(page))
			if !bytes.Equal(page, pattern(rec.Block, rec.Offset)) {
				t.Fatalf("page %#x corrupted", rec.Offset)
			}
			pages = append(pages, rec.Offset)
		}
	}
	if len(pages) != 2 || pages[0] != 2*testPS || pages[1] != 3*testPS {
		t.Fatalf("pages after the resume: %v", pages)
	}
}

// A process that never saw the stream's start (a migctl that reattached
// to a guest process) reads the resumed stream with NewReattachedDecoder:
// the RAM section is adopted from the first SECTION_PART; a second RAM
// section id, or a SECTION_START, is refused.
func TestReattachedDecoder(t *testing.T) {
	resumed := func(t *testing.T) []byte {
		var first bytes.Buffer
		e := NewEncoder(&first)
		must(t, e.WriteHeader(guestName))
		must(t, e.StartRAM(testPS, testBlocks))
		must(t, e.BeginRAMPart())
		must(t, e.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
		var second bytes.Buffer
		e.Resume(&second)
		must(t, e.WriteCommand(CmdRecvBitmap, RecvBitmapCommand("pc.ram")))
		must(t, e.BeginRAMPart())
		must(t, e.PutPage("pc.ram", 2*testPS, pattern("pc.ram", 2*testPS)))
		must(t, e.CloseRAMSection())
		must(t, e.BeginRAMPart())
		must(t, e.PutPage("pc.ram", 3*testPS, pattern("pc.ram", 3*testPS)))
		must(t, e.CloseRAMSection())
		must(t, e.Close())
		return second.Bytes()
	}
	read := func(b []byte) ([]uint64, error) {
		d := NewReattachedDecoder(testLimits())
		d.Resume(bytes.NewReader(b))
		page := make([]byte, testPS)
		var pages []uint64
		for {
			rec, err := d.Next()
			if errors.Is(err, io.EOF) {
				return pages, nil
			}
			if err != nil {
				return pages, err
			}
			if rec.Kind == KindPage {
				if err := d.ReadPage(page); err != nil {
					return pages, err
				}
				if !bytes.Equal(page, pattern(rec.Block, rec.Offset)) {
					return pages, fmt.Errorf("page %#x corrupted", rec.Offset)
				}
				pages = append(pages, rec.Offset)
			}
		}
	}
	b := resumed(t)
	pages, err := read(b)
	if err != nil || len(pages) != 2 || pages[0] != 2*testPS || pages[1] != 3*testPS {
		t.Fatalf("pages %v, %v; want [%#x %#x]", pages, err, 2*testPS, 3*testPS)
	}
	// The second SECTION_PART names another section id: refused.
	cmdLen := 1 + 2 + 2 + len(RecvBitmapCommand("pc.ram"))
	if b[cmdLen] != SecPart {
		t.Fatalf("the resumed stream has % x after its command, want SECTION_PART", b[cmdLen])
	}
	head := b[cmdLen : cmdLen+5] // SECTION_PART, its section id
	j := cmdLen + 1 + bytes.Index(b[cmdLen+1:], head)
	if j <= cmdLen {
		t.Fatal("no second SECTION_PART")
	}
	bad := append([]byte(nil), b...)
	bad[j+4]++ // the second part's id, low byte
	if _, err := read(bad); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a second RAM section id: %v, want ErrCorrupt", err)
	}
}

// The received bitmap round-trips, and every bad size, end mark or stray
// bit is refused before it is used.
func TestRecvBitmap(t *testing.T) {
	const pages = 70
	words := []uint64{0xdeadbeef00000001, 0x3f} // pages 0, 32.., 64..69
	var buf bytes.Buffer
	must(t, WriteRecvBitmap(&buf, "pc.ram", words))
	m, err := ReadRP(&buf)
	must(t, err)
	if b, err := ParseRecvBitmapCommand(m.Data); m.Type != RPRecvBitmap || err != nil || b != "pc.ram" {
		t.Fatalf("message %v %q %v", m, b, err)
	}
	got, err := ReadRecvBitmap(&buf, pages)
	must(t, err)
	if len(got) != 2 || got[0] != words[0] || got[1] != words[1] {
		t.Fatalf("bitmap %x, want %x", got, words)
	}
	bad := func(name string, b []byte, pages int) {
		t.Helper()
		if _, err := ReadRecvBitmap(bytes.NewReader(b), pages); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
	}
	good := new(raw).be64(16).Bytes()
	good = binary.LittleEndian.AppendUint64(good, 1)
	good = binary.LittleEndian.AppendUint64(good, 1)
	good = binary.BigEndian.AppendUint64(good, RecvBitmapEnd)
	if _, err := ReadRecvBitmap(bytes.NewReader(good), 70); err != nil {
		t.Fatalf("a good bitmap: %v", err)
	}
	bad("size for another block", good, 200)
	bad("huge size", new(raw).be64(1<<62).Bytes(), 70)
	tail := bytes.Clone(good)
	binary.LittleEndian.PutUint64(tail[16:], 1<<6) // page 70 of a 70-page block
	bad("bit past the last page", tail, 70)
	end := bytes.Clone(good)
	end[len(end)-1] ^= 1
	bad("end mark", end, 70)
	bad("cut short", good[:20], 70)
}

// Page requests round-trip and reject malformed payloads.
func TestPageRequests(t *testing.T) {
	var buf bytes.Buffer
	must(t, WriteRP(&buf, NewReqPagesID("pc.ram", 5*testPS, testPS)))
	must(t, WriteRP(&buf, NewReqPages(6*testPS, 2*testPS)))
	for i, want := range []struct {
		block string
		named bool
		start uint64
		n     uint32
	}{{"pc.ram", true, 5 * testPS, testPS}, {"", false, 6 * testPS, 2 * testPS}} {
		m, err := ReadRP(&buf)
		must(t, err)
		b, named, start, n, ok := m.PageRequest()
		if !ok || b != want.block || named != want.named || start != want.start || n != want.n {
			t.Fatalf("request %d: %q %v %#x %d %v", i, b, named, start, n, ok)
		}
	}
	if _, _, _, _, ok := NewShut(0).PageRequest(); ok {
		t.Fatal("SHUT parsed as a page request")
	}
	if v, ok := NewResumeAck().Value(); !ok || v != 1 {
		t.Fatalf("RESUME_ACK %d %v", v, ok)
	}
}

// The preempt channel round-trips pages and zero pages and ends with EOS.
func TestPreemptChannel(t *testing.T) {
	blocks := map[string]uint64{"pc.ram": ramSize, romName: romSize}
	var buf bytes.Buffer
	w := NewPageWriter(&buf, testPS, blocks)
	must(t, w.PutPage("pc.ram", 3*testPS, pattern("pc.ram", 3*testPS)))
	must(t, w.PutPage("pc.ram", 4*testPS, pattern("pc.ram", 4*testPS)))
	must(t, w.PutZero(romName, testPS))
	must(t, w.PutPage("pc.ram", 0, pattern("pc.ram", 0)))
	must(t, w.Close())
	if err := w.PutPage("pc.ram", ramSize, pattern("pc.ram", 0)); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a page past the block: %v", err)
	}
	r := NewPageReader(&buf, testPS, blocks)
	page := make([]byte, testPS)
	var got []string
	for {
		rec, err := r.Next()
		must(t, err)
		if rec.Kind == KindEOS {
			break
		}
		if rec.Kind == KindPage {
			must(t, r.ReadPage(page))
			if !bytes.Equal(page, pattern(rec.Block, rec.Offset)) {
				t.Fatalf("page %s@%#x corrupted", rec.Block, rec.Offset)
			}
		}
		got = append(got, rec.Kind.String()+"@"+string(rune('0'+rec.Offset/testPS)))
	}
	if s := join(got); s != "page@3 page@4 zero@1 page@0" {
		t.Fatalf("records %s", s)
	}
	for name, b := range map[string][]byte{
		"no magic":      new(raw).be32(Magic).Bytes(),
		"unknown block": new(raw).be32(PreemptMagic).be64(FlagPage).str("nope").Bytes(),
		"outside":       new(raw).be32(PreemptMagic).be64(ramSize | FlagPage).str("pc.ram").Bytes(),
		"continue":      new(raw).be32(PreemptMagic).be64(FlagPage | FlagContinue).Bytes(),
		"section type":  new(raw).be32(PreemptMagic).be64(FlagMemSize).Bytes(),
		"cut":           new(raw).be32(PreemptMagic).be64(FlagPage).str("pc.ram").bytes(make([]byte, 10)).Bytes(),
	} {
		r := NewPageReader(bytes.NewReader(b), testPS, blocks)
		var err error
		for err == nil {
			var rec PageRecord
			rec, err = r.Next()
			if err == nil && rec.Kind == KindPage {
				err = r.ReadPage(page)
			}
			if err == nil && rec.Kind == KindEOS {
				t.Fatalf("%s: accepted", name)
			}
		}
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrMismatch) {
			t.Errorf("%s: %v, want a classified decode error", name, err)
		}
	}
}

// FuzzPageReader: hostile preempt channels never panic, and every error is
// classified.
func FuzzPageReader(f *testing.F) {
	var buf bytes.Buffer
	w := NewPageWriter(&buf, testPS, map[string]uint64{"pc.ram": ramSize})
	must(f, w.PutPage("pc.ram", testPS, pattern("pc.ram", testPS)))
	must(f, w.PutZero("pc.ram", 0))
	must(f, w.Close())
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewPageReader(bytes.NewReader(data), testPS, map[string]uint64{"pc.ram": ramSize})
		page := make([]byte, testPS)
		for i := 0; i <= len(data); i++ {
			rec, err := r.Next()
			if err == nil && rec.Kind == KindPage {
				err = r.ReadPage(page)
			}
			if err != nil {
				if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrMismatch) {
					t.Fatalf("unclassified error %v", err)
				}
				return
			}
			if rec.Kind == KindEOS {
				return
			}
		}
		t.Fatal("no progress")
	})
}

// FuzzRecvBitmap: a hostile received bitmap never panics nor allocates
// more than the block's bitmap.
func FuzzRecvBitmap(f *testing.F) {
	var buf bytes.Buffer
	must(f, WriteRecvBitmap(&buf, "pc.ram", []uint64{1, 2}))
	f.Add(buf.Bytes()[4+7:], 100)
	f.Fuzz(func(t *testing.T, data []byte, pages int) {
		pages = max(0, pages%(1<<20))
		words, err := ReadRecvBitmap(bytes.NewReader(data), pages)
		if err == nil && len(words) != RecvBitmapBytes(pages)/8 {
			t.Fatalf("%d words for %d pages", len(words), pages)
		}
		if err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("unclassified error %v", err)
		}
	})
}

// FuzzPostcopyDecoder: the decoder with packages on never panics on
// hostile bytes, nor does a package's decoder.
func FuzzPostcopyDecoder(f *testing.F) {
	f.Add(postcopyStream(&testing.T{}))
	f.Fuzz(func(t *testing.T, data []byte) {
		lim := fuzzLimits(false)
		lim.MaxPackage = 1 << 16
		d := NewDecoder(bytes.NewReader(data), lim)
		page := make([]byte, testPS)
		for i := 0; i <= len(data)+2; i++ {
			rec, err := d.Next()
			if err != nil {
				return
			}
			switch {
			case rec.Kind == KindPage:
				if d.ReadPage(page) != nil {
					return
				}
			case rec.Kind == KindCommand && rec.Command == CmdPackaged:
				p := d.Package(bytes.Clone(rec.Data))
				for j := 0; j <= len(rec.Data)+2; j++ {
					pr, err := p.Next()
					if err != nil {
						break
					}
					if pr.Kind == KindPage && p.ReadPage(page) != nil {
						break
					}
				}
			case rec.Kind == KindCommand && rec.Command == CmdPostcopyDiscard:
				if _, _, err := ParseDiscard(rec.Data); err != nil {
					t.Fatalf("the decoder passed a discard ParseDiscard refuses: %v", err)
				}
			}
		}
	})
}

// FuzzReattachedDecoder: a reattached decoder (no header, no handshake, the
// RAM section adopted from the first continuation) never panics on
// hostile bytes, and only ever returns records of the blocks it was given.
func FuzzReattachedDecoder(f *testing.F) {
	f.Add(postcopyStream(&testing.T{}))
	var b bytes.Buffer
	e := NewEncoder(&b)
	must(f, e.WriteHeader(guestName))
	must(f, e.StartRAM(testPS, testBlocks))
	var second bytes.Buffer
	e.Resume(&second)
	must(f, e.WriteCommand(CmdRecvBitmap, RecvBitmapCommand("pc.ram")))
	must(f, e.BeginRAMPart())
	must(f, e.PutPage("pc.ram", testPS, pattern("pc.ram", testPS)))
	must(f, e.CloseRAMSection())
	must(f, e.Close())
	f.Add(second.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		lim := fuzzLimits(false)
		lim.MaxPackage = 1 << 16
		d := NewReattachedDecoder(lim)
		d.Resume(bytes.NewReader(data))
		page := make([]byte, testPS)
		for i := 0; i <= len(data)+2; i++ {
			rec, err := d.Next()
			if err != nil {
				return
			}
			if rec.Kind == KindPage {
				if _, ok := lim.Blocks[rec.Block]; !ok {
					t.Fatalf("a page of block %q, not in the limits", rec.Block)
				}
				if d.ReadPage(page) != nil {
					return
				}
			}
		}
	})
}
