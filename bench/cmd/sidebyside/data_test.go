package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// planData places the random bytes between 1 MiB and 1 MiB below the top
// and refuses what does not fit.
func TestPlanData(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		size, random int64
		layout       string
		length       int64 // 0: refused
	}{
		{256 * mib, 192 * mib, layoutContiguous, 192 * mib},
		{256 * mib, 192 * mib, layoutSpread, 254 * mib},
		{256 * mib, 254 * mib, layoutSpread, 254 * mib},
		{256 * mib, 254*mib + 4096, layoutSpread, 0},
		{256 * mib, 100, layoutSpread, 0},
		{256 * mib, 0, layoutSpread, 0},
		{256 * mib, 192 * mib, "striped", 0},
	}
	for _, c := range cases {
		p, err := planData(c.size, c.random, c.layout)
		if c.length == 0 {
			if err == nil {
				t.Errorf("planData(%d, %d, %s) = %+v, want an error", c.size, c.random, c.layout, p)
			}
			continue
		}
		if err != nil || p.Length != c.length || p.RandomPages != c.random/4096 {
			t.Errorf("planData(%d, %d, %s) = %+v, %v; want length %d, %d random pages", c.size, c.random, c.layout, p, err, c.length, c.random/4096)
		}
	}
}

// The file holds exactly the planned random pages where isRandom says,
// zeros elsewhere; spread pages are interleaved (no run of zero pages
// longer than the ratio asks), contiguous ones come first.
func TestDataFile(t *testing.T) {
	const pages = 1000
	cases := []struct {
		layout      string
		random      int64 // pages
		maxZeroRun  int
		firstRandom int64 // pages at the start that must be random
	}{
		{layoutSpread, 750, 1, 0},  // 3 random : 1 zero
		{layoutSpread, 250, 3, 0},  // 1 random : 3 zero
		{layoutSpread, 1000, 0, 0}, // all random
		{layoutContiguous, 600, 0, 600},
	}
	for _, c := range cases {
		p := dataPlan{Layout: c.layout, Length: pages * pageBytes, RandomPages: c.random}
		if c.layout == layoutContiguous {
			p.Length = c.random * pageBytes
		}
		path := filepath.Join(t.TempDir(), "data")
		if err := p.write(path); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(data)) != p.Length {
			t.Fatalf("%s: file of %d bytes, want %d", c.layout, len(data), p.Length)
		}
		zero := make([]byte, pageBytes)
		var random int64
		run, longest := 0, 0
		for i := int64(0); i < p.Length/pageBytes; i++ {
			pg := data[i*pageBytes : (i+1)*pageBytes]
			isZero := bytes.Equal(pg, zero)
			if isZero == p.isRandom(i) {
				t.Fatalf("%s: page %d zero=%v but isRandom=%v", c.layout, i, isZero, p.isRandom(i))
			}
			if isZero {
				run++
				longest = max(longest, run)
			} else {
				random++
				run = 0
			}
			if i < c.firstRandom && isZero {
				t.Fatalf("%s: page %d is zero, want the random pages first", c.layout, i)
			}
		}
		if random != c.random {
			t.Errorf("%s: %d random pages, want %d", c.layout, random, c.random)
		}
		if c.layout == layoutSpread && longest > c.maxZeroRun {
			t.Errorf("%s with %d of %d random: a run of %d zero pages, want at most %d", c.layout, c.random, pages, longest, c.maxZeroRun)
		}
		for _, off := range p.spotOffsets(8) {
			if off < 0 || off+16 > p.Length || !p.isRandom(off/pageBytes) || off%8 != 0 {
				t.Errorf("%s: spot offset %d is not 8-aligned inside a random page", c.layout, off)
			}
		}
	}
}
