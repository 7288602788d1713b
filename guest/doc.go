// Package guest defines what migctl migrates — the [Guest] an embedder
// implements — and provides [Builtin], a synthetic guest used by the demo,
// the tests and the benchmarks.
//
// # The Guest contract
//
// A Guest has RAM blocks ([Block]: a name, a page size and the bytes,
// ideally backed by a memfd so that another process can map the same
// pages), devices ([Device]: opaque state saved with the guest stopped and
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
// [New] builds a guest whose RAM is a memfd filled with a deterministic,
// self-verifying pattern; [NewDestination] builds the same layout with
// zeroed RAM, ready to receive. Writer goroutines ("vCPUs") rewrite whole
// pages at a configured rate while the guest runs, and three devices
// (timer, serial, nic) change state as they do. [Builtin.Verify] proves
// that every page is intact and in its place, and [Builtin.Checksum]
// proves that two guests hold the same RAM and device state.
//
// Guest RAM lives outside the Go heap (mmap), where the race detector does
// not look: writers and readers of guest pages race by design, exactly as
// vCPUs and a migration thread do. Every Go-heap structure here (dirty
// bitmaps, device state, counters) is synchronised and race-free.
package guest
