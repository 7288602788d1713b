package guest_test

import (
	"context"
	"log"
	"unsafe"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/postcopy"
	"github.com/migctl/migctl/uffd"
)

// vmm is an embedder's guest that can receive a postcopy migration: its
// vCPU process registered the RAM with a userfaultfd before any vCPU ran.
type vmm struct {
	*guest.Builtin
	uf       *uffd.FD
	received []guest.Bitmap // in memory the vCPU process owns
}

// Userfault hands migctl the registration: the descriptor, its features,
// where each block lives in the vCPU process, and the received bitmaps.
func (v *vmm) Userfault() (guest.Userfault, error) {
	u := guest.Userfault{FD: v.uf.Fd(), Features: uint64(v.uf.Features()), Received: v.received}
	for _, b := range v.Blocks() {
		u.Ranges = append(u.Ranges, guest.FaultRange{Addr: uint64(uintptr(unsafe.Pointer(&b.Mem[0]))), Len: uint64(len(b.Mem))})
	}
	return u, nil
}

// An embedder's side of postcopy, and migctl's. The embedder's vCPU
// process opens a userfaultfd and registers every block (MISSING) before
// any vCPU runs, and implements guest.Postcopier. migctl type-asserts the
// guest, builds the fault service from it, punches holes where nothing was
// received, serves faults, and installs arriving pages with Place.
//
// (Here both sides share one process for brevity, and nothing touches the
// registered memory. A real embedder runs its vCPUs in another process than
// the one that serves the faults — see package uffd, and package guest/proc
// for the built-in guest done that way.)
func ExamplePostcopier() {
	g, err := guest.NewDestination(guest.Config{Size: 4 << 20, Seed: 1})
	if err != nil {
		log.Fatal(err)
	}
	defer g.Close()
	uf, err := uffd.Open(uffd.Options{Features: uffd.FeatureMissingShmem})
	if err != nil {
		log.Fatal(err) // uffd.Probe says why
	}
	defer uf.Close() // the vCPU process keeps its copy for the guest's whole life
	v := &vmm{Builtin: g, uf: uf}
	for _, b := range g.Blocks() {
		r := uffd.Range{Start: uint64(uintptr(unsafe.Pointer(&b.Mem[0]))), Len: uint64(len(b.Mem))}
		if _, err := uf.Register(r, uffd.ModeMissing); err != nil {
			log.Fatal(err)
		}
		v.received = append(v.received, guest.NewBitmap(b.Pages()))
	}

	// migctl's side.
	var gg guest.Guest = v
	pc, ok := gg.(guest.Postcopier)
	if !ok {
		log.Fatal("this guest cannot do postcopy")
	}
	var svc *postcopy.Service
	svc, fd, err := postcopy.FromGuest(pc, postcopy.Options{Request: func(r postcopy.Request) {
		// send REQ_PAGES for r on the return path; pages arrive through svc.Place
	}})
	if err != nil {
		log.Fatal(err)
	}
	defer fd.Close()
	if _, err := svc.PunchHoles(); err != nil { // before the guest runs here
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go svc.Run(ctx)
	// ... start the guest; for each page that arrives: svc.Place(block, page, data)
}
