package multifd

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/migctl/migctl/stream"
)

var fuzzBlocks = map[string]uint64{"pc.ram": 1 << 20, "vga.vram": 64 << 10}

// fuzzSeeds: channels written by the Writer in every compression and
// layout, after the initial packet, plus a 7.2 quirk packet.
func fuzzSeeds(tb testing.TB) [][]byte {
	var seeds [][]byte
	page := bytes.Repeat([]byte("seed"), testPS/4)
	for _, l := range []Layout{LayoutCurrent, LayoutQEMU72} {
		for _, c := range []Compression{CompressionNone, CompressionZlib, CompressionZstd} {
			var buf bytes.Buffer
			w, err := NewWriter(&buf, WriterOptions{Blocks: fuzzBlocks, Compression: c, Layout: l})
			if err != nil {
				tb.Fatal(err)
			}
			b := Batch{Block: "pc.ram", Normal: []uint64{0, 2 * testPS}, Pages: [][]byte{page, make([]byte, testPS)}}
			if l == LayoutCurrent {
				b.Zero = []uint64{testPS}
			}
			for _, err := range []error{w.Write(&b), w.WriteSync(1), w.Write(&Batch{Num: 2, Block: "vga.vram", Normal: []uint64{testPS}, Pages: [][]byte{page}})} {
				if err != nil {
					tb.Fatal(err)
				}
			}
			w.Close()
			seeds = append(seeds, append([]byte{byte(l), byte(c)}, buf.Bytes()...))
		}
	}
	return seeds
}

// FuzzReader decodes hostile channels in every layout and compression:
// no panic, every error classified, memory bounded by the limits, and
// every page it accepts lies inside its block.
func FuzzReader(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 2 {
			return
		}
		lim := Limits{Blocks: fuzzBlocks, Layout: Layout(data[0] % 2), Compression: Compression(data[1] % 3), MaxPayload: 64 << 10, MaxZstdWindow: 1 << 20}
		r, err := NewReader(bytes.NewReader(data[2:]), 0, lim)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		page := make([]byte, testPS)
		for i := 0; ; i++ {
			if i > len(data) {
				t.Fatalf("%d packets from %d bytes", i, len(data))
			}
			h, err := r.Next()
			if err == io.EOF {
				return
			}
			if err == nil && len(h.Normal) > 0 {
				for _, o := range append(append([]uint64{}, h.Normal...), h.Zero...) {
					if o%testPS != 0 || o+testPS > fuzzBlocks[h.Block] {
						t.Fatalf("accepted page %#x of %q", o, h.Block)
					}
				}
				err = r.ReadPages(func(int, uint64) []byte { return page })
			}
			if err != nil {
				var de *DecodeError
				if !errors.As(err, &de) {
					t.Fatalf("unclassified %T: %v", err, err)
				}
				n := 0
				for _, c := range []error{stream.ErrCorrupt, stream.ErrMismatch, stream.ErrTooLarge, stream.ErrUnsupported} {
					if errors.Is(err, c) {
						n++
					}
				}
				if n != 1 {
					t.Fatalf("%v: %d classes", err, n)
				}
				if cap(r.payload) > lim.MaxPayload {
					t.Fatalf("payload buffer %d > %d", cap(r.payload), lim.MaxPayload)
				}
				return
			}
		}
	})
}

func FuzzParseInit(f *testing.F) {
	b, _ := Init{Channel: 1}.MarshalBinary()
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := ReadInit(bytes.NewReader(data))
		if err != nil {
			if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
				t.Fatalf("unclassified: %v", err)
			}
			return
		}
		out, _ := in.MarshalBinary()
		if !bytes.Equal(out, data[:InitSize]) {
			t.Fatalf("accepted %x, re-encodes as %x", data[:InitSize], out)
		}
	})
}
