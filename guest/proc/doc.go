// Package proc runs the built-in guest in a process of its own — the
// "guest process", which owns the guest's RAM (memfds) and runs its vCPUs —
// and gives migctl a [Client] that implements [guest.Guest] and
// [guest.Postcopier] over a unix socket.
//
// Why a separate process: postcopy serves a running guest's page faults
// with userfaultfd, and a Go goroutine that faults on registered memory
// inside runtime code can deadlock the process that would resolve the
// fault (see package uffd). With the vCPUs in the guest process and the
// fault handler in migctl, a fault only ever waits for another process.
// The name: the package is the built-in guest in its own process, a
// sibling implementation of guest.Guest under guest/, read as proc.Spawn,
// proc.Attach, proc.Client.
//
// # Life of a guest process
//
// [Spawn] binds the control socket and re-executes the current binary,
// whose main (or TestMain) calls [Main] first thing; [Main] finds [EnvVar]
// and runs [Serve]. The guest process builds the guest: for
// [RoleDestination] with RAM of holes, and before anything can run it opens
// a userfaultfd and registers every block for MISSING faults, and creates
// the received-page bitmap in a second, shared memfd. Then it waits for a
// client. [Attach] says HELLO and receives, with SCM_RIGHTS, one memfd per
// block, the bitmap memfd and the userfaultfd; it maps the memfds in
// migctl's process (not registered: migctl writes precopy pages through
// them while the guest is stopped) and returns the Client.
//
// The guest process keeps its own copy of the userfaultfd for its whole
// life. If migctl dies, its copy closes, but the registration stays: a vCPU
// that touches a missing page blocks (it never reads zeros), and the guest
// process waits up to Config.AttachTimeout for a new client. A new migctl
// process attaches to the same socket (`--reattach unix:SOCKET`), maps the
// shared received bitmap — set by migctl only after a page is complete, so
// it names only present pages — and takes over the userfaultfd. Faults the
// dead migctl had read but not resolved are raised again by one
// UFFDIO_WAKE over the guest's RAM (postcopy.Service.WakeAll).
//
// # Control protocol (version 1)
//
// One client at a time; requests strictly one after another, each answered
// by its reply or by ERROR. Every frame:
//
//	u16 type | u16 flags (0) | u32 payload length | payload     (little-endian)
//
// A reply has type request|0x8000; ERROR is 0xffff with payload u16 code +
// message. Every length is checked against a fixed bound before anything
// is allocated (requests ≤ 1 MiB + 4, JSON ≤ 1 MiB, dirty bitmaps exactly
// the layout's size). Requests:
//
//	HELLO        u16 min, u16 max version → JSON Hello + descriptors (memfds, bitmap memfd, userfaultfd)
//	START, STOP  run / park writers and readers (STOP answers ERROR timeout if vCPUs stay blocked on missing pages)
//	DIRTY_START, DIRTY_STOP, DIRTY_SYNC (→ every block's dirty bitmap, u64 words)
//	DIGEST       → JSON guest.Digest (stopped guest; destination: every page received)
//	VERIFY       built-in guest's Verify (same conditions)
//	DEV_SAVE u32 index → state;  DEV_LOAD u32 index + state
//	STATS        → JSON Stats (readers' lost-page count, first-touch latency, received pages, ...)
//	THROTTLE u32 percent;  WAIT_READERS u32 passes, u32 timeout ms;  PING;  QUIT
//
// Every read is bounded: the guest process drops a client silent for
// Config.IdleTimeout (the Client pings at a third of it), the body of a
// frame must follow its header within Config.OpTimeout, and every client
// request has a deadline. A second client that connects while one is
// attached gets ERROR busy.
//
// # Readers
//
// Besides the built-in guest's writers, a guest process can run reader
// vCPUs (Config.Readers): goroutines locked to their own OS threads that
// sweep their pages, time each page's first touch, and count every data
// page they find all zero — a lost page, which must never happen. Their
// thread ids are the vCPU threads of postcopy blocktime.
package proc
