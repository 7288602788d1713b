package guest

import "encoding/binary"

// IsZeroPage reports whether page p of block b (indexes into Blocks) is one
// of the guest's zero pages: all zero from New on and never written, so
// that reading zeros there is right. For every other page, reading all
// zeros means the page was lost. It depends only on the Config, not on
// memory, so it is safe to call for a page that has not arrived.
func (g *Builtin) IsZeroPage(b, p int) bool { return g.content.isZero(b, p) }

// LostPage reports whether page (PageSize bytes) holds all zeros where page
// p of block b should hold data: the symptom of a page that was never
// received (a hole read as zeros). A data page is never all zeros at any
// instant, even while a writer rewrites it, so a reader running beside the
// writers may call it on the live page.
//
// It reads page with plain loads, never through the runtime's memequal or
// memmove, so it may be the first touch of a page registered with
// userfaultfd: a fault there is at an ordinary, preemptible instruction (see
// package uffd on faults inside runtime code).
func (g *Builtin) LostPage(b, p int, page []byte) bool {
	if g.content.isZero(b, p) {
		return false
	}
	page = page[:PageSize]
	var acc uint64
	for i := 0; i < PageSize; i += 8 {
		acc |= binary.LittleEndian.Uint64(page[i:])
	}
	return acc == 0
}
