package stream

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestIsZeroPage(t *testing.T) {
	for _, c := range []struct {
		size, nonzero int // nonzero: index of the one non-zero byte, -1 for none
		want          bool
	}{
		{0, -1, true},
		{1, -1, true},
		{1, 0, false},
		{4096, -1, true},
		{4096, 0, false},
		{4096, 63, false},
		{4096, 64, false},
		{4096, 2049, false},
		{4096, 4095, false},
		{MaxPageSize, -1, true},
		{MaxPageSize, MaxPageSize - 1, false},
		{MaxPageSize + 1, -1, true},
		{MaxPageSize + 1, MaxPageSize, false},
		{3*MaxPageSize + 5, 2*MaxPageSize + 7, false},
		{3*MaxPageSize + 5, -1, true},
	} {
		p := make([]byte, c.size)
		if c.nonzero >= 0 {
			p[c.nonzero] = 0x80
		}
		if got := IsZeroPage(p); got != c.want {
			t.Errorf("IsZeroPage(%d bytes, byte %d set) = %v, want %v", c.size, c.nonzero, got, c.want)
		}
	}
	if n := testing.AllocsPerRun(10, func() { IsZeroPage(make([]byte, 4096)) }); n != 0 {
		t.Errorf("IsZeroPage allocates %v times", n)
	}
}

// Alternatives to IsZeroPage, for BenchmarkIsZeroPage only.

// zeroWords ORs eight 64-bit words per 64 bytes.
func zeroWords(p []byte) bool {
	for len(p) >= 64 {
		if binary.LittleEndian.Uint64(p[0:])|binary.LittleEndian.Uint64(p[8:])|
			binary.LittleEndian.Uint64(p[16:])|binary.LittleEndian.Uint64(p[24:])|
			binary.LittleEndian.Uint64(p[32:])|binary.LittleEndian.Uint64(p[40:])|
			binary.LittleEndian.Uint64(p[48:])|binary.LittleEndian.Uint64(p[56:]) != 0 {
			return false
		}
		p = p[64:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// zeroWordsUnsafe is zeroWords over a []uint64 view (len(p) a multiple of 64).
func zeroWordsUnsafe(p []byte) bool {
	w := unsafe.Slice((*uint64)(unsafe.Pointer(unsafe.SliceData(p))), len(p)/8)
	for i := 0; i+8 <= len(w); i += 8 {
		if w[i]|w[i+1]|w[i+2]|w[i+3]|w[i+4]|w[i+5]|w[i+6]|w[i+7] != 0 {
			return false
		}
	}
	return true
}

// zeroShift: p[0] is zero and every byte equals the next (bytes.Equal of p
// with itself shifted by one; reads one buffer instead of two).
func zeroShift(p []byte) bool {
	return len(p) == 0 || p[0] == 0 && bytes.Equal(p[1:], p[:len(p)-1])
}

var benchZeroSink bool

// BenchmarkIsZeroPage times IsZeroPage and its alternatives on 4 KiB pages:
// zero pages (the whole page is read) and data pages (non-zero first byte),
// hot (one page, in L1) or cold (the pages of a 256 MiB memfd mapping, as
// guest.Builtin's RAM, walked in order, so mostly from memory). The clock
// runs over the calls only; the mapping is filled, and touched once, before
// it starts. On this project's machines the cold cases are bound by memory
// and no variant wins them consistently.
func BenchmarkIsZeroPage(b *testing.B) {
	const span = 256 << 20
	fd, err := unix.MemfdCreate("zero-bench", unix.MFD_CLOEXEC)
	must(b, err)
	defer unix.Close(fd)
	must(b, unix.Ftruncate(fd, span))
	mem, err := unix.Mmap(fd, 0, span, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	must(b, err)
	defer unix.Munmap(mem)
	fns := []struct {
		name string
		f    func([]byte) bool
	}{{"IsZeroPage", IsZeroPage}, {"words", zeroWords}, {"wordsUnsafe", zeroWordsUnsafe}, {"shift", zeroShift}}
	for _, kind := range []string{"zero", "data"} {
		for off := 0; off < span; off += testPS {
			clear(mem[off : off+testPS])
			if kind == "data" {
				mem[off] = 1
			}
		}
		for _, where := range []string{"hot", "cold"} {
			n := testPS
			if where == "cold" {
				n = span
			}
			for _, fn := range fns {
				b.Run(fmt.Sprintf("%s/%s/%s", kind, where, fn.name), func(b *testing.B) {
					b.SetBytes(testPS)
					// Walk the mapping once first, so every variant
					// starts from the same cache and TLB state.
					for off := 0; off < span; off += testPS {
						benchZeroSink = mem[off] == 0
					}
					off := 0
					for b.Loop() {
						benchZeroSink = fn.f(mem[off : off+testPS])
						if off += testPS; off >= n {
							off = 0
						}
					}
					if benchZeroSink != (kind == "zero") {
						b.Fatalf("%s says %v", fn.name, benchZeroSink)
					}
				})
			}
		}
	}
}
