package proc

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/migctl/migctl/guest"
	"golang.org/x/sys/unix"
)

// The received-page bitmap lives in a memfd that the guest process creates
// and both processes map MAP_SHARED, so it survives the death of the migctl
// process that writes it. Layout (little-endian):
//
//	0    8  magic "migctlRB"
//	8    4  version (1)
//	12   4  number of blocks n (1..MaxBlocks)
//	16+16i  8  pages of block i
//	24+16i  8  byte offset of block i's bitmap (8-aligned, ascending, within the memfd)
//	4096 ...   the bitmaps: one bit per page, as guest.Bitmap (bit p%64 of word p/64)
//
// Only migctl writes bits (atomic OR, after the page is installed); the
// guest process reads them (atomic loads) to report progress and to refuse
// operations that would read a hole.
const (
	bitmapMagic   = "migctlRB"
	bitmapVersion = 1
	bitmapHeader  = 4096
)

// bitmapLayout returns the memfd size and each block's bitmap offset.
func bitmapLayout(pages []int) (size int64, offsets []int64) {
	off := int64(bitmapHeader)
	for _, p := range pages {
		offsets = append(offsets, off)
		off += int64(guest.BitmapWords(p)) * 8
		off = (off + 63) &^ 63
	}
	pg := int64(unix.Getpagesize())
	return (off + pg - 1) / pg * pg, offsets
}

func writeBitmapHeader(mem []byte, pages []int, offsets []int64) {
	copy(mem[0:8], bitmapMagic)
	binary.LittleEndian.PutUint32(mem[8:12], bitmapVersion)
	binary.LittleEndian.PutUint32(mem[12:16], uint32(len(pages)))
	for i, p := range pages {
		binary.LittleEndian.PutUint64(mem[16+16*i:], uint64(p))
		binary.LittleEndian.PutUint64(mem[24+16*i:], uint64(offsets[i]))
	}
}

// parseBitmapHeader checks the header of a received-bitmap memory against
// the block layout the client expects (pages per block) and returns each
// block's bitmap offset. It bounds every number it reads by len(mem).
func parseBitmapHeader(mem []byte, pages []int) ([]int64, error) {
	bad := func(format string, args ...any) ([]int64, error) {
		return nil, fmt.Errorf("guest process: received bitmap: %s: %w", fmt.Sprintf(format, args...), ErrProtocol)
	}
	if len(mem) < bitmapHeader {
		return bad("%d bytes, shorter than its header", len(mem))
	}
	if string(mem[0:8]) != bitmapMagic {
		return bad("magic %q", mem[0:8])
	}
	if v := binary.LittleEndian.Uint32(mem[8:12]); v != bitmapVersion {
		return bad("version %d, want %d", v, bitmapVersion)
	}
	n := binary.LittleEndian.Uint32(mem[12:16])
	if n == 0 || n > MaxBlocks || int(n) != len(pages) {
		return bad("%d blocks, want %d", n, len(pages))
	}
	offsets := make([]int64, n)
	next := uint64(bitmapHeader)
	for i := range int(n) {
		p := binary.LittleEndian.Uint64(mem[16+16*i:])
		off := binary.LittleEndian.Uint64(mem[24+16*i:])
		if p != uint64(pages[i]) {
			return bad("block %d has %d pages, want %d", i, p, pages[i])
		}
		bytes := uint64(guest.BitmapWords(pages[i])) * 8
		if off%8 != 0 || off < next || off > uint64(len(mem)) || bytes > uint64(len(mem))-off {
			return bad("block %d bitmap at %d (%d bytes) does not fit in %d bytes after %d", i, off, bytes, len(mem), next)
		}
		offsets[i] = int64(off)
		next = off + bytes
	}
	return offsets, nil
}

// bitmapsOf returns the per-block bitmaps inside mem (which must stay
// mapped as long as they are used).
func bitmapsOf(mem []byte, pages []int, offsets []int64) []guest.Bitmap {
	out := make([]guest.Bitmap, len(pages))
	for i, p := range pages {
		w := guest.BitmapWords(p)
		if w == 0 {
			out[i] = guest.Bitmap{}
			continue
		}
		out[i] = unsafe.Slice((*uint64)(unsafe.Pointer(&mem[offsets[i]])), w)
	}
	return out
}
