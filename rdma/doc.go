// Package rdma is migctl's RDMA migration transport: QEMU's RDMA protocol
// (migration/rdma.c; qemu-wire.md §7 and §9) on a small verbs-shaped
// interface, with a software provider that keeps RDMA's semantics over TCP
// and a real rdma-core provider behind a build tag.
//
// # Layers
//
//   - rdma/verbs: the interface — Provider (probe, listen, resolve/connect
//     with private data), PD, MR (local and remote keys), an RC QP with
//     SEND/RECV and one-sided RDMA WRITE, a CQ with Poll and a cancellable
//     Wait. Typed errors: *verbs.AccessError (ErrRemoteAccess),
//     *verbs.NoDeviceError (ErrNoDevice), ErrConnLost, ErrDisconnected.
//   - rdma/control: QEMU's control messages, bounded decoders, golden bytes.
//   - rdma/soft: the software provider (pure Go, TCP, soft-RoCE in user
//     space); rdma/ibv: libibverbs/librdmacm with -tags rdma_verbs (compiled
//     and vetted in CI, never run: no RDMA device there); rdma/fault: a
//     fault-injecting wrapper for tests.
//   - this package: the migration channel (Dial → *Source, Listen/Accept →
//     *Dest) and the provider registry (Open).
//
// # The channel
//
// Setup: the source connects with RDMACapabilities {version 1, flags} as
// private data (flag 0x01 = rdma-pin-all, set on the source; the
// destination adopts it and echoes the flags it knows), both sides grant
// Options.Credits READY credits, and the source sends RAM_BLOCKS_REQUEST
// carrying its block names (a documented migctl extension; QEMU's is empty
// and learns the order from the stream). The destination answers
// RAM_BLOCKS_RESULT in the source's order (with one rkey per block under
// pin-all); the source checks count and lengths.
//
// Stream: Source.Write/Flush and Dest.Read carry QEMUFile bytes as
// QEMU_FILE messages of at most 32 KiB; Dest.Write/Flush and Source.Read are
// the return path over the same connection. Each credited message (QEMU_FILE
// and requests) needs a READY from the peer, sent when the peer has consumed
// it; replies (REGISTER_RESULT, RAM_BLOCKS_RESULT), READY and ERROR need
// none (errata §9: replies are sent without waiting for READY).
//
// RAM: Source.WriteRAM(ctx, block, offset, data) and WriteZero issue RDMA
// WRITEs straight into the destination's registered memory. A write never
// crosses a 1 MiB chunk; contiguous writes inside a chunk are merged. On
// demand, the first write into a chunk sends REGISTER_REQUEST (chunks = 0:
// one chunk; errata §9) and caches the key; an all-zero buffer for a chunk
// not registered yet goes as COMPRESS. With pin-all nothing is registered
// per chunk and zeros are written. The destination's provider applies the
// WRITEs itself, concurrently with everything else, and refuses any write
// outside a registered region: both sides fail with an error matching
// verbs.ErrRemoteAccess. Source.Sync ends a pass (REGISTER_FINISHED, then
// every WRITE completed).
//
// Ordering guarantee: when Dest.Read returns a stream byte, every RAM write
// the source issued before writing that byte has landed. The source posts
// pending WRITEs before the QEMU_FILE carrying later bytes; completions are
// delivered in order per connection, and a receive completes only after
// every earlier WRITE on the connection was placed (RC ordering; the soft
// provider applies frames from one TCP stream in order).
//
// Failure: any failure on one side (a refused or lost completion, a failed
// registration, a timeout, a malformed message) fails that side's channel
// with a typed error and sends ERROR with the reason, so the peer fails
// with a *PeerError; a cut connection fails both with verbs.ErrConnLost.
// Every wait is cancellable (ctx, Close) and bounded by Options.Timeout.
//
// # Plugging it into the engine
//
// A "RAM sink" adapter is a few lines: WritePage(block, offset, data) →
// Source.WriteRAM, WriteZero → Source.WriteZero, the pass-end Flush/Sync →
// Source.Sync; the QEMUFile stream (sections, device state, EOF, vmdesc)
// goes to Source as an io.Writer (Flush before waiting for the peer), and
// the return path is Source.Read. On the destination the loader reads the
// stream from Dest (an io.Reader) and skips RAM records, which never come:
// by the ordering guarantee, RAM written before a stream position has
// landed when the loader reads past it. An "rdma:" scheme adapter calls
// Open(name) with the operator's explicit provider, then Dial or Listen and
// Accept with the guest's blocks. See docs/rdma.md.
package rdma
