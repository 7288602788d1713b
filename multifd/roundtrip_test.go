package multifd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/stream"
)

const testPS = 4096

var testBlocks = map[string]uint64{"pc.ram": 4 << 20, "vga.vram": 256 << 10}

// pattern fills a page so that every page of every block differs and
// compresses somewhat (a counter and a block tag, then pseudo-random bytes).
func pattern(block string, off uint64, gen int) []byte {
	p := make([]byte, testPS)
	rng := rand.New(rand.NewPCG(off, uint64(len(block))*7919+uint64(gen)))
	for i := 0; i < testPS; i += 8 {
		v := off + uint64(i) + uint64(gen)<<40
		if i%64 >= 32 {
			v = rng.Uint64()
		}
		binary.LittleEndian.PutUint64(p[i:], v)
	}
	copy(p, block)
	return p
}

// batches builds a sequence of packets: pass 1 sends pc.ram's first 300
// pages in 128-page packets (some pages zero under the current layout), a
// vga.vram packet, a sync; pass 2 re-sends some pages with new contents.
type sent struct {
	batches []Batch
	syncs   []int // index in batches before which a sync packet goes
	want    map[string][]byte
}

func buildBatches(layout Layout, zeroEntries bool) *sent {
	s := &sent{want: map[string][]byte{}}
	for name, size := range testBlocks {
		s.want[name] = make([]byte, size)
	}
	num := uint64(0)
	add := func(block string, offs []uint64, gen int) {
		b := Batch{Num: num, Block: block}
		num++
		for _, o := range offs {
			p := pattern(block, o, gen)
			if zeroEntries && layout == LayoutCurrent && o%(7*testPS) == 0 {
				b.Zero = append(b.Zero, o)
				clear(s.want[block][o : o+testPS])
				continue
			}
			b.Normal = append(b.Normal, o)
			b.Pages = append(b.Pages, p)
			copy(s.want[block][o:], p)
		}
		s.batches = append(s.batches, b)
	}
	var offs []uint64
	for i := range 300 {
		offs = append(offs, uint64(i)*testPS)
		if len(offs) == 128 {
			add("pc.ram", offs, 1)
			offs = nil
		}
	}
	add("pc.ram", offs, 1)
	add("vga.vram", []uint64{0, 5 * testPS, 63 * testPS}, 1)
	s.syncs = append(s.syncs, len(s.batches))
	add("pc.ram", []uint64{7 * testPS, 200 * testPS, 3 * testPS}, 2) // unsorted, as QEMU's zero partition leaves them
	s.syncs = append(s.syncs, len(s.batches))
	return s
}

func writeAll(t testing.TB, w io.Writer, o WriterOptions, s *sent, ch uint8) WriterStats {
	t.Helper()
	mw, err := NewWriter(w, o)
	if err != nil {
		t.Fatal(err)
	}
	defer mw.Close()
	if err := mw.WriteInit(Init{Channel: ch}); err != nil {
		t.Fatal(err)
	}
	num := uint64(1000)
	for i := range s.batches {
		for _, si := range s.syncs {
			if si == i {
				if err := mw.WriteSync(num); err != nil {
					t.Fatal(err)
				}
				num++
			}
		}
		if err := mw.Write(&s.batches[i]); err != nil {
			t.Fatal(err)
		}
	}
	if s.syncs[len(s.syncs)-1] == len(s.batches) {
		if err := mw.WriteSync(num); err != nil {
			t.Fatal(err)
		}
	}
	return mw.Stats()
}

// readAll decodes a channel into fresh block memory and returns it with the
// number of sync packets seen.
func readAll(t testing.TB, r io.Reader, lim Limits) (map[string][]byte, ReaderStats) {
	t.Helper()
	in, err := ReadInit(r)
	if err != nil {
		t.Fatal(err)
	}
	_ = in
	mem := map[string][]byte{}
	for name, size := range lim.Blocks {
		mem[name] = bytes.Repeat([]byte{0xee}, int(size)) // not zero: zero entries must clear
	}
	rd, err := NewReader(r, int(in.Channel), lim)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	for {
		h, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		m := mem[h.Block]
		for _, z := range h.Zero {
			clear(m[z : z+testPS])
		}
		if len(h.Normal) > 0 {
			if err := rd.ReadPages(func(_ int, off uint64) []byte { return m[off : off+testPS] }); err != nil {
				t.Fatal(err)
			}
		}
	}
	return mem, rd.Stats()
}

func TestRoundTrip(t *testing.T) {
	for _, layout := range []Layout{LayoutCurrent, LayoutQEMU72} {
		for _, c := range []Compression{CompressionNone, CompressionZlib, CompressionZstd} {
			// Every level range end once; the 7.2 layout at QEMU's default.
			levels := map[Compression][]int{CompressionNone: {0}, CompressionZlib: {0, 9}, CompressionZstd: {1, 20}}[c]
			if layout == LayoutQEMU72 && c != CompressionNone {
				levels = []int{DefaultLevel}
			}
			for _, level := range levels {
				t.Run(fmt.Sprintf("%v/%v/level%d", layout, c, level), func(t *testing.T) {
					s := buildBatches(layout, true)
					var buf bytes.Buffer
					ws := writeAll(t, &buf, WriterOptions{Blocks: testBlocks, Compression: c, Level: level, Layout: layout}, s, 2)
					mem, rs := readAll(t, &buf, Limits{Blocks: testBlocks, Compression: c, Layout: layout})
					for name := range testBlocks {
						want := s.want[name]
						got := mem[name]
						// Pages never sent stay 0xee.
						for o := 0; o < len(want); o += testPS {
							sentPage := false
							for _, b := range s.batches {
								if b.Block != name {
									continue
								}
								for _, x := range append(append([]uint64{}, b.Normal...), b.Zero...) {
									sentPage = sentPage || x == uint64(o)
								}
							}
							if !sentPage {
								continue
							}
							if !bytes.Equal(got[o:o+testPS], want[o:o+testPS]) {
								t.Fatalf("%s page %#x differs", name, o)
							}
						}
					}
					if rs.Syncs != 2 || rs.Packets != ws.Packets || rs.Pages != ws.Pages || rs.ZeroPages != ws.ZeroPages {
						t.Fatalf("reader %+v, writer %+v", rs, ws)
					}
					if c != CompressionNone && !(c == CompressionZlib && level == 0) && ws.Payload >= ws.Pages*testPS { // zlib level 0 only stores
						t.Fatalf("%v payload %d bytes for %d pages: not compressed", c, ws.Payload, ws.Pages)
					}
					if layout == LayoutQEMU72 && ws.ZeroPages != 0 {
						t.Fatalf("7.2 layout sent zero entries")
					}
				})
			}
		}
	}
}

// Over real loopback TCP, four channels in parallel, each with its own
// compressor, through the sync barrier: the destination's main goroutine
// plays the FLUSH record.
func TestChannelsOverTCP(t *testing.T) {
	const channels = 4
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := buildBatches(LayoutCurrent, true)
	o := WriterOptions{Blocks: testBlocks, Compression: CompressionZstd}
	var wg sync.WaitGroup
	errs := make(chan error, 2*channels)
	for ch := range channels {
		wg.Go(func() {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			mw, err := NewWriter(c, o)
			if err != nil {
				errs <- err
				return
			}
			defer mw.Close()
			if err := mw.WriteInit(Init{Channel: uint8(ch)}); err != nil {
				errs <- err
				return
			}
			// Each pass: this channel's share of the batches, then its sync
			// packet (the source side of the barrier).
			prev := 0
			for pass, end := range s.syncs {
				for i := prev; i < end; i++ {
					if i%channels == ch {
						if err := mw.Write(&s.batches[i]); err != nil {
							errs <- err
							return
						}
					}
				}
				prev = end
				if err := mw.WriteSync(uint64(9000 + 10*pass + ch)); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		})
	}
	barrier := NewRecvSync(channels)
	var mu sync.Mutex
	mem := map[string][]byte{}
	for name, size := range testBlocks {
		mem[name] = make([]byte, size)
	}
	for range channels {
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		wg.Go(func() {
			in, err := ReadInit(c)
			if err == nil {
				err = in.Check([16]byte{}, channels)
			}
			if err != nil {
				errs <- err
				return
			}
			rd, err := NewReader(c, int(in.Channel), Limits{Blocks: testBlocks, Compression: CompressionZstd})
			if err != nil {
				errs <- err
				return
			}
			defer rd.Close()
			for {
				h, err := rd.Next()
				if err == io.EOF {
					errs <- nil
					return
				}
				if err != nil {
					errs <- err
					return
				}
				if len(h.Normal) > 0 {
					mu.Lock() // pages of different channels never overlap here; the lock keeps the map read race-free
					m := mem[h.Block]
					mu.Unlock()
					if err := rd.ReadPages(func(_ int, off uint64) []byte { return m[off : off+testPS] }); err != nil {
						errs <- err
						return
					}
				}
				if h.Sync() {
					if err := barrier.Arrive(ctx, int(in.Channel)); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	// The main stream's FLUSH record after each pass.
	for range s.syncs {
		if err := barrier.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// Pass 2's pages (written last) won.
	for _, b := range s.batches[len(s.batches)-1:] {
		for i, o := range b.Normal {
			if !bytes.Equal(mem[b.Block][o:o+testPS], b.Pages[i]) {
				t.Fatalf("page %#x", o)
			}
		}
	}
}

// Every check of the decoder, each with a header that differs from a valid
// one in one field.
func TestReaderRejects(t *testing.T) {
	valid := func(flags uint32) []byte {
		return golden(t, 1344, map[int]string{
			0:   "11223344 00000001",
			8:   fmt.Sprintf("%08x", flags),
			12:  "00000080 00000001 00001000 0000000000000001 00000001",
			64:  hex.EncodeToString([]byte("pc.ram")),
			320: "0000000000002000 0000000000003000",
		})
	}
	page := bytes.Repeat([]byte{1}, testPS)
	type tc struct {
		name   string
		data   []byte
		lim    Limits
		class  error
		reason error
	}
	set := func(b []byte, off int, h string) []byte {
		b = bytes.Clone(b)
		v, _ := hex.DecodeString(h)
		copy(b[off:], v)
		return b
	}
	lim := Limits{Blocks: map[string]uint64{"pc.ram": 1 << 20}}
	base := append(valid(0), page...)
	cases := []tc{
		{"bad magic", set(base, 0, "11223345"), lim, stream.ErrCorrupt, nil},
		{"version 2", set(base, 4, "00000002"), lim, stream.ErrUnsupported, nil},
		{"device state", set(base, 8, "00000040"), lim, stream.ErrUnsupported, nil},
		{"unknown flag", set(base, 8, "00000080"), lim, stream.ErrCorrupt, nil},
		{"zlib packet, none here", set(base, 8, "00000002"), lim, stream.ErrMismatch, ErrCompression},
		{"qpl packet", set(base, 8, "00000008"), lim, stream.ErrMismatch, ErrCompression},
		{"capacity 129", set(base, 12, "00000081"), lim, stream.ErrTooLarge, nil},
		{"normal > capacity", set(set(base, 12, "00000001"), 16, "00000002"), lim, stream.ErrCorrupt, nil},
		{"zero > capacity-normal", set(base, 32, "00000080"), lim, stream.ErrCorrupt, nil},
		{"size != pages", set(base, 20, "00001001"), lim, stream.ErrCorrupt, nil},
		{"no block name", set(base, 64, "00"), lim, stream.ErrCorrupt, nil},
		{"unknown block", set(base, 64, "71"), lim, stream.ErrMismatch, stream.ErrUnknownBlock},
		{"unaligned offset", set(base, 320, "0000000000002001"), lim, stream.ErrCorrupt, stream.ErrUnaligned},
		{"offset at the block end", set(base, 320, "0000000000100000"), lim, stream.ErrCorrupt, stream.ErrPageOutside},
		{"zero offset outside", set(base, 328, "ffffffffffff0000"), lim, stream.ErrCorrupt, stream.ErrPageOutside},
		{"truncated header", base[:700], lim, stream.ErrCorrupt, io.ErrUnexpectedEOF},
		{"truncated page", base[:1344+100], lim, stream.ErrCorrupt, io.ErrUnexpectedEOF},
	}
	zl := Limits{Blocks: lim.Blocks, Compression: CompressionZlib}
	zbase := set(set(valid(FlagZlib), 20, "00000010"), 0, "11223344")
	cases = append(cases,
		tc{"compressed payload over the limit", set(zbase, 20, "00100001"), zl, stream.ErrTooLarge, nil},
		tc{"empty compressed payload", set(zbase, 20, "00000000"), zl, stream.ErrCorrupt, nil},
		tc{"garbage zlib payload", append(zbase, bytes.Repeat([]byte{0xff}, 16)...), zl, stream.ErrCorrupt, nil},
	)
	// A zstd packet that carries 32 bytes more than its page needs: more
	// than a flush's tail.
	var one bytes.Buffer
	w, _ := NewWriter(&one, WriterOptions{Blocks: lim.Blocks, Compression: CompressionZstd})
	_ = w.Write(&Batch{Block: "pc.ram", Normal: []uint64{0}, Pages: [][]byte{page}})
	w.Close()
	extra := append(bytes.Clone(one.Bytes()), make([]byte, 32)...)
	binary.BigEndian.PutUint32(extra[20:], binary.BigEndian.Uint32(extra[20:])+32)
	cases = append(cases, tc{"zstd payload with 32 bytes to spare", extra, Limits{Blocks: lim.Blocks, Compression: CompressionZstd}, stream.ErrCorrupt, nil})

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := newTestReader(t, c.data, c.lim)
			var err error
			for err == nil {
				var h *Header
				h, err = r.Next()
				if err == nil && len(h.Normal) > 0 {
					err = r.SkipPages()
				}
			}
			if !errors.Is(err, c.class) || (c.reason != nil && !errors.Is(err, c.reason)) {
				t.Fatalf("got %v, want class %v reason %v", err, c.class, c.reason)
			}
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("%T is not a *DecodeError", err)
			}
			t.Log(err)
		})
	}
	// And the valid base decodes, so each case above fails for its field.
	r := newTestReader(t, base, lim)
	h, err := r.Next()
	if err != nil || len(h.Normal) != 1 || len(h.Zero) != 1 {
		t.Fatalf("valid base: %+v %v", h, err)
	}
	if err := r.SkipPages(); err != nil {
		t.Fatal(err)
	}
}

func TestWriterRejects(t *testing.T) {
	page := make([]byte, testPS)
	for _, c := range []struct {
		name string
		o    WriterOptions
		b    Batch
	}{
		{"empty", WriterOptions{}, Batch{Block: "pc.ram"}},
		{"unknown block", WriterOptions{}, Batch{Block: "x", Normal: []uint64{0}, Pages: [][]byte{page}}},
		{"outside", WriterOptions{}, Batch{Block: "vga.vram", Normal: []uint64{256 << 10}, Pages: [][]byte{page}}},
		{"unaligned", WriterOptions{}, Batch{Block: "pc.ram", Zero: []uint64{1}}},
		{"pages mismatch", WriterOptions{}, Batch{Block: "pc.ram", Normal: []uint64{0}}},
		{"short page", WriterOptions{}, Batch{Block: "pc.ram", Normal: []uint64{0}, Pages: [][]byte{page[:100]}}},
		{"too many", WriterOptions{}, Batch{Block: "pc.ram", Zero: make([]uint64, 129)}},
		{"7.2 zero entry", WriterOptions{Layout: LayoutQEMU72}, Batch{Block: "pc.ram", Zero: []uint64{0}}},
	} {
		var buf bytes.Buffer
		c.o.Blocks = testBlocks
		w, err := NewWriter(&buf, c.o)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Write(&c.b); !errors.Is(err, ErrInvalid) || buf.Len() != 0 {
			t.Errorf("%s: %v, %d bytes written", c.name, err, buf.Len())
		}
		w.Close()
	}
	if _, err := NewWriter(io.Discard, WriterOptions{Compression: CompressionZlib, Level: 10}); !errors.Is(err, ErrInvalid) {
		t.Errorf("zlib level 10: %v", err)
	}
	if _, err := NewWriter(io.Discard, WriterOptions{Compression: CompressionZstd, Level: 21}); !errors.Is(err, ErrInvalid) {
		t.Errorf("zstd level 21: %v", err)
	}
}
