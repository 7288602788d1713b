package guest

import (
	"fmt"
	"time"
)

// Methods of [Preparation.Method].
const (
	// PrepareMadvise: faulted in with madvise(MADV_POPULATE_WRITE).
	PrepareMadvise = "madvise"
	// PrepareTouch: the kernel lacks MADV_POPULATE_WRITE (before Linux
	// 5.14), so each page was faulted in by writing a zero byte into it, as
	// QEMU does there (the memory is fresh and unshared, so nothing
	// changes).
	PrepareTouch = "touch"
)

// Preparation says how a built-in guest's RAM was prepared when it was
// built: its backing, and with Config.Prealloc, how it was faulted in and
// what the kernel gave.
type Preparation struct {
	// Backing is Config.Backing with the default applied: [BackingAnon] or
	// [BackingMemfd].
	Backing string
	// Prealloc is Config.Prealloc. The fields below are zero without it
	// (HugeBytes is -1).
	Prealloc bool
	// Method is [PrepareMadvise] or [PrepareTouch].
	Method string
	// Time is how long faulting in all of RAM took: the clock starts just
	// before the first page is faulted in and stops when the last one is,
	// after the mappings exist and before the source's fill (so it excludes
	// mmap, memfd creation and the pattern). It is what QEMU's
	// -mem-prealloc costs at start-up, before any migration can begin.
	Time time.Duration
	// Bytes is the RAM faulted in: every block.
	Bytes int64
	// HugeBytes is how many of those bytes the kernel mapped with huge
	// pages, read from /proc/self/smaps (AnonHugePages + ShmemPmdMapped of
	// the blocks' mappings) right after Time was taken; -1 if unknown.
	// Equal to Bytes (less any block smaller than 2 MiB) when transparent
	// huge pages worked; 0 on a memfd where shmem gets none.
	HugeBytes int64
}

// preallocate faults in all of RAM (Config.Prealloc) and records it. Called
// by build before the guest is returned, so nothing else holds the memory.
func (g *Builtin) preallocate() error {
	p := &g.prep
	p.Prealloc = true
	for _, b := range g.blocks {
		p.Bytes += int64(len(b.Mem))
	}
	start := time.Now()
	method, err := preallocate(g.blocks)
	p.Time = time.Since(start)
	p.Method = method
	if err != nil {
		return err
	}
	if huge, err := g.hugeBytes(); err == nil {
		p.HugeBytes = huge
	}
	return nil
}

// hugeBytes sums hugeMapped over the blocks.
func (g *Builtin) hugeBytes() (int64, error) {
	ranges := make([]addrRange, len(g.blocks))
	for i, b := range g.blocks {
		ranges[i] = blockRange(b)
	}
	per, err := hugeMapped(ranges)
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, n := range per {
		sum += n
	}
	return sum, nil
}

// Preparation reports how the guest's RAM was prepared when it was built.
func (g *Builtin) Preparation() Preparation { return g.prep }

// PrepareTime is how long faulting in all of RAM took when the guest was
// built with Config.Prealloc ([Preparation.Time]), 0 without it. Report it
// apart from the migration's time, as QEMU's -mem-prealloc happens before
// the destination listens.
func (g *Builtin) PrepareTime() time.Duration { return g.prep.Time }

// HugePageBytes reads now, from /proc/self/smaps, how many bytes of the
// guest's RAM the kernel maps with huge pages (see [Preparation.HugeBytes]).
// It reads the kernel's page tables for the whole process: call it to
// report, not on a hot path.
func (g *Builtin) HugePageBytes() (int64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, fmt.Errorf("guest: HugePageBytes: %w", ErrClosed)
	}
	return g.hugeBytes()
}
