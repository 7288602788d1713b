package guest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
)

// The page format of the built-in guest.
//
// A page is either all zero (a "zero page": which pages are zero follows
// from the seed and Config.ZeroFraction, and writers never touch them) or a
// "data page":
//
//	bytes 0..3   page number within its block (uint32, little-endian)
//	bytes 4..7   version (uint32, little-endian): 1 after New, +1 per rewrite
//	bytes 8..    words derived from (seed, block index, page, version)
//
// The body is a pure function of the header and the guest's content rule,
// so a page proves itself: a torn page (header of one version, body of
// another), a page from another offset, block or seed, a lost page (zeros
// where data belongs) and a stray write all fail [Builtin.Verify].
//
// Random content draws every body word from the version's stream.
// Compressible content masks words to 0x0000ffff0000ffff (half the bytes
// zero) and draws only every eighth word from the version's stream, the rest
// from a per-page stream that never changes, so a rewrite changes 1/8 of the
// page.

const (
	pageWords = PageSize / 8
	compMask  = 0x0000ffff0000ffff
	tagBase   = 0x6261736520202020 // "base    ": the versionless stream
	tagZero   = 0x7a65726f20202020 // "zero    ": the zero-page choice
)

var zeroPage [PageSize]byte

// mix64 is the splitmix64 finaliser: a bijective 64-bit mixer.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// wyrand is a small, fast generator (one 128-bit multiply per word).
type wyrand uint64

func (s *wyrand) next() uint64 {
	*s += 0xa0761d6478bd642f
	hi, lo := bits.Mul64(uint64(*s), uint64(*s)^0xe7037ed1a0b428db)
	return hi ^ lo
}

// below returns a uniform value in [0, n).
func (s *wyrand) below(n uint64) uint64 {
	hi, _ := bits.Mul64(s.next(), n)
	return hi
}

// content is the rule that says what each page should hold.
type content struct {
	seed      uint64
	random    bool
	zeroAll   bool   // ZeroFraction == 1
	zeroBelow uint64 // a page is zero if its hash < zeroBelow
}

func newContent(c *Config) content {
	ct := content{seed: c.Seed, random: c.Random}
	switch f := c.ZeroFraction; {
	case f >= 1:
		ct.zeroAll = true
	case f > 0:
		t := math.Ldexp(f, 64)
		if t >= math.Ldexp(1, 64) {
			ct.zeroAll = true
		} else {
			ct.zeroBelow = uint64(t)
		}
	}
	return ct
}

func (ct *content) key(block, page int, v uint64) uint64 {
	k := mix64(ct.seed + 0x9e3779b97f4a7c15)
	k = mix64(k ^ uint64(block))
	k = mix64(k ^ uint64(page))
	return mix64(k ^ v)
}

// isZero reports whether (block, page) is a zero page.
func (ct *content) isZero(block, page int) bool {
	if ct.zeroAll {
		return true
	}
	return ct.zeroBelow != 0 && ct.key(block, page, tagZero) < ct.zeroBelow
}

// body generates the expected body word by word, calling emit(k, w) for
// k = 1..pageWords-1; emit returns false to stop early.
func (ct *content) body(block, page int, version uint32, emit func(k int, w uint64) bool) {
	vs := wyrand(ct.key(block, page, uint64(version)))
	if ct.random {
		for k := 1; k < pageWords; k++ {
			if !emit(k, vs.next()) {
				return
			}
		}
		return
	}
	bs := wyrand(ct.key(block, page, tagBase))
	for k := 1; k < pageWords; k++ {
		var w uint64
		if k%8 == 0 {
			w = vs.next()
		} else {
			w = bs.next()
		}
		if !emit(k, w&compMask) {
			return
		}
	}
}

// fill writes the data page (block, page, version) into p. The header goes
// in last; the order does not matter to the dirty log, whose bit is set by
// the caller after fill returns.
func (ct *content) fill(p []byte, block, page int, version uint32) {
	p = p[:PageSize]
	if ct.random {
		// The hot path, kept free of closures.
		vs := wyrand(ct.key(block, page, uint64(version)))
		for off := 8; off < PageSize; off += 8 {
			binary.LittleEndian.PutUint64(p[off:off+8], vs.next())
		}
	} else {
		vs := wyrand(ct.key(block, page, uint64(version)))
		bs := wyrand(ct.key(block, page, tagBase))
		for off := 8; off < PageSize; off += 8 {
			var w uint64
			if off%64 == 0 {
				w = vs.next()
			} else {
				w = bs.next()
			}
			binary.LittleEndian.PutUint64(p[off:off+8], w&compMask)
		}
	}
	binary.LittleEndian.PutUint64(p[0:8], uint64(page)|uint64(version)<<32)
}

// header returns the page number and version a data page claims.
func header(p []byte) (page uint32, version uint32) {
	h := binary.LittleEndian.Uint64(p[:8])
	return uint32(h), uint32(h >> 32)
}

// check returns "" if p is what (block, page) should hold, or why not and
// the byte offset within the page of the first difference.
func (ct *content) check(p []byte, block, page int) (at int, why string) {
	p = p[:PageSize]
	if ct.isZero(block, page) {
		if bytes.Equal(p, zeroPage[:]) {
			return 0, ""
		}
		at = firstNonZero(p)
		return at, fmt.Sprintf("a zero page holds data (byte %d is %#02x): a stray write or a page stored at the wrong offset", at, p[at])
	}
	if bytes.Equal(p, zeroPage[:]) {
		return 0, "a data page is all zeros: the page was lost (never received or zeroed)"
	}
	hp, v := header(p)
	if int64(hp) != int64(page) {
		return 0, fmt.Sprintf("header names page %d (version %d): a page stored at the wrong offset, or from another block or guest", hp, v)
	}
	at = -1
	var want uint64
	ct.body(block, page, v, func(k int, w uint64) bool {
		if binary.LittleEndian.Uint64(p[k*8:k*8+8]) != w {
			at, want = k*8, w
			return false
		}
		return true
	})
	if at < 0 {
		return 0, ""
	}
	var wb [8]byte
	binary.LittleEndian.PutUint64(wb[:], want)
	for i := range 8 {
		if p[at+i] != wb[i] {
			at += i
			return at, fmt.Sprintf("byte %d is %#02x, want %#02x for version %d: a torn or corrupted page, or data from a guest with another seed or content mode", at, p[at], wb[i], v)
		}
	}
	return at, fmt.Sprintf("word at byte %d differs for version %d", at, v) // not reached: some byte of the word differs
}

func firstNonZero(p []byte) int {
	for i, c := range p {
		if c != 0 {
			return i
		}
	}
	return -1
}

// VerifyError reports the first page that [Builtin.Verify] found wrong.
type VerifyError struct {
	Block  string // block name
	Page   int    // page number within the block
	Offset int64  // byte offset of the page within the block
	At     int    // byte offset within the page of the first difference
	Reason string // what differs, and the likely cause
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("guest: verify: %s page %d (offset %#x), byte %d: %s", e.Block, e.Page, e.Offset, e.At, e.Reason)
}

// chunkPages is the unit of parallel work for fill and verify (4 MiB).
const chunkPages = 1024

// forChunks calls fn on [lo, hi) chunks covering [0, n) from up to
// GOMAXPROCS goroutines, and returns the error of the lowest failing chunk.
// Chunks above a failed one are skipped.
func forChunks(n int, fn func(lo, hi int) error) error {
	chunks := (n + chunkPages - 1) / chunkPages
	workers := min(runtime.GOMAXPROCS(0), chunks)
	if workers <= 1 {
		for lo := 0; lo < n; lo += chunkPages {
			if err := fn(lo, min(lo+chunkPages, n)); err != nil {
				return err
			}
		}
		return nil
	}
	var (
		next    atomic.Int64
		failed  atomic.Int64 // lowest failed chunk, or chunks
		mu      sync.Mutex   // guards errs
		errs    = map[int]error{}
		wg      sync.WaitGroup
		minFail = func(c int) {
			for {
				cur := failed.Load()
				if int64(c) >= cur || failed.CompareAndSwap(cur, int64(c)) {
					return
				}
			}
		}
	)
	failed.Store(int64(chunks))
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c := int(next.Add(1) - 1)
				if c >= chunks || int64(c) > failed.Load() {
					return
				}
				lo := c * chunkPages
				if err := fn(lo, min(lo+chunkPages, n)); err != nil {
					mu.Lock()
					errs[c] = err
					mu.Unlock()
					minFail(c)
				}
			}
		}()
	}
	wg.Wait()
	if f := int(failed.Load()); f < chunks {
		return errs[f]
	}
	return nil
}
