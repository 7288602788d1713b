package main

import (
	"context"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Values of -backing, as guest.Config.Backing spells them.
const (
	backingAnon  = "anon"
	backingMemfd = "memfd"
)

// hugePage is the size of a transparent huge page on x86-64.
const hugePage = 2 << 20

// region is guest-RAM-like memory the receiver reads into.
type region struct {
	Mem   []byte
	unmap func() error
}

// Close unmaps the region.
func (r *region) Close() error { return r.unmap() }

// mapRegion maps size bytes as migctl's guest package backs RAM:
// anonymous private memory, 2 MiB aligned and advised MADV_HUGEPAGE (as
// QEMU allocates RAM), or a shared memfd (4 KiB shmem pages where
// shmem_enabled is never).
func mapRegion(size int64, backing string) (*region, error) {
	if size <= 0 || size%pageSize != 0 {
		return nil, fmt.Errorf("region of %d bytes: want a positive multiple of %d", size, pageSize)
	}
	switch backing {
	case backingAnon:
		length := uintptr(size) + hugePage
		p, err := unix.MmapPtr(-1, 0, nil, length, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return nil, fmt.Errorf("mmap %d bytes of anonymous memory: %w", size, err)
		}
		start := unsafe.Add(p, -uintptr(p)&(hugePage-1))
		mem := unsafe.Slice((*byte)(start), size)
		if err := unix.Madvise(mem, unix.MADV_HUGEPAGE); err != nil && !errors.Is(err, unix.EINVAL) {
			_ = unix.MunmapPtr(p, length)
			return nil, fmt.Errorf("madvise(MADV_HUGEPAGE): %w", err)
		}
		return &region{Mem: mem, unmap: func() error { return unix.MunmapPtr(p, length) }}, nil
	case backingMemfd:
		fd, err := unix.MemfdCreate("rawcopy", unix.MFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("memfd_create: %w", err)
		}
		if err := unix.Ftruncate(fd, size); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("ftruncate the memfd to %d bytes: %w", size, err)
		}
		mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("mmap the memfd: %w", err)
		}
		return &region{Mem: mem, unmap: func() error {
			return errors.Join(unix.Munmap(mem), unix.Close(fd))
		}}, nil
	default:
		return nil, usageError{fmt.Sprintf("-backing %q: want %s or %s", backing, backingAnon, backingMemfd)}
	}
}

// prefaultStep is how much one MADV_POPULATE_WRITE covers, so that ctx is
// checked between steps.
const prefaultStep = 64 << 20

// prefault faults every page of mem in for writing (MADV_POPULATE_WRITE,
// Linux 5.14; else one write per page), as -mem-prealloc does.
func prefault(ctx context.Context, mem []byte) error {
	for off := 0; off < len(mem); off += prefaultStep {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("pre-fault the region: %w", context.Cause(ctx))
		}
		part := mem[off:min(off+prefaultStep, len(mem))]
		if err := unix.Madvise(part, unix.MADV_POPULATE_WRITE); err != nil {
			if !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w", err)
			}
			for i := 0; i < len(part); i += pageSize {
				part[i] = 0
			}
		}
	}
	return nil
}
