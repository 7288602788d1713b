package mappedram

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/stream"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const ps = 4096

// guestMem is page-aligned memory, as guest RAM is (mmap).
func guestMem(t testing.TB, size int, fill byte) []byte {
	t.Helper()
	m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Munmap(m) })
	if fill != 0 {
		for i := range m {
			m[i] = fill
		}
	}
	return m
}

// patternPage writes a page that names its block, offset and generation;
// every 5th page of generation 1 is zero.
func patternPage(p []byte, block string, off uint64, gen int) {
	if gen == 1 && (off/ps)%5 == 0 {
		clear(p)
		return
	}
	for i := 0; i < len(p); i += 16 {
		binary.LittleEndian.PutUint64(p[i:], off+uint64(i))
		binary.LittleEndian.PutUint64(p[i+8:], uint64(gen)<<56|uint64(len(block)))
	}
	copy(p, fmt.Sprintf("%s@%#x gen %d", block, off, gen))
}

type guest struct {
	blocks []stream.Block
	mem    map[string][]byte
}

func newGuest(t testing.TB, sizes ...uint64) *guest {
	g := &guest{mem: map[string][]byte{}}
	names := []string{"pc.ram", "vga.vram", "/rom@etc/acpi/tables"}
	for i, sz := range sizes {
		g.blocks = append(g.blocks, stream.Block{Name: names[i], Size: sz})
		m := guestMem(t, int(sz), 0)
		for off := uint64(0); off < sz; off += ps {
			patternPage(m[off:off+ps], names[i], off, 1)
		}
		g.mem[names[i]] = m
	}
	return g
}

type saveOpts struct {
	Options
	skipComplete bool
	skipFinish   bool
	unaligned    bool // hand the Saver copies at odd addresses
	device       []byte
	writeOnly    bool // open the file O_WRONLY, as the file: transport does
}

// save writes a live mapped-ram save of g: pass 1 every page, then pass 2
// re-dirties some pages (one of them becomes zero, one zero page becomes
// data), each pass ending with Sync, then the END section, the bitmaps,
// a device, EOF and the completion marker.
func save(t testing.TB, path string, g *guest, o saveOpts) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	mode := os.O_RDWR
	if o.writeOnly {
		mode = os.O_WRONLY
	}
	f, err := os.OpenFile(path, mode|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	enc := stream.NewEncoder(f)
	must(t, enc.WriteHeader("migctl-test-guest"))
	hs := &stream.Handshake{PageSize: ps, GuestID: "g", Capabilities: map[string]bool{"mapped-ram": true}}
	must(t, enc.WriteHandshake(hs))
	layout, err := enc.StartRAMMapped(ps, g.blocks, f, RecordSize)
	must(t, err)
	sv, err := NewSaver(f, layout, o.Options)
	must(t, err)
	defer sv.Close()
	pass := func(dirty func(block string, off uint64) bool) {
		for _, b := range g.blocks {
			m := g.mem[b.Name]
			var offs []uint64
			var pages [][]byte
			flush := func() {
				if len(offs) > 0 {
					must(t, sv.Submit(ctx, b.Name, offs, pages))
				}
				offs, pages = nil, nil
			}
			for off := uint64(0); off < b.Size; off += ps {
				if !dirty(b.Name, off) {
					continue
				}
				p := m[off : off+ps]
				if isZero(p) && !o.DetectZero {
					must(t, sv.MarkZero(b.Name, []uint64{off}))
					continue
				}
				if o.unaligned {
					c := make([]byte, ps+1)[1:]
					copy(c, p)
					p = c
				}
				offs = append(offs, off)
				pages = append(pages, p)
				if len(offs) == 128 {
					flush()
				}
			}
			flush()
		}
		must(t, sv.Sync(ctx))
	}
	pass(func(string, uint64) bool { return true })
	// Pass 2: the guest wrote pages 1, 2 (now data again), 5 (was zero, now
	// data) and made page 3 zero.
	m := g.mem[g.blocks[0].Name]
	for _, p := range []uint64{1, 2, 5} {
		patternPage(m[p*ps:(p+1)*ps], g.blocks[0].Name, p*ps, 2)
	}
	clear(m[3*ps : 4*ps])
	pass(func(block string, off uint64) bool {
		return block == g.blocks[0].Name && (off == ps || off == 2*ps || off == 3*ps || off == 5*ps)
	})
	must(t, enc.BeginRAMEnd())
	must(t, enc.CloseRAMSection())
	if !o.skipFinish {
		must(t, sv.Finish(ctx))
	}
	dev := o.device
	if dev == nil {
		dev = []byte("device state of the test guest")
	}
	must(t, enc.WriteDevice("timer", 0, 1, dev))
	must(t, enc.Close())
	if !o.skipComplete {
		must(t, sv.Complete(0))
	}
	if saveStats != nil {
		saveStats(sv.Stats())
	}
	must(t, sv.Close())
}

// saveStats, when set, receives the Saver's counts at the end of save.
var saveStats func(SaverStats)

func isZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// restore opens path and loads it into fresh memory filled with fill; it
// returns the memory whatever happens, and the error.
func restore(t testing.TB, path string, g *guest, o Options, fill byte) (map[string][]byte, *Restore, error) {
	t.Helper()
	mem := map[string][]byte{}
	for _, b := range g.blocks {
		mem[b.Name] = guestMem(t, int(b.Size), fill)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	r, err := Open(f, 0, o)
	if err != nil {
		return mem, nil, err
	}
	t.Cleanup(func() { r.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return mem, r, r.Load(ctx, func(name string) []byte { return mem[name] })
}

func TestRoundTrip(t *testing.T) {
	for _, c := range []struct {
		name string
		o    saveOpts
		size uint64
	}{
		{"one channel", saveOpts{}, 8 << 20},
		{"four channels", saveOpts{Options: Options{Channels: 4}}, 16 << 20},
		{"64 MiB, two channels", saveOpts{Options: Options{Channels: 2}}, 64 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := newGuest(t, c.size, 256<<10)
			path := filepath.Join(t.TempDir(), "vm.mig")
			save(t, path, g, c.o)
			mem, r, err := restore(t, path, g, c.o.Options, 0)
			must(t, err)
			for _, b := range g.blocks {
				if !bytes.Equal(mem[b.Name], g.mem[b.Name]) {
					t.Fatalf("block %s differs after restore", b.Name)
				}
			}
			// Zero pages are absent from the bitmap, present ones counted:
			// pass 1 leaves every 5th page zero; pass 2 fills page 5 and
			// zeroes page 3.
			want := int(c.size/ps) - int((c.size/ps+4)/5) + 1 - 1
			if got := r.Blocks()[0].Present; got != want {
				t.Fatalf("%d pages present in pc.ram, want %d", got, want)
			}
			// The page area is rewritten in place: the file holds each
			// block once, plus headers, bitmaps and the stream.
			st, _ := os.Stat(path)
			var total int64
			for _, b := range g.blocks {
				total += int64(b.Size) + stream.MappedRAMAlignment
			}
			if st.Size() > total+stream.MappedRAMAlignment {
				t.Fatalf("file of %d bytes for %d bytes of blocks", st.Size(), total)
			}
			checkStream(t, r, g)
		})
	}
}

// checkStream decodes the de-mapped main stream with the ordinary Decoder.
func checkStream(t *testing.T, r *Restore, g *guest) {
	t.Helper()
	lim := stream.Limits{PageSize: ps, Blocks: map[string]uint64{}, RequireHandshake: true}
	for _, b := range g.blocks {
		lim.Blocks[b.Name] = b.Size
	}
	d := stream.NewDecoder(r.Stream(), lim)
	var kinds []string
	for {
		rec, err := d.Next()
		if err == io.EOF {
			break
		}
		must(t, err)
		kinds = append(kinds, rec.Kind.String())
		if rec.Kind == stream.KindDevice && string(rec.Data) != "device state of the test guest" {
			t.Fatalf("device payload %q", rec.Data)
		}
		if rec.Kind == stream.KindMemSize && len(rec.Blocks) != len(g.blocks) {
			t.Fatalf("MEM_SIZE %v", rec.Blocks)
		}
	}
	want := "config section-full handshake footer section-start mem-size eos footer section-end eos footer section-full device footer eof vmdesc"
	if got := strings.Join(kinds, " "); got != want {
		t.Fatalf("stream records:\n got %s\nwant %s", got, want)
	}
}

// The layout of a one-block file, computed by hand from qemu-wire.md §4 and
// docs/mapped-ram.md:
//
//	0    "QEVM" 00000003                      8 bytes
//	8    07 00000005 "guest"                  10 bytes -> 18
//	18   01 00000000 03 "ram" 00000000 00000004   17 bytes -> 35
//	35   be64 0x800000|0x04                   8 -> 43
//	43   06 "pc.ram" be64 0x800000            15 -> 58
//	58   MappedRAMHeader                      28 -> 86
//	86   bitmap: 2048 pages -> 32 words       256 -> 342
//	342  integrity record                     32 -> 374
//	0x100000 pages_offset (374 rounded up to 1 MiB); the stream resumes at
//	0x900000 with EOS and the footer.
func TestLayoutGolden(t *testing.T) {
	path := filepath.Join(t.TempDir(), "one.mig")
	f, err := os.Create(path)
	must(t, err)
	defer f.Close()
	enc := stream.NewEncoder(f)
	must(t, enc.WriteHeader("guest"))
	layout, err := enc.StartRAMMapped(ps, []stream.Block{{Name: "pc.ram", Size: 8 << 20}}, f, RecordSize)
	must(t, err)
	must(t, enc.Close())
	want := stream.MappedRAMBlock{Name: "pc.ram", Size: 8 << 20, HeaderOffset: 58, ReservedOffset: 342,
		Header: stream.MappedRAMHeader{Version: 1, PageSize: 4096, BitmapOffset: 86, PagesOffset: 0x100000}}
	if len(layout) != 1 || layout[0] != want {
		t.Fatalf("layout %+v\nwant %+v", layout, want)
	}
	b, err := os.ReadFile(path)
	must(t, err)
	hdr, _ := hex.DecodeString("00000001" + "0000000000001000" + "0000000000000056" + "0000000000100000")
	if !bytes.Equal(b[58:86], hdr) {
		t.Fatalf("header bytes %x, want %x", b[58:86], hdr)
	}
	if !bytes.Equal(b[43:58], append([]byte("\x06pc.ram"), 0, 0, 0, 0, 0, 0x80, 0, 0)) {
		t.Fatalf("block entry %x", b[43:58])
	}
	eos, _ := hex.DecodeString("0000000000000010" + "7e00000000" + "00")
	if !bytes.Equal(b[0x900000:0x900000+len(eos)], eos) {
		t.Fatalf("after the page region: %x", b[0x900000:0x900000+16])
	}
	// QEMU's layout without migctl's reserve: pages at 1 MiB all the same
	// here, the record gap is what differs when a bitmap ends near 1 MiB.
	x, err := stream.ScanMappedRAM(f, 0, int64(len(b)), stream.Limits{}, RecordSize)
	must(t, err)
	if x.Blocks[0] != want || len(x.Segments) != 3 || !x.Segments[1].Header || x.Segments[1].Offset != 58 || x.Segments[2].Offset != 0x900000 {
		t.Fatalf("scan %+v", x)
	}
}

// Every corruption fails Open, before Load could write a page: the target
// memory keeps its fill.
func TestCorruptionRefusedBeforeAnyPage(t *testing.T) {
	g := newGuest(t, 4<<20, 64<<10)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.mig")
	save(t, good, g, saveOpts{})
	data, err := os.ReadFile(good)
	must(t, err)
	f, _ := os.Open(good)
	x, err := stream.ScanMappedRAM(f, 0, int64(len(data)-TrailerSize), stream.Limits{}, RecordSize)
	f.Close()
	must(t, err)
	b0 := x.Blocks[0]
	end := len(data) - TrailerSize
	flip := func(off int) func([]byte) []byte {
		return func(b []byte) []byte { b[off] ^= 0x01; return b }
	}
	type tc struct {
		name   string
		mutate func([]byte) []byte
		class  error
		reason error
	}
	cases := []tc{
		{"header version byte", flip(int(b0.HeaderOffset) + 3), nil, nil}, // structure or checksum: any refusal
		{"header pages_offset low byte", flip(int(b0.HeaderOffset) + 27), stream.ErrCorrupt, nil},
		{"header page_size", flip(int(b0.HeaderOffset) + 10), stream.ErrMismatch, nil},
		{"bitmap first byte", flip(int(b0.Header.BitmapOffset)), stream.ErrCorrupt, ErrChecksum},
		{"bitmap last byte", flip(int(b0.ReservedOffset) - 1), stream.ErrCorrupt, ErrChecksum},
		{"second block's bitmap", flip(int(x.Blocks[1].Header.BitmapOffset) + 1), stream.ErrCorrupt, ErrChecksum},
		{"bitmap bits swapped (same population)", func(b []byte) []byte {
			// Page 0 is zero (absent), page 1 present: swap them.
			b[b0.Header.BitmapOffset] ^= 0x03
			return b
		}, stream.ErrCorrupt, ErrChecksum},
		{"integrity record crc", flip(int(b0.ReservedOffset) + 9), stream.ErrCorrupt, ErrChecksum},
		{"integrity record magic", flip(int(b0.ReservedOffset)), ErrIncomplete, nil},
		{"integrity record size", flip(int(b0.ReservedOffset) + 20), stream.ErrCorrupt, ErrChecksum},
		{"device state byte", func(b []byte) []byte {
			i := bytes.LastIndex(b[:end], []byte("device state of the test guest"))
			b[i] ^= 1
			return b
		}, stream.ErrCorrupt, ErrChecksum},
		{"machine name byte", flip(14), stream.ErrCorrupt, ErrChecksum},
		{"machine name length", flip(12), stream.ErrCorrupt, nil},
		{"completion marker crc", flip(end + 61), stream.ErrCorrupt, ErrChecksum},
		{"completion marker records crc", flip(end + 33), stream.ErrCorrupt, ErrChecksum},
		{"missing completion marker", func(b []byte) []byte { return b[:end] }, ErrIncomplete, nil},
		{"completion marker zeroed", func(b []byte) []byte { clear(b[end:]); return b }, ErrIncomplete, nil},
		{"truncated in the page area", func(b []byte) []byte { return b[:int(b0.Header.PagesOffset)+100*ps] }, ErrIncomplete, nil},
		{"truncated by one byte", func(b []byte) []byte { return b[:len(b)-1] }, ErrIncomplete, nil},
		{"empty file", func(b []byte) []byte { return b[:0] }, ErrIncomplete, nil},
		{"header pages_offset bit 16", flip(int(b0.HeaderOffset) + 25), nil, nil},
		{"record with a wrong header CRC (resealed)", func(b []byte) []byte {
			reseal(t, b, x)
			rec := b[b0.ReservedOffset : b0.ReservedOffset+RecordSize]
			rec[8] ^= 0x80
			binary.BigEndian.PutUint32(rec[28:], crc(rec[:28]))
			resealTrailer(t, b, x)
			return b
		}, stream.ErrCorrupt, ErrChecksum},
		{"record with a wrong block size (resealed)", func(b []byte) []byte {
			rec := b[b0.ReservedOffset : b0.ReservedOffset+RecordSize]
			rec[21] ^= 0x01
			binary.BigEndian.PutUint32(rec[28:], crc(rec[:28]))
			resealTrailer(t, b, x)
			return b
		}, stream.ErrCorrupt, nil},
		{"page beyond the block (bitmap padding bit, resealed)", func(b []byte) []byte {
			// 64 KiB block: 16 pages in one 64-bit word; set bit 20.
			b1 := x.Blocks[1]
			b[b1.Header.BitmapOffset+2] |= 0x10
			reseal(t, b, x)
			return b
		}, stream.ErrCorrupt, stream.ErrPageOutside},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_")+".mig")
			must(t, os.WriteFile(path, c.mutate(bytes.Clone(data)), 0o600))
			mem, _, err := restore(t, path, g, Options{}, 0x5a)
			if err == nil {
				t.Fatal("corrupt file loaded")
			}
			if c.class != nil && (!errors.Is(err, c.class) || (c.reason != nil && !errors.Is(err, c.reason))) {
				t.Fatalf("got %v, want class %v reason %v", err, c.class, c.reason)
			}
			for name, m := range mem {
				for i, v := range m {
					if v != 0x5a {
						t.Fatalf("target block %s byte %#x written (%#x) although the file was refused", name, i, v)
					}
				}
			}
			t.Log(err)
		})
	}
	// The unmodified file loads: every case above fails for its change.
	if _, _, err := restore(t, good, g, Options{}, 0x5a); err != nil {
		t.Fatal(err)
	}
}

// reseal recomputes the integrity records and the completion marker of a
// file image, as a forger would: checks other than the CRCs must still hold.
func reseal(t *testing.T, b []byte, x *stream.MappedRAMIndex) {
	var records []byte
	for _, mb := range x.Blocks {
		bm := b[mb.Header.BitmapOffset:mb.ReservedOffset]
		present := 0
		for _, c := range bm {
			for ; c != 0; c &= c - 1 {
				present++
			}
		}
		hb, _ := mb.Header.AppendBinary(nil)
		rec, _ := Record{HeaderCRC: crc(hb), BitmapCRC: crc(bm), Size: mb.Size, Present: uint32(present)}.AppendBinary(nil)
		copy(b[mb.ReservedOffset:], rec)
		records = append(records, rec...)
	}
	_ = records
	resealTrailer(t, b, x)
}

// resealTrailer recomputes the completion marker over the records as they
// stand in b.
func resealTrailer(t *testing.T, b []byte, x *stream.MappedRAMIndex) {
	end := len(b) - TrailerSize
	var records []byte
	for _, mb := range x.Blocks {
		records = append(records, b[mb.ReservedOffset:mb.ReservedOffset+RecordSize]...)
	}
	sum, err := streamChecksum(bytes.NewReader(b), x)
	must(t, err)
	tr, _ := Trailer{Blocks: uint32(len(x.Blocks)), StreamEnd: uint64(end), RecordsCRC: crc(records), StreamCRC: sum}.AppendBinary(nil)
	copy(b[end:], tr)
}

// A save interrupted before its bitmaps or its marker is refused, never
// loaded as zero pages.
func TestIncompleteSaves(t *testing.T) {
	g := newGuest(t, 1<<20)
	for _, c := range []struct {
		name string
		o    saveOpts
	}{
		{"no completion marker", saveOpts{skipComplete: true}},
		{"no bitmaps, no marker", saveOpts{skipComplete: true, skipFinish: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vm.mig")
			save(t, path, g, c.o)
			mem, _, err := restore(t, path, g, Options{}, 0x5a)
			if !errors.Is(err, ErrIncomplete) {
				t.Fatalf("got %v, want ErrIncomplete", err)
			}
			if !bytes.Equal(mem["pc.ram"], bytes.Repeat([]byte{0x5a}, 1<<20)) {
				t.Fatal("memory written")
			}
		})
	}
}

// WritePages from many goroutines at once, each page written twice (two
// generations, the second after a Sync), against one file: the last
// generation wins everywhere.
func TestParallelWriters(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "par.mig")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	must(t, err)
	defer f.Close()
	enc := stream.NewEncoder(f)
	must(t, enc.WriteHeader("par"))
	blocks := []stream.Block{{Name: "pc.ram", Size: size}}
	layout, err := enc.StartRAMMapped(ps, blocks, f, RecordSize)
	must(t, err)
	sv, err := NewSaver(f, layout, Options{Channels: 3})
	must(t, err)
	defer sv.Close()
	src := guestMem(t, size, 0)
	ctx := context.Background()
	for gen := 1; gen <= 2; gen++ {
		for off := uint64(0); off < size; off += ps {
			patternPage(src[off:off+ps], "pc.ram", off, gen+2) // gen+2: no zero pages
		}
		var wg sync.WaitGroup
		const writers = 8
		for w := range writers {
			wg.Go(func() {
				// Writer w takes pages w, w+8, ...: interleaved, never adjacent.
				for p := uint64(w); p < size/ps; p += writers {
					if err := sv.WritePages("pc.ram", []uint64{p * ps}, [][]byte{src[p*ps : (p+1)*ps]}); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		must(t, sv.Sync(ctx))
	}
	must(t, enc.BeginRAMEnd())
	must(t, enc.CloseRAMSection())
	must(t, sv.Finish(ctx))
	must(t, enc.Close())
	must(t, sv.Complete(0))
	g := &guest{blocks: blocks, mem: map[string][]byte{"pc.ram": src}}
	mem, r, err := restore(t, path, g, Options{Channels: 4}, 0)
	must(t, err)
	if !bytes.Equal(mem["pc.ram"], src) {
		t.Fatal("restored memory differs")
	}
	if r.Blocks()[0].Present != size/ps {
		t.Fatalf("%d pages present", r.Blocks()[0].Present)
	}
}

// direct-io: pages written and read with O_DIRECT, from page-aligned guest
// memory and from unaligned copies (bounced through aligned buffers).
func TestDirectIO(t *testing.T) {
	dir := t.TempDir()
	probe, err := os.Create(filepath.Join(dir, "probe"))
	must(t, err)
	pf, err := reopen(probe, unix.O_WRONLY|unix.O_DIRECT)
	probe.Close()
	if err != nil {
		t.Skipf("%s does not support O_DIRECT (tmpfs does not): %v", dir, err)
	}
	align := dioAlignment(pf)
	// What the kernel requires here: an unaligned buffer fails with
	// EINVAL, an aligned one works.
	buf := alignedBuf(2*ps, ps)
	if _, err := unix.Pwrite(int(pf.Fd()), buf[1:ps+1], 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("O_DIRECT write from a buffer at alignment 1: %v, want EINVAL", err)
	}
	if _, err := unix.Pwrite(int(pf.Fd()), buf[:ps], 0); err != nil {
		t.Errorf("O_DIRECT write from a page-aligned buffer: %v", err)
	}
	pf.Close()
	t.Logf("O_DIRECT on %s: STATX_DIOALIGN (or page size) says buffers aligned to %d bytes", dir, align)
	for _, unaligned := range []bool{false, true} {
		t.Run(fmt.Sprintf("unaligned=%v", unaligned), func(t *testing.T) {
			g := newGuest(t, 8<<20)
			path := filepath.Join(dir, fmt.Sprintf("dio-%v.mig", unaligned))
			o := Options{DirectIO: true, Channels: 2}
			save(t, path, g, saveOpts{Options: o, unaligned: unaligned})
			mem, r, err := restore(t, path, g, o, 0)
			must(t, err)
			if r.align < 2 {
				t.Fatalf("restore alignment %d: not direct", r.align)
			}
			if !bytes.Equal(mem["pc.ram"], g.mem["pc.ram"]) {
				t.Fatal("restored memory differs")
			}
			// And into unaligned target memory (bounce on read).
			m2 := make([]byte, 8<<20+1)[1:]
			must(t, r.Load(context.Background(), func(string) []byte { return m2 }))
			if !bytes.Equal(m2, g.mem["pc.ram"]) {
				t.Fatal("restored into unaligned memory differs")
			}
		})
	}
}

// Finish waits for the batches still being written: their bits are in the
// bitmap it writes.
func TestFinishWaitsForChannels(t *testing.T) {
	const size = 4 << 20
	path := filepath.Join(t.TempDir(), "fin.mig")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	must(t, err)
	defer f.Close()
	enc := stream.NewEncoder(f)
	must(t, enc.WriteHeader("fin"))
	blocks := []stream.Block{{Name: "pc.ram", Size: size}}
	layout, err := enc.StartRAMMapped(ps, blocks, f, RecordSize)
	must(t, err)
	sv, err := NewSaver(f, layout, Options{Channels: 2})
	must(t, err)
	defer sv.Close()
	src := guestMem(t, size, 0)
	ctx := context.Background()
	for off := uint64(0); off < size; off += ps {
		patternPage(src[off:off+ps], "pc.ram", off, 3)
		must(t, sv.Submit(ctx, "pc.ram", []uint64{off}, [][]byte{src[off : off+ps]}))
	}
	must(t, enc.BeginRAMEnd())
	must(t, enc.CloseRAMSection())
	must(t, sv.Finish(ctx)) // no Sync before it
	must(t, enc.Close())
	must(t, sv.Complete(0))
	g := &guest{blocks: blocks, mem: map[string][]byte{"pc.ram": src}}
	_, r, err := restore(t, path, g, Options{}, 0)
	must(t, err)
	if got := r.Blocks()[0].Present; got != size/ps {
		t.Fatalf("%d of %d pages in the bitmap", got, size/ps)
	}
}

func TestLoadCancel(t *testing.T) {
	g := newGuest(t, 4<<20)
	path := filepath.Join(t.TempDir(), "vm.mig")
	save(t, path, g, saveOpts{})
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	r, err := Open(f, 0, Options{})
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.Load(ctx, func(string) []byte { return make([]byte, 4<<20) }); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled load: %v", err)
	}
	if err := r.Load(context.Background(), func(string) []byte { return make([]byte, 100) }); !errors.Is(err, ErrInvalid) {
		t.Fatalf("short memory: %v", err)
	}
}

// A file opened write-only (as the file: transport opens it, like QEMU)
// still gets its completion marker: the Saver reads the main stream back
// through a read-only open of the same file. With DetectZero the channel
// goroutines find the zero pages; the counts are the save helper's pattern:
// of 2048 pages every 5th is zero in pass 1 (410), pass 2 rewrites pages
// 1, 2 and 5 and makes page 3 zero.
func TestSaverWriteOnlyDetectZero(t *testing.T) {
	const size = 8 << 20
	g := newGuest(t, size)
	path := filepath.Join(t.TempDir(), "wo.mig")
	o := Options{Channels: 3, DetectZero: true}
	var st SaverStats
	saveStats = func(s SaverStats) { st = s }
	defer func() { saveStats = nil }()
	save(t, path, g, saveOpts{Options: o, writeOnly: true})
	if want := (SaverStats{Pages: 2048 - 410 + 3, Bytes: (2048 - 410 + 3) * ps, Zeros: 410 + 1}); st != want {
		t.Fatalf("Saver stats %+v, want %+v", st, want)
	}
	mem, r, err := restore(t, path, g, Options{Channels: 2}, 0)
	must(t, err)
	if !bytes.Equal(mem["pc.ram"], g.mem["pc.ram"]) {
		t.Fatal("restored memory differs")
	}
	if got := r.Blocks()[0].Present; got != 2048-410-1+1 {
		t.Fatalf("%d pages present, want %d", got, 2048-410)
	}
}
