package guest_test

import (
	"fmt"
	"log"

	"github.com/migctl/migctl/guest"
)

// A migration in miniature: run a source, track its dirty pages, stop it,
// and move RAM and devices into a destination built from the same Config.
func Example() {
	cfg := guest.Config{Size: 8 << 20, DirtyRate: 20 << 20, Seed: 1, ZeroFraction: 0.1}
	src, err := guest.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()
	dst, err := guest.NewDestination(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer dst.Close()
	fmt.Println("same ID:", src.ID() == dst.ID())

	dirty := guest.NewBitmaps(src.Blocks())
	src.StartDirtyLog()
	if err := src.Start(); err != nil {
		log.Fatal(err)
	}
	for i, b := range src.Blocks() { // first pass while the writers run
		copy(dst.Blocks()[i].Mem, b.Mem)
	}
	if err := src.Stop(); err != nil { // switchover
		log.Fatal(err)
	}
	src.SyncDirty(dirty) // every page written since StartDirtyLog
	for i, b := range src.Blocks() {
		d := guest.Bitmap(dirty[i])
		for p := d.Next(0); p >= 0; p = d.Next(p + 1) {
			copy(dst.Blocks()[i].Page(p), b.Page(p))
		}
	}
	src.StopDirtyLog()
	for i, d := range src.Devices() {
		state, err := d.Save()
		if err != nil {
			log.Fatal(err)
		}
		if err := dst.Devices()[i].Load(state); err != nil {
			log.Fatal(err)
		}
	}

	a, _ := src.Checksum()
	b, _ := dst.Checksum()
	fmt.Println("verified:", dst.Verify() == nil, "checksums equal:", a == b)
	// Output:
	// same ID: true
	// verified: true checksums equal: true
}

// A destination prepared as QEMU's -mem-prealloc prepares one: check that
// the host has the memory, fault in all of RAM before listening, and report
// the preparation apart from the migration.
func ExampleNewDestination_prealloc() {
	cfg := guest.Config{Size: 16 << 20, Seed: 1, VRAM: -1, Prealloc: true}
	if err := guest.CheckMemory(cfg.Size); err != nil {
		log.Fatal(err) // e.g. "guest: need ... bytes ... but the host has ... available"
	}
	dst, err := guest.NewDestination(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer dst.Close()
	p := dst.Preparation()
	fmt.Println("backing:", p.Backing, "faulted in:", p.Bytes>>20, "MiB", "timed:", dst.PrepareTime() > 0)
	// Output:
	// backing: anon faulted in: 16 MiB timed: true
}
