package stream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/migctl/migctl/transport"
)

// The zero-copy tests: the Encoder's vector mode (writev, PutPageRef) and the
// Decoder's direct page reads (readPage, readv).

const scriptRAM = 1 << 20 // "pc.ram" of the scripted stream

var scriptBlocks = []Block{{"pc.ram", scriptRAM}, {romName, romSize}}

func scriptLimits() Limits {
	return Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": scriptRAM, romName: romSize}}
}

// scriptImage is the source RAM the script sends: every page different
// (its block, offset and a pass number in every 8-byte word), never modified
// while an Encoder may hold a reference to it.
func scriptImage() map[string][]byte {
	img := map[string][]byte{}
	for i, b := range scriptBlocks {
		m := make([]byte, b.Size)
		for off := 0; off < len(m); off += 8 {
			v := uint64(i+1)<<56 | uint64(off)<<8 | 0xa5
			for j := range 8 {
				m[off+j] = byte(v >> (8 * j))
			}
		}
		img[b.Name] = m
	}
	return img
}

// encodeScript writes the same stream to e for the same seed: three RAM passes
// over pc.ram with PutPageRef, PutPage, PutZero, pages of the ROM block in
// between (records without CONTINUE), MULTIFD_FLUSH, Flush in the middle of
// sections, sections of varying size with PINGs between them, and device
// payloads of 10 bytes, 200 KiB and 300 KiB (more than the Encoder's arena
// holds). It returns the RAM image the destination must end with: the
// page's source bytes for PAGE records, zeros for ZERO records.
func encodeScript(t *testing.T, e *Encoder, src map[string][]byte, seed uint64) map[string][]byte {
	t.Helper()
	want := map[string][]byte{}
	for name, m := range src {
		want[name] = make([]byte, len(m))
	}
	rnd := rand.New(rand.NewPCG(seed, 1))
	must(t, e.WriteHeader(guestName))
	must(t, e.StartRAM(testPS, scriptBlocks))
	payload := func(n int) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i*7 + n)
		}
		return p
	}
	devices := []int{10, 200 << 10, 300 << 10}
	for pass := range 3 {
		begin := e.BeginRAMPart
		if pass == 2 {
			begin = e.BeginRAMEnd
		}
		must(t, begin())
		inSection, sectionMax := 0, 64<<10+rnd.IntN(512<<10)
		put := func(block string, off uint64) {
			page := src[block][off : off+testPS]
			switch r := rnd.IntN(100); {
			case r < 70:
				must(t, e.PutPageRef(block, off, page))
				copy(want[block][off:], page)
			case r < 85:
				must(t, e.PutPage(block, off, page))
				copy(want[block][off:], page)
			default:
				must(t, e.PutZero(block, off))
				clear(want[block][off : off+testPS])
			}
			inSection += testPS
		}
		for off := uint64(pass) * testPS; off < scriptRAM; off += testPS * uint64(1+pass) {
			put("pc.ram", off)
			switch r := rnd.IntN(100); {
			case r < 3:
				put(romName, uint64(rnd.IntN(romSize/testPS))*testPS)
			case r < 4:
				must(t, e.PutFlush())
			case r < 6:
				must(t, e.Flush())
			}
			if pass < 2 && inSection >= sectionMax {
				must(t, e.CloseRAMSection())
				must(t, e.Ping(uint32(off)))
				must(t, e.BeginRAMPart())
				inSection, sectionMax = 0, 64<<10+rnd.IntN(512<<10)
			}
		}
		must(t, e.CloseRAMSection())
		must(t, e.WriteDevice(fmt.Sprintf("dev%d", pass), 0, 1, payload(devices[pass])))
	}
	must(t, e.Close())
	return want
}

// scriptBytes is the script's stream as the copy-mode Encoder writes it.
func scriptBytes(t *testing.T, seed uint64) ([]byte, map[string][]byte) {
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	if e.ZeroCopy() {
		t.Fatal("an Encoder on a bytes.Buffer says it is in vector mode")
	}
	want := encodeScript(t, e, scriptImage(), seed)
	return buf.Bytes(), want
}

// drain reads c to EOF in a goroutine.
func drain(c net.Conn) <-chan result {
	out := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(c)
		out <- result{b, err}
	}()
	return out
}

type result struct {
	data []byte
	err  error
}

// TestZeroCopyWire: on a socket the Encoder (vector mode: writev, pages by
// reference) writes exactly the bytes the copy-mode Encoder writes, for
// scripts mixing every kind of record, flush and payload size. A page
// referenced wrongly, a segment lost or reordered, or arena bytes
// overwritten before they were sent all change the bytes.
func TestZeroCopyWire(t *testing.T) {
	for seed := range uint64(4) {
		want, _ := scriptBytes(t, seed)
		a, c := socketPair(t, 0)
		got := drain(c)
		e := NewEncoder(a)
		if !e.ZeroCopy() {
			t.Fatal("an Encoder on a *net.UnixConn is not in vector mode")
		}
		encodeScript(t, e, scriptImage(), seed)
		if len(e.vec) != 0 || len(e.arena) != 0 {
			t.Fatalf("after Close the Encoder still queues %d segments, %d arena bytes", len(e.vec), len(e.arena))
		}
		must(t, a.CloseWrite())
		res := <-got
		must(t, res.err)
		if !bytes.Equal(res.data, want) {
			at := 0
			for at < min(len(res.data), len(want)) && res.data[at] == want[at] {
				at++
			}
			t.Fatalf("seed %d: vector mode wrote %d bytes, copy mode %d; first difference at byte %d", seed, len(res.data), len(want), at)
		}
		if st := e.Stats(); st.Bytes != uint64(len(want)) {
			t.Errorf("seed %d: Stats().Bytes = %d, the stream has %d", seed, st.Bytes, len(want))
		}
	}
}

// TestPutPageRefRule: what each Encoder sends when the caller changes a page
// after queueing it. The rule (PutPageRef's doc): a queued page is read when
// the Encoder writes it, at the latest by the next Flush; PutPage copies at
// the call; copy mode copies PutPageRef's page too.
func TestPutPageRefRule(t *testing.T) {
	const (
		before = 0xaa // the page's bytes at the call
		after  = 0xbb // the bytes written into it after the call
	)
	for _, c := range []struct {
		name        string
		socket, ref bool
		flushFirst  bool // Flush between the call and the change
		want        byte
	}{
		{"vector/PutPageRef/changed before Flush", true, true, false, after},
		{"vector/PutPageRef/changed after Flush", true, true, true, before},
		{"vector/PutPage/changed before Flush", true, false, false, before},
		{"copy/PutPageRef/changed before Flush", false, true, false, before},
		{"copy/PutPage/changed before Flush", false, false, false, before},
	} {
		t.Run(c.name, func(t *testing.T) {
			var w io.Writer
			var buf bytes.Buffer
			var got <-chan result
			if c.socket {
				a, b := socketPair(t, 0)
				got = drain(b)
				w = a
				defer a.Close()
			} else {
				w = &buf
			}
			e := NewEncoder(w)
			if e.ZeroCopy() != c.socket {
				t.Fatalf("ZeroCopy() = %v", e.ZeroCopy())
			}
			must(t, e.WriteHeader(""))
			must(t, e.StartRAM(testPS, []Block{{"pc.ram", testPS}}))
			must(t, e.BeginRAMEnd())
			page := bytes.Repeat([]byte{before}, testPS)
			if c.ref {
				must(t, e.PutPageRef("pc.ram", 0, page))
			} else {
				must(t, e.PutPage("pc.ram", 0, page))
			}
			if c.flushFirst {
				must(t, e.Flush())
			}
			for i := range page {
				page[i] = after
			}
			must(t, e.CloseRAMSection())
			must(t, e.Close())
			stream := buf.Bytes()
			if c.socket {
				must(t, w.(*net.UnixConn).CloseWrite())
				res := <-got
				must(t, res.err)
				stream = res.data
			}
			_, pages, err := decodeAll(NewDecoder(bytes.NewReader(stream), Limits{PageSize: testPS}))
			must(t, err)
			p := pages[pageKey("pc.ram", 0)]
			if len(p) != testPS || !bytes.Equal(p, bytes.Repeat([]byte{c.want}, testPS)) {
				t.Fatalf("the destination got a page starting %x, want every byte %#x", p[:min(8, len(p))], c.want)
			}
		})
	}
}

// unwrapper is a writer that exposes what it wraps as Unwrap() any.
type unwrapper struct {
	io.Writer
	inner any
}

func (u unwrapper) Unwrap() any { return u.inner }

// TestZeroCopyWriters: which writers put an Encoder in vector mode: sockets,
// given directly or through Unwrap() any (transport's tcp: and unix: Conns);
// never files, pipes, buffers or other wrappers.
func TestZeroCopyWriters(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tcpSrc, _ := tcpPair(t)
	unixSrc, _ := socketPair(t, 0)
	pr, pw, err := os.Pipe()
	must(t, err)
	defer pr.Close()
	defer pw.Close()
	dial := func(uri string) transport.Conn {
		a, err := transport.Parse(uri)
		must(t, err)
		l, err := transport.Listen(ctx, a)
		must(t, err)
		t.Cleanup(func() { l.Close() })
		accepted := make(chan error, 1)
		go func() {
			c, err := l.Accept(ctx)
			if err == nil {
				t.Cleanup(func() { c.Close() })
			}
			accepted <- err
		}()
		c, err := transport.Dial(ctx, l.Addr())
		must(t, err)
		t.Cleanup(func() { c.Close() })
		must(t, <-accepted)
		return c
	}
	fileConn := func() transport.Conn {
		a, err := transport.Parse("file:" + filepath.Join(t.TempDir(), "stream"))
		must(t, err)
		c, err := transport.Dial(ctx, a)
		must(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}
	for _, c := range []struct {
		name string
		w    io.Writer
		want bool
	}{
		{"*net.TCPConn", tcpSrc, true},
		{"*net.UnixConn", unixSrc, true},
		{"transport tcp:", dial("tcp:127.0.0.1:0"), true},
		{"transport unix:", dial("unix:" + filepath.Join(t.TempDir(), "s")), true},
		{"Unwrap() any to a *net.UnixConn", unwrapper{io.Discard, unixSrc}, true},
		{"transport file:", fileConn(), false},
		{"*os.File pipe", pw, false},
		{"bytes.Buffer", &bytes.Buffer{}, false},
		{"Unwrap() any to a pipe", unwrapper{io.Discard, pw}, false},
		{"net.Conn embedded, no Unwrap", struct{ net.Conn }{unixSrc}, false},
	} {
		if got := NewEncoder(c.w).ZeroCopy(); got != c.want {
			t.Errorf("%s: ZeroCopy() = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestZeroCopyWriteError: when writev fails (the peer is gone) the error is
// sticky and wraps the errno, and the Encoder drops every page reference.
func TestZeroCopyWriteError(t *testing.T) {
	a, c := socketPair(t, 0)
	c.Close()
	e := NewEncoder(a)
	must(t, e.WriteHeader(""))
	must(t, e.StartRAM(testPS, []Block{{"pc.ram", 64 * testPS}}))
	must(t, e.BeginRAMPart())
	page := pattern("pc.ram", 0)
	var err error
	for i := 0; err == nil && i < 10000; i++ {
		err = e.PutPageRef("pc.ram", uint64(i%64)*testPS, page)
	}
	if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("write error %v, want EPIPE or ECONNRESET", err)
	}
	if len(e.vec) != 0 || e.queued != 0 {
		t.Errorf("after the error the Encoder still queues %d segments (%d bytes)", len(e.vec), e.queued)
	}
	for _, f := range []func() error{e.Flush, e.Close, func() error { return e.PutPageRef("pc.ram", 0, page) }} {
		if got := f(); !errors.Is(got, err) {
			t.Errorf("after a write error: %v", got)
		}
	}
}

// TestZeroCopyNoAlloc: vector mode's page path allocates nothing per page,
// writev included; neither does the Decoder's readv path. The Encoder writes
// everything first (the socket buffers hold it), then the Decoder reads it,
// so that each count sees one side only.
func TestZeroCopyNoAlloc(t *testing.T) {
	a, c := socketPair(t, 4<<20)
	must(t, a.SetDeadline(time.Now().Add(time.Minute))) // fail, not hang, if the buffers are smaller here
	const pages = 512                                   // 2 MiB: several writevs
	e := NewEncoder(a)
	must(t, e.WriteHeader(""))
	must(t, e.StartRAM(testPS, []Block{{"pc.ram", pages * testPS}}))
	must(t, e.BeginRAMPart())
	must(t, e.Flush())
	src := make([]byte, pages*testPS)
	for i := range src {
		src[i] = byte(i>>12) | 1
	}
	i := 0
	allocs := testing.AllocsPerRun(pages-1, func() {
		must(t, e.PutPageRef("pc.ram", uint64(i)*testPS, src[i*testPS:(i+1)*testPS]))
		i++
	})
	must(t, e.Flush())
	if allocs != 0 {
		t.Errorf("PutPageRef in vector mode: %v allocations per page", allocs)
	}

	d := NewDecoder(c, Limits{PageSize: testPS})
	d.rb = newReader(c, 6000) // small: pages straddle its end
	for {
		rec, err := d.Next()
		must(t, err)
		if rec.Kind == KindSectionPart {
			break
		}
	}
	dst := make([]byte, pages*testPS)
	allocs = testing.AllocsPerRun(pages-1, func() {
		rec, err := d.Next()
		must(t, err)
		if rec.Kind != KindPage {
			t.Fatalf("record %v, want a page", rec.Kind)
		}
		must(t, d.ReadPage(dst[rec.Offset:rec.Offset+testPS]))
	})
	if allocs != 0 {
		t.Errorf("Decoder over a socket: %v allocations per page", allocs)
	}
	if d.rb.straight == 0 {
		t.Error("no page byte was read straight into the destination")
	}
	if !bytes.Equal(dst, src) {
		t.Error("the destination differs from the source")
	}
}

// TestZeroCopyPayloadCopied: in vector mode the caller may reuse what it
// gives WriteDevice as soon as the call returns, and the Encoder its own
// scratch bytes (headers, footers), also where they do not fit in what is
// left of the arena and go out by reference: payload sizes around the
// arena's size put the end of the arena at every byte of a section's header,
// payload and footer in turn.
func TestZeroCopyPayloadCopied(t *testing.T) {
	a, c := socketPair(t, 0)
	got := drain(c)
	e := NewEncoder(a)
	must(t, e.WriteHeader(""))
	must(t, e.Flush())
	sizes := []int{10, 200 << 10, 300 << 10, 100 << 10}
	for delta := range 48 {
		sizes = append(sizes, encoderBufSize-delta)
	}
	for i, n := range sizes {
		p := bytes.Repeat([]byte{byte(i + 1)}, n)
		must(t, e.WriteDevice(fmt.Sprintf("dev%d", i), 0, 1, p))
		clear(p)
		if i >= 4 {
			// A PING reuses the Encoder's scratch bytes before the
			// Flush; then each boundary case starts from an empty arena.
			must(t, e.Ping(uint32(i)))
			must(t, e.Flush())
		}
	}
	must(t, e.Close())
	must(t, a.CloseWrite())
	res := <-got
	must(t, res.err)
	recs, _, err := decodeAll(NewDecoder(bytes.NewReader(res.data), Limits{MaxDevicePayload: 1 << 20}))
	must(t, err)
	i := 0
	for _, r := range recs {
		if r.Kind != KindDevice {
			continue
		}
		if want := fmt.Sprintf("dev%d", i); r.Section.IDStr != want {
			t.Errorf("device %d is called %q, want %q", i, r.Section.IDStr, want)
		}
		if !bytes.Equal(r.Data, bytes.Repeat([]byte{byte(i + 1)}, sizes[i])) {
			t.Errorf("device %d (%d bytes): the destination got other bytes", i, sizes[i])
		}
		i++
	}
	if i != len(sizes) {
		t.Errorf("%d devices arrived, want %d", i, len(sizes))
	}
}

// chunkReader returns at most k bytes per Read.
type chunkReader struct {
	r io.Reader
	k int
}

func (c *chunkReader) Read(p []byte) (int, error) { return c.r.Read(p[:min(len(p), c.k)]) }

// TestReadPageStraddle: pages that straddle the end of the Decoder's buffer
// land whole and in place: the buffered part copied, the rest read straight
// into the destination, with Read calls on an io.Reader or with readv on a
// socket. Buffer sizes and read sizes that do not divide a record's size make
// the buffer's end fall at many places inside pages. The expected RAM is the
// script's own record of what it sent.
func TestReadPageStraddle(t *testing.T) {
	stream, want := scriptBytes(t, 7)
	check := func(t *testing.T, d *Decoder, wantStraight bool) {
		t.Helper()
		mem := map[string][]byte{"pc.ram": make([]byte, scriptRAM), romName: make([]byte, romSize)}
		for name := range mem {
			for i := range mem[name] {
				mem[name][i] = 0xee // not what any record writes
			}
		}
		for {
			rec, err := d.Next()
			if err == io.EOF {
				break
			}
			must(t, err)
			switch rec.Kind {
			case KindPage:
				must(t, d.ReadPage(mem[rec.Block][rec.Offset:rec.Offset+testPS]))
			case KindZero:
				clear(mem[rec.Block][rec.Offset : rec.Offset+testPS])
			}
		}
		for name, w := range want {
			for off := 0; off < len(w); off += testPS {
				if !bytes.Equal(mem[name][off:off+testPS], w[off:off+testPS]) {
					t.Fatalf("page %s@%#x differs from what was sent", name, off)
				}
			}
		}
		if wantStraight && (d.rb.straight == 0 || d.rb.copied == 0) {
			t.Errorf("page bytes copied from the buffer %d, read straight %d: want both", d.rb.copied, d.rb.straight)
		}
	}
	for _, bufSize := range []int{16, 4097, 6007, 12289} {
		for _, k := range []int{1, 4095, 4104, 7001, 1 << 20} {
			if k == 1 && bufSize != 4097 {
				continue // slow, and the same for every buffer size
			}
			t.Run(fmt.Sprintf("reader/buf=%d/read=%d", bufSize, k), func(t *testing.T) {
				r := &chunkReader{bytes.NewReader(stream), k}
				d := NewDecoder(r, scriptLimits())
				d.rb = newReader(r, bufSize)
				// Reading 1 byte at a time, the buffer never holds a
				// page's bytes when ReadPage starts.
				check(t, d, k > 1)
			})
		}
		t.Run(fmt.Sprintf("socket/buf=%d", bufSize), func(t *testing.T) {
			a, c := socketPair(t, 0)
			sent := make(chan error, 1)
			go func() {
				// Odd-sized writes, so data arrives in pieces that end
				// anywhere.
				var err error
				for off := 0; off < len(stream) && err == nil; off += 5003 {
					_, err = a.Write(stream[off:min(len(stream), off+5003)])
				}
				if err == nil {
					err = a.CloseWrite()
				}
				sent <- err
			}()
			d := NewDecoder(c, scriptLimits())
			d.rb = newReader(c, bufSize)
			if d.rb.raw == nil {
				t.Fatal("the Decoder did not find the socket")
			}
			check(t, d, true)
			must(t, <-sent)
		})
	}
}

// TestReadPageEnds: a stream that ends inside a page, on each read path,
// fails with ErrCorrupt at the stream's end; a socket whose read deadline
// has passed fails ReadPage with os.ErrDeadlineExceeded.
func TestReadPageEnds(t *testing.T) {
	full := new(raw).header().ramStart(Block{"pc.ram", testPS}).
		u8(SecEnd).be32(0).be64(FlagPage).str("pc.ram").bytes(pattern("pc.ram", 0)).Bytes()
	cut := full[:len(full)-testPS/2]
	read := func(d *Decoder) error {
		for {
			rec, err := d.Next()
			if err != nil {
				return fmt.Errorf("Next: %w", err)
			}
			if rec.Kind == KindPage {
				return d.ReadPage(make([]byte, testPS))
			}
		}
	}
	t.Run("reader", func(t *testing.T) {
		r := &chunkReader{bytes.NewReader(cut), 100}
		d := NewDecoder(r, Limits{PageSize: testPS})
		d.rb = newReader(r, 64)
		wantDecodeError(t, read(d), ErrCorrupt, nil, int64(len(cut)), "stream ends inside page data")
	})
	t.Run("reader, page whole with io.EOF", func(t *testing.T) {
		// The last bytes of a whole page arrive together with io.EOF:
		// ReadPage succeeds, the next record is what is missing.
		r := iotest.DataErrReader(&chunkReader{bytes.NewReader(full), 1000})
		d := NewDecoder(r, Limits{PageSize: testPS})
		d.rb = newReader(r, 64)
		must(t, read(d))
		_, err := d.Next()
		wantDecodeError(t, err, ErrCorrupt, nil, int64(len(full)), "stream ends inside a RAM record")
	})
	t.Run("socket", func(t *testing.T) {
		a, c := socketPair(t, 0)
		_, err := a.Write(cut)
		must(t, err)
		must(t, a.CloseWrite())
		d := NewDecoder(c, Limits{PageSize: testPS})
		d.rb = newReader(c, 64)
		wantDecodeError(t, read(d), ErrCorrupt, nil, int64(len(cut)), "stream ends inside page data")
		if d.rb.straight == 0 {
			t.Error("the page was not read with readv")
		}
	})
	t.Run("socket deadline", func(t *testing.T) {
		a, c := socketPair(t, 0)
		_, err := a.Write(cut)
		must(t, err)
		d := NewDecoder(c, Limits{PageSize: testPS})
		d.rb = newReader(c, 64)
		for {
			rec, err := d.Next()
			must(t, err)
			if rec.Kind == KindPage {
				break
			}
		}
		must(t, c.SetReadDeadline(time.Now()))
		err = d.ReadPage(make([]byte, testPS))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadPage past the deadline: %v", err)
		}
	})
}
