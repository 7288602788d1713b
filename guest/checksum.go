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

// Digest computes the guest's [Digest]. It reads all of RAM (CRC-32C runs
// at memory speed, ~10 GB/s here) and saves every device. It is only
// meaningful on a stopped guest, so it returns [ErrRunning] otherwise, and
// [ErrClosed] after Close. The result does not depend on the process, so
// source and destination compare theirs.
func (g *Builtin) Digest() (Digest, error) {
	if err := g.lockStopped("Digest"); err != nil {
		return Digest{}, err
	}
	defer g.mu.Unlock()
	var d Digest
	for _, b := range g.blocks {
		d.Blocks = append(d.Blocks, PartSum{Name: b.Name, Size: len(b.Mem), CRC: crc32.Checksum(b.Mem, castagnoli)})
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
