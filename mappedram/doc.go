// Package mappedram writes and reads migctl's mapped-ram files: QEMU's
// mapped-ram layout (capability mapped-ram, QEMU >= 9.0) plus migctl's
// integrity data, with page I/O in parallel and optionally O_DIRECT.
//
// The main stream of such a file is an ordinary migration stream (package
// stream) whose RAM section gives each RAM block a fixed region of the
// file: stream.Encoder.StartRAMMapped writes the block list with QEMU's
// 28-byte headers and lays the regions out; a Saver writes every page at
// pages_offset + offset of its block (in place again when the page is
// dirtied again, so the file never grows past the guest's RAM), keeps the
// blocks' bitmaps, and at the end writes them with migctl's integrity
// records and a completion marker. Open verifies a file completely before
// Restore.Load reads a single page into guest memory. The byte layout is in
// docs/mapped-ram.md.
//
// Why a package of its own: this is file I/O with goroutines, O_DIRECT and
// fsync, not wire format; package stream keeps the format parts
// (StartRAMMapped, ScanMappedRAM) next to the rest of the stream.
//
// # Integrity (migctl's addition)
//
// QEMU's layout has no checksum, and its bitmaps are written only at the end:
// a file whose save was interrupted loads as zero pages. migctl adds, per
// block, a 32-byte integrity record right after the bitmap (CRC-32C of the
// header and of the bitmap), and a 64-byte completion marker at the end of
// the file (CRC-32C of the records and of every byte of the main stream),
// written after everything else reached the disk. Open refuses a file
// without the marker (ErrIncomplete) and checks every CRC before it returns,
// so a flipped byte in a header, a bitmap, a record, the device state or the
// marker fails the load before any page lands. QEMU reads the layout
// unchanged (it only requires pages_offset to be page aligned, and never
// reads the gap that holds the record); migctl does not load QEMU's files,
// which carry no marker.
//
// # How a save goes
//
//	f, _ := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
//	enc := stream.NewEncoder(f)
//	enc.WriteHeader(guest); enc.WriteHandshake(hs)
//	layout, _ := enc.StartRAMMapped(pageSize, blocks, f, mappedram.RecordSize)
//	sv, _ := mappedram.NewSaver(f, layout, opts)
//	for each pass: for each dirty batch: sv.Submit (or sv.MarkZero); sv.Sync
//	enc.BeginRAMEnd(); enc.CloseRAMSection()   // no page records in mapped-ram
//	sv.Finish(ctx)                             // bitmaps + integrity records, fdatasync
//	enc.WriteDevice(...)...; enc.Close()       // device state, EOF, vmdesc
//	sv.Complete(0); sv.Close()                 // completion marker, fdatasync
//
// and a restore: Open, Load into guest memory, then decode Restore.Stream
// with a stream.Decoder for the device state.
package mappedram
