package main

import (
	"fmt"
	"math/rand/v2"
	"os"
)

// Layouts of the QEMU guest's data (-layout).
const (
	// layoutSpread: random pages and zero pages interleaved evenly over
	// the guest's RAM above 1 MiB, as migctl's built-in guest spreads its
	// zero pages; QEMU's true downtime depends on it (machine-limits.md:
	// 172–229 ms spread, 3.8–4.9 ms contiguous).
	layoutSpread = "spread"
	// layoutContiguous: the random bytes in one run at 1 MiB, the rest of
	// RAM zero (../shared/tools/qemu-bench/mig.py's guest).
	layoutContiguous = "contiguous"
)

// guestDataAddr is where QEMU's loader device puts the data file: 1 MiB,
// above the BIOS area (mig.py's address).
const guestDataAddr = 1 << 20

// topReserve is RAM left alone at the top of the guest for the BIOS's
// high tables.
const topReserve = 1 << 20

// pageBytes is the guest page size.
const pageBytes = 4096

// dataPlan is the QEMU guest's data file: Length bytes loaded at
// guestDataAddr, of which RandomPages pages are random and the rest zero.
type dataPlan struct {
	Layout      string
	Length      int64 // bytes of the file
	RandomPages int64
}

// planData lays out randomBytes (a multiple of a page) of random data in a
// guest of size bytes.
func planData(size, randomBytes int64, layout string) (dataPlan, error) {
	span := size - guestDataAddr - topReserve
	if randomBytes <= 0 || randomBytes%pageBytes != 0 || randomBytes > span {
		return dataPlan{}, fmt.Errorf("%d random bytes do not fit a %d-byte guest between 1 MiB and 1 MiB below its top: use a larger -size or a larger -zero", randomBytes, size)
	}
	switch layout {
	case layoutContiguous:
		return dataPlan{Layout: layout, Length: randomBytes, RandomPages: randomBytes / pageBytes}, nil
	case layoutSpread:
		return dataPlan{Layout: layout, Length: span / pageBytes * pageBytes, RandomPages: randomBytes / pageBytes}, nil
	}
	return dataPlan{}, fmt.Errorf("-layout %q: want %s or %s", layout, layoutSpread, layoutContiguous)
}

// isRandom reports whether page i of the file holds random bytes: the
// RandomPages random pages are spread evenly over the file's pages (page i
// is random when ⌊(i+1)·R/P⌋ > ⌊i·R/P⌋), and fill it from the start in the
// contiguous layout.
func (p dataPlan) isRandom(i int64) bool {
	pages := p.Length / pageBytes
	if i < 0 || i >= pages {
		return false
	}
	return (i+1)*p.RandomPages/pages > i*p.RandomPages/pages
}

// write creates the data file at path: random pages written, zero pages
// left as holes.
func (p dataPlan) write(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	r := rand.NewChaCha8([32]byte{'q', 'e', 'm', 'u'})
	buf := make([]byte, 0, 4<<20)
	flushAt := int64(0) // file offset of buf[0]
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		_, err := f.WriteAt(buf, flushAt)
		buf = buf[:0]
		return err
	}
	page := make([]byte, pageBytes)
	pages := p.Length / pageBytes
	for i := int64(0); i < pages; i++ {
		if !p.isRandom(i) {
			if err := flush(); err != nil {
				f.Close()
				return err
			}
			continue
		}
		if len(buf) == 0 {
			flushAt = i * pageBytes
		}
		_, _ = r.Read(page)
		buf = append(buf, page...)
		if len(buf) == cap(buf) {
			if err := flush(); err != nil {
				f.Close()
				return err
			}
		}
	}
	if err := flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Truncate(p.Length); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// spotOffsets are the file offsets whose 16 bytes the QEMU run compares
// between source and destination: the first and last random page and
// evenly between, each rounded to a random page.
func (p dataPlan) spotOffsets(n int) []int64 {
	pages := p.Length / pageBytes
	var out []int64
	for k := 0; k < n; k++ {
		i := int64(k) * (pages - 1) / int64(max(n-1, 1))
		for i < pages && !p.isRandom(i) {
			i++
		}
		if i < pages {
			out = append(out, i*pageBytes+int64(k*24)%(pageBytes-16))
		}
	}
	return out
}
