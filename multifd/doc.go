// Package multifd encodes and decodes QEMU's multifd channels: the extra
// connections that carry guest pages next to the main migration stream
// (package stream) when the multifd capability is on. It works on
// io.Reader and io.Writer only: the engine opens the channels, the loader
// accepts them, and both drive this package.
//
// Why a package of its own: a channel is a second wire format with its own
// framing, per-channel compression state (klauspost/compress) and its own
// sync protocol; the stream package keeps the main stream only, and its
// error classes are shared (a multifd DecodeError matches stream.ErrCorrupt,
// stream.ErrMismatch, stream.ErrTooLarge, stream.ErrUnsupported).
//
// # A channel
//
// Every multifd connection starts with the 64-byte initial packet (Init:
// magic 0x11223344, version 1, the VM UUID, the channel id), then carries
// page packets until it closes. A page packet is a header of
// HeaderSize(page size) bytes (1344 at 4 KiB: 320 fixed bytes and an array
// of 128 be64 offsets, always sent whole), then the payload:
//
//	none   normal_pages raw pages, in the order of the offset array
//	zlib   next_packet_size bytes of the channel's one zlib stream, sync-flushed
//	zstd   next_packet_size bytes of the channel's one zstd frame, flushed
//
// See Header for the byte layout of both versions: LayoutCurrent (QEMU >=
// 9.0, with zero_pages) and LayoutQEMU72 (QEMU 7.2: no zero pages, a 3-bit
// compression field, stale sizes in packets without pages). A packet holds
// pages of one RAM block; a packet with FlagSync is the channel's sync
// packet (current QEMU: no pages; before 9.0 it could carry pages).
//
// # Sync: who waits for whom
//
// Pages of one RAM block may travel on different channels, so a page dirtied
// again could overtake its older copy. QEMU therefore separates the passes
// over the dirty bitmap:
//
//  1. Source, end of a pass (multifd_ram_flush_and_sync): the main thread
//     hands the partial batch to a channel, then asks every channel for a
//     sync packet. Each channel writes it after the packets it has queued,
//     and signals the main thread; the main thread waits for all of them
//     (it waits only for its own threads: nothing comes back on the wire),
//     then writes RAM_SAVE_FLAG_MULTIFD_FLUSH (be64 0x200) into the RAM
//     section of the main stream and flushes it.
//  2. Destination: a channel reader that reads a sync packet applies the
//     packet's pages, then waits (RecvSync.Arrive). The main thread, reading
//     the main stream, waits at the FLUSH record (RecvSync.Wait) until every
//     channel has arrived, then releases them all.
//
// When the barrier falls is the FlushMode: after setup and each full pass
// with a FLUSH record (QEMU >= 8.1 default), or at every EOS of the RAM
// section (QEMU 7.2, which sends no FLUSH record and syncs before every EOS).
// IsSyncPoint answers it per record. The destination starts loading only
// once all channels are connected; channels connect in any order after the
// main one (the destination tells them apart by their first four bytes:
// "QEVM" or 0x11223344).
//
// # Zero pages
//
// zero-page-detection decides which pages travel as zero entries: Classify
// is the main thread's choice per page (legacy: ZERO records on the main
// channel; none: every page with its bytes; multifd: the channel lists them
// in the packet), Partition the channel's reordering under multifd.
//
// # Compression
//
// A compressed channel holds one compressor (Writer) and one decompressor
// (Reader) for its whole life: a packet decodes only after the channel's
// earlier packets. The Writer compresses a private copy of each page, as
// QEMU does, since guest pages may change meanwhile. The Reader bounds
// next_packet_size (MaxPayload, QEMU's receive buffer of 1 MiB) and the zstd
// window (DefaultMaxZstdWindow), decompresses straight into the pages the
// caller gives it, and refuses a packet that decodes short or leaves more
// than a sync flush's tail of compressed bytes. (A payload whose last block
// decodes to more bytes than its pages cannot be told from the start of the
// next packet's data; QEMU does not detect it either.)
package multifd
