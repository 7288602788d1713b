package stream

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// mappedSample writes a small mapped-ram stream (two blocks, a device) to a
// file and returns its bytes.
func mappedSample(tb testing.TB) []byte {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "m.mig")
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	e := NewEncoder(f)
	must(tb, e.WriteHeader("g"))
	must(tb, e.WriteHandshake(&Handshake{PageSize: testPS, GuestID: "g"}))
	if _, err := e.StartRAMMapped(testPS, []Block{{"pc.ram", 64 * testPS}, {"vga", 8 * testPS}}, f, 32); err != nil {
		tb.Fatal(err)
	}
	must(tb, e.BeginRAMEnd())
	must(tb, e.CloseRAMSection())
	must(tb, e.WriteDevice("dev", 0, 1, []byte("state")))
	must(tb, e.Close())
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// The de-mapped stream of a mapped-ram file is an ordinary stream.
func TestMappedRAMStreamReader(t *testing.T) {
	b := mappedSample(t)
	x, err := ScanMappedRAM(bytes.NewReader(b), 0, int64(len(b)), Limits{PageSize: testPS}, 32)
	if err != nil {
		t.Fatal(err)
	}
	if len(x.Blocks) != 2 || x.Blocks[1].HeaderOffset != x.Blocks[0].Header.PagesOffset+64*testPS+1+3+8 {
		t.Fatalf("blocks %+v", x.Blocks)
	}
	d := NewDecoder(x.StreamReader(bytes.NewReader(b)), Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": 64 * testPS, "vga": 8 * testPS}, RequireHandshake: true})
	n := 0
	for {
		rec, err := d.Next()
		if err != nil {
			if err.Error() == "EOF" {
				break
			}
			t.Fatal(err)
		}
		n++
		if rec.Kind == KindDevice && string(rec.Data) != "state" {
			t.Fatalf("device %q", rec.Data)
		}
	}
	if n != 16 {
		t.Fatalf("%d records", n)
	}
	// A file shorter than its regions: the last block's pages lie beyond.
	if _, err := ScanMappedRAM(bytes.NewReader(b), 0, int64(x.Blocks[1].Header.PagesOffset), Limits{PageSize: testPS}, 32); !errors.Is(err, ErrPageOutside) {
		t.Fatalf("regions beyond the end: %v", err)
	}
	// Blocks unknown to the destination.
	if _, err := ScanMappedRAM(bytes.NewReader(b), 0, int64(len(b)), Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": 64 * testPS}}, 32); !errors.Is(err, ErrUnknownBlock) {
		t.Fatalf("unknown block: %v", err)
	}
}

// The fuzz inputs are files with their runs of zeros squeezed (a mapped-ram
// file is mostly holes): 0xff 0xfe be32 n stands for n zero bytes.
func squeeze(b []byte) []byte {
	var out []byte
	for i := 0; i < len(b); {
		j := i
		for j < len(b) && b[j] == 0 {
			j++
		}
		if j-i >= 16 {
			out = append(out, 0xff, 0xfe, byte((j-i)>>24), byte((j-i)>>16), byte((j-i)>>8), byte(j-i))
			i = j
			continue
		}
		out = append(out, b[i])
		i++
	}
	return out
}

func unsqueeze(b []byte, limit int) []byte {
	var out []byte
	for i := 0; i < len(b) && len(out) < limit; {
		if i+6 <= len(b) && b[i] == 0xff && b[i+1] == 0xfe {
			n := int(b[i+2])<<24 | int(b[i+3])<<16 | int(b[i+4])<<8 | int(b[i+5])
			out = append(out, make([]byte, min(n, limit-len(out)))...)
			i += 6
			continue
		}
		out = append(out, b[i])
		i++
	}
	return out
}

// FuzzScanMappedRAM: hostile files never panic, every error is classified,
// and every block the scan accepts lies inside the stream range, after its
// header, bitmap and reserve.
func FuzzScanMappedRAM(f *testing.F) {
	sample := mappedSample(f)
	if !bytes.Equal(unsqueeze(squeeze(sample), 8<<20), sample) {
		f.Fatal("squeeze does not round-trip")
	}
	f.Add(squeeze(sample))
	f.Fuzz(func(t *testing.T, packed []byte) {
		data := unsqueeze(packed, 8<<20)
		lim := Limits{PageSize: testPS, MaxBlocks: 8, MaxDevicePayload: 4096, MaxJSON: 4096}
		x, err := ScanMappedRAM(bytes.NewReader(data), 0, int64(len(data)), lim, 32)
		if err != nil {
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("unclassified %T: %v", err, err)
			}
			return
		}
		for _, b := range x.Blocks {
			h := b.Header
			if h.BitmapOffset != b.HeaderOffset+MappedRAMHeaderSize || h.PagesOffset < b.ReservedOffset+32 ||
				h.PagesOffset+b.Size > uint64(len(data)) || h.PagesOffset%testPS != 0 {
				t.Fatalf("accepted block %+v in %d bytes", b, len(data))
			}
		}
		for _, s := range x.Segments {
			if s.Offset < 0 || s.Length <= 0 || s.Offset+s.Length > int64(len(data)) {
				t.Fatalf("segment %+v of %d bytes", s, len(data))
			}
		}
	})
}
