// Package uffd is the Linux userfaultfd(2) ABI in Go, on golang.org/x/sys/unix
// (which has only the syscall number): open a userfaultfd, negotiate its
// features (UFFDIO_API), register memory for MISSING faults, read page-fault
// messages, and resolve them with UFFDIO_COPY, UFFDIO_ZEROPAGE or
// UFFDIO_WAKE.
//
// # The two processes
//
// migctl uses userfaultfd across processes (see the project's
// reference/postcopy-uffd.md): the guest process, which runs the vCPUs and
// owns guest RAM (a memfd mapped MAP_SHARED), opens the userfaultfd,
// registers its RAM with [ModeMissing] before any vCPU runs, and sends the
// descriptor to migctl over a unix socket. migctl wraps the received
// descriptor with [FromFD], reads the fault messages ([FD.Read]) and
// installs pages ([FD.CopyPages]); the addresses it passes are the guest
// process's, because a userfaultfd always acts on the address space of the
// process that created it.
//
// # Rules that keep a guest correct
//
//   - Install a page that a vCPU may be reading only with [FD.Copy] or
//     [FD.ZeroPage]: both fill the page before the kernel maps it. Writing
//     through another mapping of the memfd and then calling [FD.Wake]
//     publishes torn pages.
//   - Never read a missing page through another mapping of the same memfd:
//     the read allocates a zero page that the guest then sees without
//     faulting.
//   - Answer every fault message. For a page that is already present
//     (installed by a batch, or a fault retried after a signal), call
//     [FD.Wake]; a thread whose fault is neither woken nor resolved stays
//     blocked.
//   - The registering process keeps its own copy of the descriptor open. If
//     every copy is closed, pending and future faults in the registered
//     ranges are silently resolved with zero pages.
//
// # Go and faults in the same process
//
// A goroutine that faults on registered memory inside runtime code (a
// copy() compiled to memmove, a channel send of an element) cannot be
// preempted; the next garbage collection then waits for it forever while
// the goroutine that would resolve the fault is stopped too. Never let Go
// code of the process that reads the descriptor touch registered memory.
// This package's own tests fault only from inside system calls (write(2)
// from registered memory: the goroutine is in a syscall, which the
// collector does not wait for) or from a separate process.
package uffd
