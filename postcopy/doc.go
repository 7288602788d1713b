// Package postcopy is the destination's side of postcopy migration below
// the wire format: the fault service that resolves a running guest's
// faults on pages it has not received yet.
//
// A [Service] reads the userfaultfd that the guest's vCPU process
// registered over its RAM (see [guest.Postcopier]) on one goroutine locked
// to its OS thread ([Service.Run]):
//
//   - a fault on a page already present (received, or installed by a batch
//     since the fault was raised) is answered with UFFDIO_WAKE;
//   - a fault on a page known to be zero is resolved at once with
//     UFFDIO_ZEROPAGE;
//   - a fault on a missing page becomes a [Request] to the source, sent
//     through the callback the caller gives (the engine turns it into
//     REQ_PAGES on the return path): first the faulting page, urgent, then
//     the aligned batch of neighbours around it.
//
// Pages that arrive — answers to requests or the background stream — are
// installed with [Service.Place] and [Service.PlaceRun], only ever with
// UFFDIO_COPY or UFFDIO_ZEROPAGE, which fill a page before it becomes
// visible; the service never reads or writes guest RAM through migctl's own
// mapping. Each installed page's bit is set in the received bitmap after
// the page is complete, so a set bit always means a present page, and a
// migctl that re-attaches after a crash can trust it.
//
// Before the guest first runs on the destination, [Service.PunchHoles]
// turns every page not in the received bitmap back into a hole, as QEMU
// discards at POSTCOPY_ADVISE: a page that was pre-faulted but never
// received would otherwise be a present zero page that the guest reads
// without faulting.
//
// The service keeps QEMU's postcopy blocktime statistics ([Stats]): the
// latency of every remote fault (from the moment the fault thread reads the
// message to the moment the UFFDIO_COPY that installs the page returns), its
// distribution in QEMU's power-of-two buckets, per-vCPU blocked time and
// the time during which every vCPU was blocked at once.
package postcopy
