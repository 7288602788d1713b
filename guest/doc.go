// Package guest defines what migctl migrates — the [Guest] an embedder
// implements — and provides [Builtin], a synthetic guest used by the demo,
// the tests and the benchmarks.
//
// # The Guest contract
//
// A Guest has RAM blocks ([Block]: a name, a page size and the bytes; a
// memfd descriptor too when another process must map the same pages, as
// postcopy's vCPU process does: see [Postcopier]), devices ([Device]: opaque state saved with the guest stopped and
// loaded on the destination before it starts), a dirty log
// ([Guest.SyncDirty]) and a switch ([Guest.Stop], [Guest.Start]). A guest
// that can slow its writers also implements [Throttler].
//
// The outgoing engine relies on one property of the dirty log, and every
// implementation must keep it:
//
//	a writer sets a page's dirty bit AFTER it has written the page,
//	with an atomic OR (see [Bitmap.SetAtomic]).
//
// The sender drains the bits (SyncDirty) and only then reads the pages it
// found dirty. A write that is still in flight during a sync either has
// already set its bit, or sets it later and is reported by the next sync.
// The sender may therefore read a half-written page, but it is always sent
// again, and the last sync, taken after Stop has returned, leaves nothing
// behind. Setting the bit before writing would lose the write whenever the
// sender drained the bit and read the page between the two steps.
//
// # The built-in guest
//
// [New] builds a guest whose RAM is filled with a deterministic,
// self-verifying pattern; [NewDestination] builds the same layout with
// zeroed RAM, ready to receive. Writer goroutines ("vCPUs") rewrite whole
// pages at a configured rate while the guest runs, and three devices
// (timer, serial, nic) change state as they do. [Builtin.Verify] proves
// that every page is intact and in its place, and [Builtin.Checksum]
// proves that two guests hold the same RAM and device state.
//
// # Memory backing and preparation
//
// The guest's description decides, when it is built, what holds its RAM
// ([Config.Backing]) and whether it is faulted in up front
// ([Config.Prealloc]). The first write to a fresh page costs a page fault
// (3–16 µs per 4 KiB page on this project's machines, which return freed
// memory to their host), so a receiver writing into fresh memory is capped
// near 0.25–0.6 GB/s whatever its transport. Both choices are about that
// cost:
//
//   - [BackingAnon], the default: private anonymous memory, 2 MiB aligned
//     and advised with MADV_HUGEPAGE, as QEMU allocates guest RAM. Where
//     the host's transparent huge pages allow it (enabled = always or
//     madvise; see host.TransparentHugePages) the kernel faults it in 2 MiB
//     at a time: 512 times fewer faults. Only this process can map it
//     (Block.FD is -1).
//   - [BackingMemfd]: a sealed memfd mapped shared (Block.FD is the memfd),
//     for a guest whose RAM another process maps: the vCPU process of
//     postcopy (package guest/proc always uses it). A memfd is shmem, which
//     gets huge pages only if shmem_enabled allows; on this project's
//     machines it is "never", so a memfd is faulted in 4 KiB at a time.
//     Measured here (BenchmarkPrepare, 2 GiB, both cores): faulting in all
//     of it takes about 0.14 s anonymous with THP and 0.7–1.3 s on a memfd
//     (QEMU 7.2's -mem-prealloc of 2 GiB anonymous THP memory: 0.34–0.39 s).
//
// With Prealloc, New and NewDestination fault in every page before they
// return, as QEMU's -mem-prealloc does (MADV_POPULATE_WRITE from every
// core; on kernels before 5.14, by touching each page), after checking
// that the host has the memory ([CheckMemory]). [Builtin.Preparation] says
// how long that took and how much of it the kernel mapped with huge pages;
// report [Builtin.PrepareTime] apart from a migration's time. Without
// Prealloc, pages fault in as they are first written; a destination's
// loader overlaps that with receiving by running [Populate]. A postcopy
// destination must not be preallocated: its holes are what userfaultfd
// catches.
//
// Guest RAM lives outside the Go heap (mmap), where the race detector does
// not look: writers and readers of guest pages race by design, exactly as
// vCPUs and a migration thread do. Every Go-heap structure here (dirty
// bitmaps, device state, counters) is synchronised and race-free.
package guest
