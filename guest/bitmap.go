package guest

import (
	"math/bits"
	"sync/atomic"
)

// Bitmap is a set of page numbers, one bit per page: page p is bit p%64
// (little-endian order) of word p/64. It is the shape of a dirty log.
//
// The plain methods (Set, Clear, Test, Count, Next, Or, Reset) are not
// synchronised: one goroutine owns the bitmap. SetAtomic and Drain are the
// two halves of a shared dirty log: writers call SetAtomic, one reader calls
// Drain, and nothing else touches the words meanwhile.
type Bitmap []uint64

// BitmapWords returns how many uint64 words hold n bits.
func BitmapWords(n int) int { return (n + 63) / 64 }

// NewBitmap returns an empty bitmap with room for n bits.
func NewBitmap(n int) Bitmap { return make(Bitmap, BitmapWords(n)) }

// Set adds page i.
func (b Bitmap) Set(i int) { b[i>>6] |= 1 << (uint(i) & 63) }

// Clear removes page i.
func (b Bitmap) Clear(i int) { b[i>>6] &^= 1 << (uint(i) & 63) }

// Test reports whether page i is set.
func (b Bitmap) Test(i int) bool { return b[i>>6]&(1<<(uint(i)&63)) != 0 }

// Count returns the number of pages set.
func (b Bitmap) Count() int {
	n := 0
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return n
}

// Next returns the first page set at or after from, or -1 if there is none.
// Iterate with: for p := b.Next(0); p >= 0; p = b.Next(p + 1) { ... }
func (b Bitmap) Next(from int) int {
	if from < 0 {
		from = 0
	}
	i := from >> 6
	if i >= len(b) {
		return -1
	}
	w := b[i] >> (uint(from) & 63)
	if w != 0 {
		return from + bits.TrailingZeros64(w)
	}
	for i++; i < len(b); i++ {
		if b[i] != 0 {
			return i<<6 + bits.TrailingZeros64(b[i])
		}
	}
	return -1
}

// Or adds every page of o (which must not be longer than b) to b.
func (b Bitmap) Or(o Bitmap) {
	for i, w := range o {
		b[i] |= w
	}
}

// Reset removes every page.
func (b Bitmap) Reset() { clear(b) }

// SetAtomic adds page i with an atomic OR. A guest's writer calls it after
// it has finished writing the page, never before: see the dirty-log rule in
// the package documentation.
func (b Bitmap) SetAtomic(i int) { atomic.OrUint64(&b[i>>6], 1<<(uint(i)&63)) }

// Drain atomically takes every word of b, leaving it zero, and ORs it into
// dst, which must be at least as long as b. A page set concurrently by
// SetAtomic lands either in dst now or in b for the next Drain, never
// nowhere. It returns the number of pages moved.
func (b Bitmap) Drain(dst Bitmap) int {
	dst = dst[:len(b)] // one bounds check, and a clear panic if dst is short
	n := 0
	for i := range b {
		if atomic.LoadUint64(&b[i]) == 0 {
			continue // cheap skip: a bit set after this load is taken next time
		}
		w := atomic.SwapUint64(&b[i], 0)
		dst[i] |= w
		n += bits.OnesCount64(w)
	}
	return n
}
