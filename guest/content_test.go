package guest

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"strings"
	"testing"
)

func TestContentRoundTrip(t *testing.T) {
	for _, random := range []bool{false, true} {
		ct := newContent(&Config{Seed: 42, Random: random})
		p := make([]byte, PageSize)
		for page := range 50 {
			ct.fill(p, 1, page, uint32(page*7+1))
			if at, why := ct.check(p, 1, page); why != "" {
				t.Fatalf("random=%v page %d: fresh page fails check at %d: %s", random, page, at, why)
			}
			if pg, v := header(p); int(pg) != page || v != uint32(page*7+1) {
				t.Fatalf("header = (%d, %d), want (%d, %d)", pg, v, page, page*7+1)
			}
			// Any single flipped byte is caught, where it is.
			at := 8 + (page*977)%(PageSize-8)
			p[at] ^= 0x10
			if got, why := ct.check(p, 1, page); why == "" || got != at {
				t.Fatalf("random=%v: flipped byte %d: check = (%d, %q)", random, at, got, why)
			}
		}
	}
}

func TestContentZeroFraction(t *testing.T) {
	for _, f := range []float64{0, 0.25, 1} {
		ct := newContent(&Config{Seed: 7, ZeroFraction: f})
		zero := 0
		const n = 8192
		for p := range n {
			if ct.isZero(0, p) {
				zero++
			}
		}
		got := float64(zero) / n
		if got < f-0.03 || got > f+0.03 {
			t.Errorf("ZeroFraction %v: %d of %d pages zero (%.3f)", f, zero, n, got)
		}
	}
}

// TestContentCompressibility: compressible pages shrink, random ones do not,
// and a compressible rewrite changes only every eighth word and the header.
func TestContentCompressibility(t *testing.T) {
	ratio := func(random bool) float64 {
		ct := newContent(&Config{Seed: 3, Random: random})
		buf := make([]byte, 256*PageSize)
		for p := range 256 {
			ct.fill(buf[p*PageSize:(p+1)*PageSize], 0, p, 1)
		}
		var out bytes.Buffer
		w, _ := flate.NewWriter(&out, flate.BestSpeed)
		w.Write(buf)
		w.Close()
		return float64(out.Len()) / float64(len(buf))
	}
	if r := ratio(false); r > 0.8 {
		t.Errorf("compressible content compresses to %.2f of its size, want <= 0.8", r)
	}
	if r := ratio(true); r < 0.99 {
		t.Errorf("random content compresses to %.2f of its size, want incompressible", r)
	}
	ct := newContent(&Config{Seed: 3})
	a, b := make([]byte, PageSize), make([]byte, PageSize)
	ct.fill(a, 0, 9, 1)
	ct.fill(b, 0, 9, 2)
	changed := 0
	for off := 0; off < PageSize; off += 8 {
		if binary.LittleEndian.Uint64(a[off:]) != binary.LittleEndian.Uint64(b[off:]) {
			changed++
			if off != 0 && off%64 != 0 {
				t.Fatalf("rewrite changed word at %d, which should be version-independent", off)
			}
		}
	}
	if changed < pageWords/8-4 || changed > pageWords/8+1 {
		t.Errorf("rewrite changed %d words, want about %d", changed, pageWords/8)
	}
}

func TestContentCheckReasons(t *testing.T) {
	ct := newContent(&Config{Seed: 1, ZeroFraction: 0.5})
	var zp, dp int = -1, -1
	for p := 0; zp < 0 || dp < 0; p++ {
		if ct.isZero(0, p) {
			if zp < 0 {
				zp = p
			}
		} else if dp < 0 {
			dp = p
		}
	}
	p := make([]byte, PageSize)
	if _, why := ct.check(p, 0, dp); !strings.Contains(why, "lost") {
		t.Errorf("zeroed data page: reason %q, want it to say lost", why)
	}
	p[100] = 1
	if at, why := ct.check(p, 0, zp); at != 100 || !strings.Contains(why, "zero page holds data") {
		t.Errorf("dirty zero page: (%d, %q)", at, why)
	}
	ct.fill(p, 0, dp, 3)
	if _, why := ct.check(p, 1, dp); !strings.Contains(why, "another seed") {
		t.Errorf("page from block 0 checked as block 1: %q, want a body mismatch", why)
	}
	if _, why := ct.check(p, 0, dp+1); !strings.Contains(why, "wrong offset") && !strings.Contains(why, "zero page") {
		t.Errorf("page at the wrong offset: %q", why)
	}
}
