package postcopy

import (
	"fmt"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/uffd"
	"golang.org/x/sys/unix"
)

// FromGuest builds a service for a [guest.Postcopier]: it dups the guest's
// userfaultfd (the returned FD is the caller's to close after Run returns;
// the guest keeps its own), and makes one Region per block, with the
// guest's shared received bitmaps when it keeps them (a fresh local bitmap
// otherwise).
//
// The service uses the guest's memfds (PunchHoles) and received bitmaps,
// which may be mappings the guest releases in its Close: stop the service
// (Run returned) before closing the guest.
func FromGuest(g guest.Postcopier, opts Options) (*Service, *uffd.FD, error) {
	u, err := g.Userfault()
	if err != nil {
		return nil, nil, fmt.Errorf("postcopy: %w", err)
	}
	blocks := g.Blocks()
	if len(u.Ranges) != len(blocks) || (u.Received != nil && len(u.Received) != len(blocks)) {
		return nil, nil, fmt.Errorf("postcopy: the guest has %d blocks, %d fault ranges and %d received bitmaps", len(blocks), len(u.Ranges), len(u.Received))
	}
	if !uffd.Feature(u.Features).Has(uffd.FeatureMissingShmem) {
		return nil, nil, fmt.Errorf("postcopy: the guest's userfaultfd lacks %v (features %v)", uffd.FeatureMissingShmem, uffd.Feature(u.Features))
	}
	regions := make([]Region, len(blocks))
	for i, b := range blocks {
		if u.Ranges[i].Len != uint64(len(b.Mem)) {
			return nil, nil, fmt.Errorf("postcopy: block %q is %d bytes, its fault range %d", b.Name, len(b.Mem), u.Ranges[i].Len)
		}
		regions[i] = Region{Name: b.Name, Addr: u.Ranges[i].Addr, Len: u.Ranges[i].Len, PageSize: b.PageSize, MemFD: b.FD}
		if u.Received != nil {
			regions[i].Received = u.Received[i]
		} else {
			regions[i].Received = guest.NewBitmap(b.Pages())
		}
	}
	if opts.VCPUThreads == nil {
		opts.VCPUThreads = u.VCPUThreads
	}
	dup, err := unix.FcntlInt(uintptr(u.FD), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("postcopy: dup userfaultfd: %w", err)
	}
	fd, err := uffd.FromFD(dup, uffd.Feature(u.Features))
	if err != nil {
		return nil, nil, err
	}
	s, err := New(fd, regions, opts)
	if err != nil {
		fd.Close()
		return nil, nil, err
	}
	return s, fd, nil
}
