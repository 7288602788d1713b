package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

const (
	testPS    = 4096
	ramSize   = 16 * testPS // "pc.ram"
	romSize   = 2 * testPS  // "/rom@etc/acpi/tables"
	romName   = "/rom@etc/acpi/tables"
	guestName = "guest-7f3a"
)

var testBlocks = []Block{{"pc.ram", ramSize}, {romName, romSize}}

func testLimits() Limits {
	return Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": ramSize, romName: romSize}}
}

func testHandshake() *Handshake {
	return &Handshake{
		Capabilities: map[string]bool{"multifd": false, "return-path": true, "xbzrle": false},
		Parameters:   map[string]string{"downtime-limit": "300", "multifd-channels": "2"},
		PageSize:     testPS,
		GuestID:      guestName,
		RAMBlocks:    map[string]uint64{"pc.ram": ramSize, romName: romSize},
		Extra:        map[string]string{"build": "test"},
	}
}

// pattern returns a page whose bytes depend on the block and offset.
func pattern(block string, off uint64) []byte {
	p := make([]byte, testPS)
	seed := byte(len(block)) ^ byte(off>>12)
	for i := range p {
		p[i] = seed + byte(i*7)
	}
	return p
}

// fataler is what must needs: *testing.T, *testing.B and *rapid.T have it.
type fataler interface {
	Helper()
	Fatal(args ...any)
}

// must fails the test on error.
func must(t fataler, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// raw builds byte streams by hand, including invalid ones.
type raw struct{ bytes.Buffer }

func (r *raw) u8(v byte) *raw     { r.WriteByte(v); return r }
func (r *raw) be16(v uint16) *raw { r.Write(binary.BigEndian.AppendUint16(nil, v)); return r }
func (r *raw) be32(v uint32) *raw { r.Write(binary.BigEndian.AppendUint32(nil, v)); return r }
func (r *raw) be64(v uint64) *raw { r.Write(binary.BigEndian.AppendUint64(nil, v)); return r }
func (r *raw) str(s string) *raw  { r.u8(byte(len(s))); r.WriteString(s); return r }
func (r *raw) bytes(b []byte) *raw {
	r.Write(b)
	return r
}
func (r *raw) header() *raw { return r.be32(Magic).be32(Version) }
func (r *raw) sectionHeader(typ byte, id uint32, idstr string, inst, ver uint32) *raw {
	return r.u8(typ).be32(id).str(idstr).be32(inst).be32(ver)
}
func (r *raw) footer(id uint32) *raw { return r.u8(SecFooter).be32(id) }

// ramStart writes a complete RAM SECTION_START with id 0 for blocks.
func (r *raw) ramStart(blocks ...Block) *raw {
	var total uint64
	for _, b := range blocks {
		total += b.Size
	}
	r.sectionHeader(SecStart, 0, "ram", 0, 4).be64(total | FlagMemSize)
	for _, b := range blocks {
		r.str(b.Name).be64(b.Size)
	}
	return r.be64(FlagEOS).footer(0)
}

// decodeAll reads every record, reading pages into a map keyed by block and
// offset, until io.EOF or an error.
func decodeAll(d *Decoder) ([]Record, map[string][]byte, error) {
	var recs []Record
	pages := map[string][]byte{}
	for {
		rec, err := d.Next()
		if err == io.EOF {
			return recs, pages, nil
		}
		if err != nil {
			return recs, pages, err
		}
		rec.Data = bytes.Clone(rec.Data)
		if rec.Kind == KindPage {
			p := make([]byte, d.PageSize())
			if err := d.ReadPage(p); err != nil {
				return recs, pages, err
			}
			pages[pageKey(rec.Block, rec.Offset)] = p
		}
		recs = append(recs, rec)
	}
}

func pageKey(block string, off uint64) string {
	return block + "@" + string(binary.BigEndian.AppendUint64(nil, off))
}

// decodeErr decodes b with lim and returns the first error (nil if none).
func decodeErr(b []byte, lim Limits) error {
	_, _, err := decodeAll(NewDecoder(bytes.NewReader(b), lim))
	return err
}

// wantDecodeError checks err's class, reason and (if off >= 0) offset.
func wantDecodeError(t *testing.T, err error, class, reason error, off int64, substr string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %v", class)
	}
	var de *DecodeError
	if !errors.As(err, &de) {
		t.Fatalf("error %v (%T) is not a *DecodeError", err, err)
	}
	if !errors.Is(err, class) {
		t.Errorf("error %q: class is %v, want %v", err, de.Class, class)
	}
	if reason != nil && !errors.Is(err, reason) {
		t.Errorf("error %q: reason is %v, want %v", err, de.Reason, reason)
	}
	if off >= 0 && de.Offset != off {
		t.Errorf("error %q: offset %d, want %d", err, de.Offset, off)
	}
	if substr != "" && !bytes.Contains([]byte(err.Error()), []byte(substr)) {
		t.Errorf("error %q does not contain %q", err, substr)
	}
}
