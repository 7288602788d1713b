package stream

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func fuzzLimits(tool bool) Limits {
	l := Limits{
		PageSize:         testPS,
		MaxDevicePayload: 4096,
		MaxJSON:          4096,
		MaxBlocks:        8,
		MaxMachineName:   256,
	}
	if !tool {
		l.Blocks = map[string]uint64{"pc.ram": ramSize, romName: romSize}
	}
	return l
}

// fuzzSeeds are encoder outputs covering every record kind.
func fuzzSeeds(tb testing.TB) [][]byte {
	var seeds [][]byte
	for _, live := range []bool{false, true} {
		var buf bytes.Buffer
		writeSample(tb, &buf, live)
		seeds = append(seeds, buf.Bytes())
	}
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	must(tb, e.WriteHeader(""))
	must(tb, e.WriteCommand(CmdPostcopyAdvise, make([]byte, 16)))
	must(tb, e.WriteCommand(CmdRecvBitmap, append([]byte{6}, "pc.ram"...)))
	must(tb, e.WriteCommand(CmdPostcopyDiscard, append(append([]byte{0, 6}, "pc.ram\x00"...), make([]byte, 16)...)))
	must(tb, e.WriteCommand(CmdSwitchoverStart, nil))
	must(tb, e.StartRAM(testPS, []Block{{"pc.ram", testPS}}))
	must(tb, e.BeginRAMEnd())
	must(tb, e.PutZero("pc.ram", 0))
	must(tb, e.CloseRAMSection())
	must(tb, e.Close())
	seeds = append(seeds, buf.Bytes(), new(raw).header().u8(SecEOF).Bytes())
	return seeds
}

// decodeFuzz runs data through a Decoder and checks the invariants: no
// panic, progress on every record, every error classified, memory bounded by
// the limits.
func decodeFuzz(t *testing.T, data []byte, lim Limits, readPages bool) {
	decodeFuzzWith(t, NewDecoder(bytes.NewReader(data), lim), data, lim, readPages)
}

// decodeFuzzWith is decodeFuzz on a Decoder reading data.
func decodeFuzzWith(t *testing.T, d *Decoder, data []byte, lim Limits, readPages bool) {
	page := make([]byte, testPS)
	last := int64(-1)
	for i := 0; ; i++ {
		if i > len(data)+2 {
			t.Fatalf("%d records from %d bytes: no progress", i, len(data))
		}
		rec, err := d.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("unclassified error %T: %v", err, err)
			}
			n := 0
			for _, c := range []error{ErrCorrupt, ErrMismatch, ErrTooLarge, ErrUnsupported} {
				if errors.Is(err, c) {
					n++
				}
			}
			if n != 1 || de.Offset < 0 || de.Offset > int64(len(data)) {
				t.Fatalf("error %q: %d classes, offset %d of %d", err, n, de.Offset, len(data))
			}
			break
		}
		if rec.Pos <= last {
			t.Fatalf("record %v at %d after one at %d", rec.Kind, rec.Pos, last)
		}
		last = rec.Pos
		if rec.Kind == KindPage {
			if readPages {
				err = d.ReadPage(page)
			} else {
				err = d.SkipPage()
			}
			if err != nil && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("page read: %v", err)
			}
		}
	}
	limit := max(lim.MaxDevicePayload, lim.MaxJSON, lim.MaxMachineName, 0xffff)
	if cap(d.buf) > limit {
		t.Fatalf("decoder buffer grew to %d bytes, limits allow %d", cap(d.buf), limit)
	}
}

func FuzzDecoder(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		decodeFuzz(t, data, fuzzLimits(false), true)
		decodeFuzz(t, data, fuzzLimits(true), false)
	})
}

// FuzzDecoderSplit is FuzzDecoder with the input arriving in reads of at most
// chunk bytes into a read buffer of buf bytes, so that records and pages
// straddle the buffer's end anywhere (ReadPage's direct reads).
func FuzzDecoderSplit(f *testing.F) {
	for i, s := range fuzzSeeds(f) {
		f.Add(s, uint16(4095+i*1000), uint16(5000+i*777))
	}
	f.Fuzz(func(t *testing.T, data []byte, chunk, buf uint16) {
		for _, tool := range []bool{false, true} {
			r := &chunkReader{bytes.NewReader(data), 1 + int(chunk)}
			d := NewDecoder(r, fuzzLimits(tool))
			d.rb = newReader(r, 1+int(buf))
			decodeFuzzWith(t, d, data, fuzzLimits(tool), !tool)
		}
	})
}

func FuzzReadRP(f *testing.F) {
	var buf bytes.Buffer
	for _, m := range []RPMessage{NewShut(1), NewPong(9), NewSwitchoverAck(), NewFailReason("no"),
		{Type: RPReqPagesID, Data: append(make([]byte, 12), 1, 'a')}, {Type: RPReqPages, Data: make([]byte, 12)},
		{Type: RPRecvBitmap, Data: []byte{1, 'a'}}, {Type: RPResumeAck, Data: []byte{0, 0, 0, 1}},
		NewHello(ExtSwitchoverCommit), {Type: RPLoaded}, {Type: RPKeepalive}} {
		must(f, WriteRP(&buf, m))
		f.Add(bytes.Clone(buf.Bytes()[buf.Len()-4-len(m.Data):]))
	}
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		for {
			before := len(data) - r.Len()
			m, err := ReadRP(r)
			if err == io.EOF {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("unclassified error: %v", err)
				}
				return
			}
			var out bytes.Buffer
			if err := WriteRP(&out, m); err != nil {
				t.Fatalf("ReadRP accepted %v that WriteRP refuses: %v", m, err)
			}
			if consumed := data[before : len(data)-r.Len()]; !bytes.Equal(out.Bytes(), consumed) {
				t.Fatalf("re-encoded %x, read %x", out.Bytes(), consumed)
			}
		}
	})
}
