package guest

// Postcopier is implemented by a guest that can start on the destination
// before all of its RAM has arrived (postcopy). It is optional: migctl
// type-asserts a [Guest] to it, and refuses postcopy for a guest that does
// not implement it.
//
// What the guest promises:
//
//   - Every block's Mem is backed by a memfd ([Block.FD] >= 0), mapped
//     MAP_SHARED by the process that runs the vCPUs (the "vCPU process",
//     which may be another process than migctl's), so that migctl maps the
//     same pages through its own, unregistered mapping.
//   - Before any vCPU runs on the destination, the vCPU process opened a
//     userfaultfd (UFFDIO_API with at least UFFD_FEATURE_MISSING_SHMEM) and
//     registered every block for MISSING faults. It keeps its own copy of
//     the descriptor open until the guest ends: if every copy were closed,
//     faults on pages not yet received would silently read zeros; with the
//     guest's copy open, a vCPU that touches a missing page blocks until a
//     handler (migctl, or a migctl that re-attached) installs it.
//   - No Go code of migctl's process touches registered memory of that
//     process (see package uffd): a goroutine faulting inside the Go
//     runtime can deadlock the process. The built-in guest therefore runs
//     its vCPUs in a separate process (package guest/proc).
//
// What migctl does with it: before the guest runs it writes precopy pages
// into Mem and marks them in Received; at the switch to postcopy it punches
// a hole for every page not in Received, then reads the userfaultfd's
// fault messages and installs every later page only with UFFDIO_COPY or
// UFFDIO_ZEROPAGE, at the addresses of [Userfault.Ranges]. It never reads a
// missing page through Mem.
type Postcopier interface {
	Guest
	// Userfault returns the registration. The descriptor stays owned by the
	// guest: the caller dups it (or uses it only until the guest's Close).
	Userfault() (Userfault, error)
}

// Userfault describes the userfaultfd a [Postcopier]'s vCPU process
// registered over its RAM.
type Userfault struct {
	// FD is the userfaultfd, usable from the caller's process.
	FD int
	// Features are the UFFD_FEATURE_* bits the vCPU process enabled with
	// UFFDIO_API (UFFD_FEATURE_THREAD_ID adds the faulting thread to each
	// message, which per-vCPU blocktime needs).
	Features uint64
	// Ranges says where each block (same order as Blocks) is mapped in the
	// vCPU process: the addresses a fault message carries and UFFDIO_COPY
	// takes.
	Ranges []FaultRange
	// Received is, per block, the bitmap of pages that have been installed
	// (one bit per page, as [Bitmap]). Whoever installs a page sets its bit
	// with [Bitmap.SetAtomic] after the page is complete, never before, so
	// a set bit always means the page is present. When the guest keeps it in
	// memory that outlives migctl's process (shared memory owned by the
	// vCPU process), a migctl that re-attaches after a crash rebuilds what
	// was received from it without reading a single hole. nil: the guest
	// keeps none, and migctl keeps its own.
	Received []Bitmap
	// VCPUThreads are the thread ids of the vCPU process's vCPU threads,
	// when they are fixed threads (for QEMU's per-vCPU blocktime); nil if
	// the vCPUs are not pinned to threads.
	VCPUThreads []int
}

// FaultRange is where one block is mapped in the vCPU process.
type FaultRange struct {
	Addr uint64 // first byte of the block's mapping (page aligned)
	Len  uint64 // bytes; equals len(Block.Mem)
}
