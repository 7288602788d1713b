package guest

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// HugePageSize is the size of a transparent huge page on x86-64 (one PMD):
// the unit in which the kernel faults in anonymous memory advised with
// MADV_HUGEPAGE, and the alignment of an anonymous block.
const HugePageSize = 2 << 20

// newBlock creates a block of size bytes with the given backing
// (BackingAnon or BackingMemfd; validated by Config).
func newBlock(name string, size int64, backing string) (*Block, error) {
	if backing == BackingMemfd {
		return newMemfdBlock(name, size)
	}
	return newAnonBlock(name, size)
}

// newAnonBlock creates a block of private anonymous memory advised with
// MADV_HUGEPAGE, as QEMU allocates guest RAM without a memory backend file:
// the kernel then faults it in 2 MiB huge pages (where
// /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise"),
// 512 times fewer faults than in 4 KiB pages. A huge page needs a 2 MiB
// aligned virtual range, so a block of 2 MiB or more is placed at a 2 MiB
// boundary: map 2 MiB more than needed and unmap the unaligned head and
// tail (untouched anonymous memory costs nothing). Its FD is -1.
func newAnonBlock(name string, size int64) (*Block, error) {
	length := uintptr(size)
	extra := uintptr(0)
	if size >= HugePageSize {
		extra = HugePageSize
	}
	p, err := unix.MmapPtr(-1, 0, nil, length+extra, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("guest: mmap %d bytes of anonymous memory for block %q: %w", size, name, err)
	}
	start := p
	if extra > 0 {
		head := -uintptr(p) & (HugePageSize - 1) // bytes up to the next 2 MiB boundary
		start = unsafe.Add(p, head)
		if head > 0 {
			if err := unix.MunmapPtr(p, head); err != nil {
				_ = unix.MunmapPtr(p, length+extra)
				return nil, fmt.Errorf("guest: trimming the mapping of block %q: %w", name, err)
			}
		}
		if tail := extra - head; tail > 0 {
			if err := unix.MunmapPtr(unsafe.Add(start, length), tail); err != nil {
				_ = unix.MunmapPtr(start, length+tail)
				return nil, fmt.Errorf("guest: trimming the mapping of block %q: %w", name, err)
			}
		}
	}
	mem := unsafe.Slice((*byte)(start), int(size))
	b := &Block{Name: name, PageSize: PageSize, Mem: mem, FD: -1}
	// EINVAL: a kernel without transparent huge pages. The block still
	// works, in 4 KiB pages; HugePageBytes then reports 0.
	if err := unix.Madvise(mem, unix.MADV_HUGEPAGE); err != nil && err != unix.EINVAL {
		_ = b.release()
		return nil, fmt.Errorf("guest: madvise(MADV_HUGEPAGE) on block %q: %w", name, err)
	}
	return b, nil
}

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
	p, err := unix.MmapPtr(fd, 0, nil, uintptr(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("mmap", err)
	}
	return &Block{Name: name, PageSize: PageSize, Mem: unsafe.Slice((*byte)(p), int(size)), FD: fd}, nil
}

// release unmaps and closes a block created by newBlock.
func (b *Block) release() error {
	var errs []error
	if b.Mem != nil {
		if err := unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b.Mem)), uintptr(len(b.Mem))); err != nil {
			errs = append(errs, fmt.Errorf("guest: munmap block %q: %w", b.Name, err))
		}
	}
	b.Mem = nil
	if b.FD >= 0 {
		if err := unix.Close(b.FD); err != nil {
			errs = append(errs, fmt.Errorf("guest: close memfd of block %q: %w", b.Name, err))
		}
		b.FD = -1
	}
	return errors.Join(errs...)
}

// populateChunk is how much Populate (and Prealloc) pre-faults per madvise
// call, and between two looks at Populate's context. Each call holds the
// process's mmap lock for reading; anything that needs it for writing (the
// Go runtime growing its heap, so the control plane answering a query)
// waits behind it, and new page faults queue behind that writer. 512 KiB
// keeps each hold well under a millisecond: with 4 MiB chunks the
// destination's p99 QMP round trip during a load was 13 ms, with 512 KiB
// 3–6 ms (BenchmarkServeQueryLatency, memfd RAM).
//
// Steps end on 512 KiB boundaries of the address space (see stepEnd), so
// with transparent huge pages a call never straddles two huge pages: the
// first of the four calls in a 2 MiB page faults in all of it (the kernel
// allocates and zeroes 2 MiB at once), the other three find it mapped.
// Measured with BenchmarkPopulateLockHold (1 GiB, -benchtime 1x, 2–5 runs
// per row, 2 vCPU, Linux 6.18), the duration of one call, which bounds
// how long it holds the lock:
//
//	backing            step     call p50        call p99      throughput
//	anon + THP         512 KiB  1.6–2.1 µs      340–750 µs    6.5–11 GB/s
//	anon + THP         2 MiB    118–215 µs      390–850 µs    7.6–13 GB/s
//	anon + THP         4 MiB    450 µs          1–3.3 ms      7–10 GB/s
//	memfd (4 KiB)      512 KiB  140–260 µs      1.2–6 ms      0.7–2.4 GB/s
//	memfd (4 KiB)      2 MiB    1–2 ms          2.8–20 ms     0.7–2 GB/s
//	memfd (4 KiB)      4 MiB    2.3–3.5 ms      7–34 ms       0.8–1.7 GB/s
//
// On THP memory 512 KiB and 2 MiB steps hold the lock alike (one huge page
// fault per call at worst) at the same speed; on 4 KiB-page memory every
// step larger than 512 KiB holds it longer for no gain. The writer's own
// waits (mmap+munmap every 200 µs, also reported) follow the calls under
// heavy machine noise: stalls of 5–50 ms turn up in every row. So one
// step, 512 KiB, serves both backings.
const populateChunk = 512 << 10

// populateStep is populateChunk; tests and BenchmarkPopulateLockHold
// change it.
var populateStep = populateChunk

// populateAdvice is madvise(MADV_POPULATE_WRITE); tests replace it to
// exercise the fallback of kernels without it.
var populateAdvice = func(mem []byte) error { return unix.Madvise(mem, unix.MADV_POPULATE_WRITE) }

// Populate pre-faults every page of b for writing, without changing its
// contents: it asks the kernel (madvise MADV_POPULATE_WRITE) to allocate and
// map each page now, in 512 KiB steps, checking ctx between steps.
//
// Why: the first write to a fresh page costs a fault, 3–16 µs per 4 KiB
// page on this kind of machine, which caps a receiver near 0.25–0.6 GB/s;
// populated memory takes writes at memcpy speed. Anonymous memory advised
// with MADV_HUGEPAGE (the default backing, [BackingAnon]) is faulted in
// 2 MiB at a time, which makes Populate several times faster there than on
// a memfd ([BackingMemfd]: 4 KiB pages on hosts whose shmem gets no huge
// pages). The destination's loader runs Populate in its own goroutine while
// it receives: it is safe to run concurrently with writes into b.Mem, whose
// data it never alters (pages already present are skipped).
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
	for off := 0; off < len(mem); {
		if err := ctx.Err(); err != nil {
			return err
		}
		end := min(stepEnd(mem, off, populateStep), len(mem))
		if err := populateRange(mem[off:end]); err != nil {
			if errors.Is(err, ErrPopulateUnsupported) {
				return fmt.Errorf("guest: populate block %q: %w", b.Name, err)
			}
			return fmt.Errorf("guest: populate block %q at offset %#x: %w (out of memory?)", b.Name, off, err)
		}
		off = end
	}
	return nil
}

// stepEnd returns the offset in mem of the first step boundary after off:
// the next multiple of step in the address space, so that steps line up
// with huge pages whatever the block's alignment.
func stepEnd(mem []byte, off, step int) int {
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(mem))) + uintptr(off)
	next := (addr + uintptr(step)) &^ uintptr(step-1)
	return off + int(next-addr)
}

// populateRange is one MADV_POPULATE_WRITE call, retried on EINTR/EAGAIN.
func populateRange(mem []byte) error {
	for {
		err := populateAdvice(mem)
		switch err {
		case nil:
			return nil
		case unix.EINTR, unix.EAGAIN:
			continue
		case unix.EINVAL:
			return ErrPopulateUnsupported
		}
		return err
	}
}

// preallocThreads is how many goroutines preallocate uses; 0 means
// GOMAXPROCS. BenchmarkPrepare sets 1 to compare.
var preallocThreads = 0

// preallocate faults in every page of blocks before anybody else can see
// them, as QEMU's -mem-prealloc does: MADV_POPULATE_WRITE in populateChunk
// steps, split between GOMAXPROCS goroutines (QEMU too touches pages from
// several threads; the faults of different pages proceed in parallel under
// the shared mmap lock). On a kernel without MADV_POPULATE_WRITE it falls
// back, like QEMU, to writing one zero byte per page: the memory is fresh
// (all zeros) and nobody else holds it yet, so the write changes nothing.
// It returns the method used: "madvise" or "touch".
func preallocate(blocks []*Block) (string, error) {
	type span struct {
		b      *Block
		lo, hi int
	}
	var spans []span
	for _, b := range blocks {
		for off := 0; off < len(b.Mem); {
			end := min(stepEnd(b.Mem, off, populateStep), len(b.Mem))
			spans = append(spans, span{b, off, end})
			off = end
		}
	}
	var (
		next     int
		mu       sync.Mutex // guards next, touch and firstErr
		touch    bool
		firstErr error
		wg       sync.WaitGroup
	)
	take := func() (span, bool, bool) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr != nil || next == len(spans) {
			return span{}, false, false
		}
		next++
		return spans[next-1], touch, true
	}
	threads := preallocThreads
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	for range min(threads, max(1, len(spans))) {
		wg.Go(func() {
			for {
				s, useTouch, ok := take()
				if !ok {
					return
				}
				mem := s.b.Mem[s.lo:s.hi]
				if !useTouch {
					err := populateRange(mem)
					if errors.Is(err, ErrPopulateUnsupported) {
						mu.Lock()
						touch = true
						mu.Unlock()
						useTouch = true
					} else if err != nil {
						mu.Lock()
						if firstErr == nil {
							firstErr = fmt.Errorf("guest: preallocating block %q at offset %#x: %w (out of memory?)", s.b.Name, s.lo, err)
						}
						mu.Unlock()
						return
					}
				}
				if useTouch {
					for i := 0; i < len(mem); i += PageSize {
						mem[i] = 0
					}
				}
			}
		})
	}
	wg.Wait()
	if touch {
		return PrepareTouch, firstErr
	}
	return PrepareMadvise, firstErr
}
