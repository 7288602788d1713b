package stream

import (
	"bytes"
	"io"
	"testing"
	"time"
)

const benchRAM = 64 << 20

var benchBlocks = []Block{{"pc.ram", benchRAM}}

// benchEncode writes every page of src (one PART section per 4 MiB, every
// 16th page a zero page) and closes the stream.
func benchEncode(tb testing.TB, w io.Writer, src []byte) {
	e := NewEncoder(w)
	must(tb, e.WriteHeader(guestName))
	must(tb, e.StartRAM(testPS, benchBlocks))
	for off := uint64(0); off < benchRAM; off += testPS {
		if off%(4<<20) == 0 {
			if off > 0 {
				must(tb, e.CloseRAMSection())
			}
			must(tb, e.BeginRAMPart())
		}
		if off/testPS%16 == 15 {
			must(tb, e.PutZero("pc.ram", off))
		} else {
			must(tb, e.PutPage("pc.ram", off, src[off:off+testPS]))
		}
	}
	must(tb, e.CloseRAMSection())
	must(tb, e.Close())
}

// benchDecode loads every page into dst.
func benchDecode(tb testing.TB, r io.Reader, dst []byte) {
	d := NewDecoder(r, Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": benchRAM}})
	for {
		rec, err := d.Next()
		if err == io.EOF {
			return
		}
		must(tb, err)
		switch rec.Kind {
		case KindPage:
			must(tb, d.ReadPage(dst[rec.Offset:rec.Offset+testPS]))
		case KindZero:
			clear(dst[rec.Offset : rec.Offset+testPS])
		}
	}
}

func benchImage() []byte {
	src := make([]byte, benchRAM)
	for i := range src {
		src[i] = byte(i * 31 >> 7)
	}
	return src
}

// rawPipeCopy is the baseline: the bytes of src through io.Pipe in 256 KiB
// writes straight into dst, no framing. Best of three runs.
func rawPipeCopy(src, dst []byte) time.Duration {
	best := time.Duration(1 << 62)
	for range 3 {
		pr, pw := io.Pipe()
		start := time.Now()
		done := make(chan struct{})
		go func() {
			defer close(done)
			io.ReadFull(pr, dst)
		}()
		for off := 0; off < len(src); off += 256 << 10 {
			pw.Write(src[off:min(len(src), off+256<<10)])
		}
		pw.Close()
		<-done
		best = min(best, time.Since(start))
	}
	return best
}

// BenchmarkRoundTripPipe encodes 64 MiB of guest RAM into an io.Pipe and
// decodes it on the other side straight into a 64 MiB destination, and
// reports its speed relative to a raw pipe copy of the same 64 MiB from
// source to destination memory (x-of-raw, 1.0 = no framing cost).
func BenchmarkRoundTripPipe(b *testing.B) {
	src, dst := benchImage(), make([]byte, benchRAM)
	raw := rawPipeCopy(src, dst)

	b.SetBytes(benchRAM)
	b.ResetTimer()
	for b.Loop() {
		pr, pw := io.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			benchEncode(b, pw, src)
			pw.Close()
		}()
		benchDecode(b, pr, dst)
		<-done
	}
	b.StopTimer()
	per := b.Elapsed() / time.Duration(b.N)
	b.ReportMetric(float64(raw)/float64(per), "x-of-raw")
	if !bytes.Equal(src[:testPS], dst[:testPS]) {
		b.Fatal("destination differs")
	}
}

// BenchmarkEncode measures the encoder alone (into io.Discard).
func BenchmarkEncode(b *testing.B) {
	src := benchImage()
	b.SetBytes(benchRAM)
	for b.Loop() {
		benchEncode(b, io.Discard, src)
	}
}

// BenchmarkDecode measures the decoder alone (from memory).
func BenchmarkDecode(b *testing.B) {
	src, dst := benchImage(), make([]byte, benchRAM)
	var buf bytes.Buffer
	benchEncode(b, &buf, src)
	stream := buf.Bytes()
	b.SetBytes(benchRAM)
	for b.Loop() {
		benchDecode(b, bytes.NewReader(stream), dst)
	}
}
