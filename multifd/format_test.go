package multifd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/migctl/migctl/stream"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// golden builds a byte slice of size n, zero except for the hex runs given
// at their offsets: the tables below are written from qemu-wire.md §5 and
// QEMU's multifd.h, not from the encoder.
func golden(t *testing.T, n int, runs map[int]string) []byte {
	t.Helper()
	b := make([]byte, n)
	for off, h := range runs {
		v, err := hex.DecodeString(strings.ReplaceAll(h, " ", ""))
		if err != nil {
			t.Fatal(err)
		}
		copy(b[off:], v)
	}
	return b
}

func TestInitGolden(t *testing.T) {
	in := Init{Channel: 3}
	copy(in.UUID[:], []byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff})
	want := golden(t, 64, map[int]string{
		0:  "11223344",                         // magic
		4:  "00000001",                         // version
		8:  "00112233445566778899aabbccddeeff", // uuid
		24: "03",                               // channel id; 25..63 reserved
	})
	got, err := in.MarshalBinary()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("Init bytes:\n got %x\nwant %x (%v)", got, want, err)
	}
	back, err := ParseInit(want)
	if err != nil || back != in {
		t.Fatalf("ParseInit: %+v, %v", back, err)
	}
	if err := back.Check(in.UUID, 4); err != nil {
		t.Fatalf("Check with 4 channels: %v", err)
	}
	// QEMU 7.2 accepts id == channels (it checks id > channels); migctl
	// does not: ids run from 0 to channels-1.
	if err := back.Check(in.UUID, 3); !errors.Is(err, stream.ErrMismatch) {
		t.Fatalf("channel 3 of 3: %v", err)
	}
	if err := back.Check([16]byte{}, 4); !errors.Is(err, stream.ErrMismatch) || !strings.Contains(err.Error(), "UUID") {
		t.Fatalf("other UUID: %v", err)
	}
	for _, c := range []struct {
		name string
		off  int
		val  byte
		cls  error
	}{
		{"magic", 0, 0x12, stream.ErrCorrupt},
		{"version", 7, 2, stream.ErrUnsupported},
		{"reserved byte 25", 25, 1, stream.ErrCorrupt},
		{"reserved byte 63", 63, 1, stream.ErrCorrupt},
	} {
		b := bytes.Clone(want)
		b[c.off] = c.val
		if _, err := ParseInit(b); !errors.Is(err, c.cls) {
			t.Errorf("%s: %v, want class %v", c.name, err, c.cls)
		}
	}
	if _, err := ReadInit(bytes.NewReader(want[:40])); !errors.Is(err, stream.ErrCorrupt) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated initial packet: %v", err)
	}
}

// The current (>= 9.0) header: zero_pages at 32, zero offsets after the
// normal ones.
func TestHeaderGoldenCurrent(t *testing.T) {
	h := &Header{Flags: FlagZlib, PagesAlloc: 128, NextPacketSize: 0x1234, PacketNum: 7,
		Block: "pc.ram", Normal: []uint64{0x1000, 0x3000}, Zero: []uint64{0x2000}}
	want := golden(t, 1344, map[int]string{
		0:   "11223344",         // magic
		4:   "00000001",         // version
		8:   "00000002",         // flags: zlib
		12:  "00000080",         // pages_alloc 128
		16:  "00000002",         // normal_pages
		20:  "00001234",         // next_packet_size
		24:  "0000000000000007", // packet_num
		32:  "00000001",         // zero_pages
		64:  hex.EncodeToString([]byte("pc.ram")),
		320: "0000000000001000 0000000000003000 0000000000002000",
	})
	got, err := AppendHeader(nil, h, 4096, LayoutCurrent)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("header:\n got %x\nwant %x (%v)", got, want, err)
	}
	if HeaderSize(4096) != 1344 || HeaderSize(65536) != 320+8*8 {
		t.Fatalf("HeaderSize(4096) = %d, HeaderSize(64K) = %d", HeaderSize(4096), HeaderSize(65536))
	}
	// The same header decodes (zlib payload not read here).
	r := newTestReader(t, want, Limits{Compression: CompressionZlib, Blocks: map[string]uint64{"pc.ram": 1 << 20}})
	got2, err := r.Next()
	if err != nil {
		t.Fatal(err)
	}
	if got2.Block != "pc.ram" || got2.PacketNum != 7 || got2.NextPacketSize != 0x1234 ||
		!equalU64(got2.Normal, []uint64{0x1000, 0x3000}) || !equalU64(got2.Zero, []uint64{0x2000}) {
		t.Fatalf("decoded %+v", got2)
	}
	// 7.2 cannot express zero pages.
	if _, err := AppendHeader(nil, h, 4096, LayoutQEMU72); !errors.Is(err, ErrInvalid) {
		t.Fatalf("7.2 header with zero pages: %v", err)
	}
}

// QEMU 7.2 quirks, from its multifd.c: a packet without pages keeps the
// previous packet's next_packet_size and block name (the receiver ignores
// both); a SYNC packet may carry pages; offset 32 is reserved.
func TestHeaderQEMU72(t *testing.T) {
	page := bytes.Repeat([]byte{0xab}, 4096)
	// Packet 1: SYNC with one page (7.2 does that when a sync request meets
	// a pending job), nocomp.
	p1 := golden(t, 1344, map[int]string{
		0:   "11223344 00000001 00000001 00000080 00000001 00001000 0000000000000005",
		64:  hex.EncodeToString([]byte("pc.ram")),
		320: "0000000000004000",
	})
	// Packet 2: the empty follow-up job: flags 0, no pages, stale size and
	// name, same packet number.
	p2 := golden(t, 1344, map[int]string{
		0:  "11223344 00000001 00000000 00000080 00000000 00001000 0000000000000005",
		64: hex.EncodeToString([]byte("pc.ram")),
	})
	data := append(append(append([]byte{}, p1...), page...), p2...)
	lim := Limits{Layout: LayoutQEMU72, Blocks: map[string]uint64{"pc.ram": 1 << 20}}
	r := newTestReader(t, data, lim)
	h, err := r.Next()
	if err != nil || !h.Sync() || !equalU64(h.Normal, []uint64{0x4000}) {
		t.Fatalf("7.2 sync packet with a page: %+v %v", h, err)
	}
	got := make([]byte, 4096)
	if err := r.ReadPages(func(int, uint64) []byte { return got }); err != nil || !bytes.Equal(got, page) {
		t.Fatalf("page: %v", err)
	}
	h, err = r.Next()
	if err != nil || h.Sync() || len(h.Normal) != 0 || h.Block != "" {
		t.Fatalf("7.2 empty packet: %+v %v", h, err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("end: %v", err)
	}
	// The same empty packet from a current sender is corrupt: it announces
	// payload bytes it does not have.
	r = newTestReader(t, p2, Limits{Blocks: lim.Blocks})
	if _, err := r.Next(); !errors.Is(err, stream.ErrCorrupt) {
		t.Fatalf("current layout, stale size: %v", err)
	}
	// In 7.2 offset 32 is not zero_pages: a value there is ignored.
	p3 := bytes.Clone(p2)
	p3[35] = 9
	r = newTestReader(t, p3, lim)
	if h, err := r.Next(); err != nil || len(h.Zero) != 0 {
		t.Fatalf("7.2 reserved word: %+v %v", h, err)
	}
	// 7.2's compression field has 3 bits: 0x10 (UADK in current QEMU) is
	// an unknown flag there.
	p4 := bytes.Clone(p2)
	p4[11] = 0x10
	r = newTestReader(t, p4, lim)
	if _, err := r.Next(); !errors.Is(err, stream.ErrCorrupt) {
		t.Fatalf("7.2 flag 0x10: %v", err)
	}
}

func newTestReader(t *testing.T, data []byte, lim Limits) *Reader {
	t.Helper()
	r, err := NewReader(bytes.NewReader(data), 0, lim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

func equalU64(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Sync packets as QEMU sends them: FlagSync without compression bits (the
// method's prepare step never runs for them), no pages, no block name;
// pages_alloc 0 in current QEMU (the RAM fields are not filled), the
// capacity in 7.2.
func TestSyncPacketGolden(t *testing.T) {
	for _, c := range []struct {
		layout Layout
		alloc  string
	}{{LayoutCurrent, "00000000"}, {LayoutQEMU72, "00000080"}} {
		var buf bytes.Buffer
		w, err := NewWriter(&buf, WriterOptions{Compression: CompressionZstd, Layout: c.layout})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.WriteSync(42); err != nil {
			t.Fatal(err)
		}
		w.Close()
		want := golden(t, 1344, map[int]string{0: "11223344 00000001 00000001" + c.alloc + "00000000 00000000 000000000000002a"})
		if !bytes.Equal(buf.Bytes(), want) {
			t.Errorf("%v sync packet:\n got %x\nwant %x", c.layout, buf.Bytes(), want)
		}
	}
}
