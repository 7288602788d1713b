package guest

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// newMemfdBlock creates a block backed by a sealed memfd of size bytes,
// mapped shared and writable. Its pages are holes until first touched.
func newMemfdBlock(name string, size int64) (*Block, error) {
	fd, err := unix.MemfdCreate("migctl-guest:"+name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("guest: memfd_create for block %q: %w", name, err)
	}
	fail := func(what string, err error) (*Block, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("guest: %s for block %q (%d bytes): %w", what, name, size, err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return fail("ftruncate", err)
	}
	// Nobody may resize the file under a mapping: a shrink would turn
	// accesses into SIGBUS in every process that maps it.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
		return fail("sealing the memfd", err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("mmap", err)
	}
	return &Block{Name: name, PageSize: PageSize, Mem: mem, FD: fd}, nil
}

// release unmaps and closes a block created by newMemfdBlock.
func (b *Block) release() error {
	var errs []error
	if b.Mem != nil {
		if err := unix.Munmap(b.Mem); err != nil {
			errs = append(errs, fmt.Errorf("guest: munmap block %q: %w", b.Name, err))
		}
		b.Mem = nil
	}
	if b.FD >= 0 {
		if err := unix.Close(b.FD); err != nil {
			errs = append(errs, fmt.Errorf("guest: close memfd of block %q: %w", b.Name, err))
		}
		b.FD = -1
	}
	return errors.Join(errs...)
}

// populateChunk is how much Populate pre-faults per madvise call (and
// between two looks at its context). Each call holds the process's mmap
// lock for reading; anything that needs it for writing (the Go runtime
// growing its heap, so the control plane answering a query) waits behind
// it, and new page faults queue behind that writer. 512 KiB keeps each hold
// well under a millisecond: with 4 MiB chunks the destination's p99 QMP
// round trip during a load was 13 ms, with 512 KiB 3–6 ms
// (BenchmarkServeQueryLatency).
const populateChunk = 512 << 10

// Populate pre-faults every page of b for writing, without changing its
// contents: it asks the kernel (madvise MADV_POPULATE_WRITE) to allocate and
// map each page now, in 4 MiB steps, checking ctx between steps.
//
// Why: the first write to a fresh page costs a fault, about 16 µs per 4 KiB
// page on this kind of machine, which caps a receiver near 0.25 GB/s;
// populated memory takes writes at memcpy speed. The destination's loader
// runs Populate in its own goroutine while it receives: it is safe to run
// concurrently with writes into b.Mem, whose data it never alters (pages
// already present are skipped).
//
// It returns ctx's error if ctx ends first, and an error wrapping
// [ErrPopulateUnsupported] on kernels older than 5.14, where the caller can
// only carry on without pre-faulting (and should say so in benchmarks).
//
// Do not populate memory that postcopy will serve through userfaultfd
// (MISSING mode): populating fills every hole, so the guest would never
// fault and would read zeros.
func Populate(ctx context.Context, b *Block) error {
	mem := b.Mem
	for off := 0; off < len(mem); off += populateChunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		end := min(off+populateChunk, len(mem))
		for {
			err := unix.Madvise(mem[off:end], unix.MADV_POPULATE_WRITE)
			if err == unix.EINTR || err == unix.EAGAIN {
				continue
			}
			if err == unix.EINVAL {
				return fmt.Errorf("guest: populate block %q: %w", b.Name, ErrPopulateUnsupported)
			}
			if err != nil {
				return fmt.Errorf("guest: populate block %q at offset %#x: %w (out of memory?)", b.Name, off, err)
			}
			break
		}
	}
	return nil
}
