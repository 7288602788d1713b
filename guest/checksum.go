package guest

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Digest is the fingerprint of a stopped guest: a CRC-32C per RAM block and
// per device state. Two guests with equal digests hold the same RAM and
// device state (up to CRC collisions); comparing the parts says which block
// or device differs.
type Digest struct {
	Blocks  []PartSum
	Devices []PartSum
}

// PartSum is the CRC-32C of one block's bytes or one device's saved state.
type PartSum struct {
	Name string // block name, or device name.instance
	Size int    // bytes summed
	CRC  uint32
}

// Sum folds the digest into 64 bits: the high 32 bits cover RAM (names,
// sizes and per-block CRCs), the low 32 bits the devices.
func (d Digest) Sum() uint64 {
	fold := func(parts []PartSum) uint32 {
		var b []byte
		for _, p := range parts {
			b = append(b, p.Name...)
			b = append(b, 0)
			b = binary.LittleEndian.AppendUint64(b, uint64(p.Size))
			b = binary.LittleEndian.AppendUint32(b, p.CRC)
		}
		return crc32.Checksum(b, castagnoli)
	}
	return uint64(fold(d.Blocks))<<32 | uint64(fold(d.Devices))
}

// PageSum is the CRC-32C of one page. A block's CRC in a Digest is the
// CRC-32C of its pages' PageSums (little-endian, in page order), so a
// destination can compute the digest incrementally while pages land
// (DigestWithPageSums) instead of reading all of RAM again before it starts
// the guest.
func PageSum(page []byte) uint32 { return crc32.Checksum(page, castagnoli) }

// FoldPageSums returns the block CRC of a block whose pages have these
// PageSums.
func FoldPageSums(sums []uint32) uint32 {
	var buf [4 << 10]byte
	var crc uint32
	for len(sums) > 0 {
		n := min(len(sums), len(buf)/4)
		for i, v := range sums[:n] {
			binary.LittleEndian.PutUint32(buf[4*i:], v)
		}
		crc = crc32.Update(crc, castagnoli, buf[:4*n])
		sums = sums[n:]
	}
	return crc
}

// Digest computes the guest's [Digest]. It reads all of RAM (CRC-32C runs
// at memory speed, ~10 GB/s here) and saves every device. It is only
// meaningful on a stopped guest, so it returns [ErrRunning] otherwise, and
// [ErrClosed] after Close. The result does not depend on the process, so
// source and destination compare theirs.
func (g *Builtin) Digest() (Digest, error) {
	return g.digest(nil)
}

// DigestWithPageSums is Digest with the RAM part taken from pageSums (one
// slice of PageSums per block, as a loader kept them while writing pages)
// instead of reading RAM: cheap enough to run between the last page and
// Start.
func (g *Builtin) DigestWithPageSums(pageSums [][]uint32) (Digest, error) {
	if len(pageSums) != len(g.blocks) {
		return Digest{}, fmt.Errorf("guest: DigestWithPageSums: %d page-sum slices for %d blocks", len(pageSums), len(g.blocks))
	}
	for i, b := range g.blocks {
		if len(pageSums[i]) != b.Pages() {
			return Digest{}, fmt.Errorf("guest: DigestWithPageSums: block %s: %d sums for %d pages", b.Name, len(pageSums[i]), b.Pages())
		}
	}
	return g.digest(pageSums)
}

func (g *Builtin) digest(pageSums [][]uint32) (Digest, error) {
	if err := g.lockStopped("Digest"); err != nil {
		return Digest{}, err
	}
	defer g.mu.Unlock()
	var d Digest
	for i, b := range g.blocks {
		var sums []uint32
		if pageSums != nil {
			sums = pageSums[i]
		} else {
			sums = make([]uint32, b.Pages())
			_ = forChunks(len(sums), func(lo, hi int) error {
				for p := lo; p < hi; p++ {
					sums[p] = PageSum(b.Page(p))
				}
				return nil
			})
		}
		d.Blocks = append(d.Blocks, PartSum{Name: b.Name, Size: len(b.Mem), CRC: FoldPageSums(sums)})
	}
	for _, dev := range g.devices {
		s, err := dev.Save()
		if err != nil {
			return Digest{}, fmt.Errorf("guest: Digest: save %s: %w", dev.Name(), err)
		}
		d.Devices = append(d.Devices, PartSum{Name: fmt.Sprintf("%s.%d", dev.Name(), dev.Instance()), Size: len(s), CRC: crc32.Checksum(s, castagnoli)})
	}
	return d, nil
}

// Checksum returns Digest().Sum(): 64 bits covering all RAM (high half) and
// all device state (low half) of a stopped guest.
func (g *Builtin) Checksum() (uint64, error) {
	d, err := g.Digest()
	if err != nil {
		return 0, err
	}
	return d.Sum(), nil
}
