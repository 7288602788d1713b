package stream

import "bytes"

// zeroPage is what IsZeroPage compares with: MaxPageSize zero bytes in the
// binary's BSS, which costs no memory until read and then maps the kernel's
// shared zero page.
var zeroPage [MaxPageSize]byte

// IsZeroPage reports whether every byte of p is zero: the test a source runs
// to send a ZERO record instead of a PAGE (QEMU's zero-page detection). It
// compares p with a zero page using bytes.Equal, which the standard library
// runs with SIMD instructions and which stops at the first 64-byte block
// holding a non-zero byte (BenchmarkIsZeroPage compares the alternatives).
// It does not allocate; p may have any length.
func IsZeroPage(p []byte) bool {
	for len(p) > len(zeroPage) {
		if !bytes.Equal(p[:len(zeroPage)], zeroPage[:]) {
			return false
		}
		p = p[len(zeroPage):]
	}
	return bytes.Equal(p, zeroPage[:len(p)])
}
