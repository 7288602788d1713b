// Package stream encodes and decodes migctl's migration stream, which is
// QEMU's savevm stream (version 3), so that QEMU's tools read our files and
// our destination reads QEMU's RAM streams. It works on io.Reader and
// io.Writer (with writev and readv on the sockets behind them, see
// Copies): no controller or guest.
//
// # The stream an Encoder writes
//
// All integers are big-endian. In the order of the calls that produce them:
//
//	WriteHeader     "QEVM" (be32 0x5145564d), be32 3,
//	                0x07, be32 len, machine name        configuration (the guest's identity)
//	OpenReturnPath  0x08, be16 1, be16 0                 COMMAND OPEN_RETURN_PATH
//	Ping(v)         0x08, be16 2, be16 4, be32 v         COMMAND PING
//	WriteHandshake  0x04, be32 id, u8 16 "migctl/handshake", be32 0, be32 1,
//	                be32 len, JSON, 0x7e be32 id         the handshake, first FULL section
//	StartRAM        0x01, be32 id, u8 3 "ram", be32 0, be32 4,
//	                be64 total|0x04, {u8 len, idstr, be64 size}..., be64 0x10, 0x7e be32 id
//	BeginRAMPart    0x02, be32 id                        (BeginRAMEnd: 0x03, be32 id)
//	PutPage         be64 offset|0x08 [|0x20], [u8 len, idstr], page bytes
//	PutZero         be64 offset|0x02 [|0x20], [u8 len, idstr], 0x00
//	PutFlush        be64 0x200                           MULTIFD_FLUSH
//	CloseRAMSection be64 0x10, 0x7e be32 id              EOS, footer
//	WriteDevice     0x04, be32 id, u8 len, idstr, be32 instance, be32 version,
//	                be32 len, payload, 0x7e be32 id      a device's state
//	Close           0x00                                 EOF
//	                0x06, be32 len, JSON                 vmdesc
//
// A page or zero record carries CONTINUE (0x20) and omits the idstr when its
// block is the block of the previous page or zero record, across sections as
// in QEMU. Section ids are assigned in order from 0. Footers are always
// written and the Decoder requires them (QEMU's default since 2.4).
//
// # Device sections and the vmdesc
//
// QEMU's vmstate payloads can only be parsed with the device's description.
// migctl's device payloads are self-delimiting instead: be32 length, then the
// bytes. The Encoder records every FULL section it writes and Close appends
// the vmdesc describing each one, in stream order, as
//
//	{"name": idstr, "instance_id": N, "vmsd_name": idstr, "version": V,
//	 "fields": [{"name": "size", "type": "uint32", "size": 4},
//	            {"name": "data", "type": "buffer", "size": LEN}]}
//
// under a top-level "page_size" and "devices". QEMU's
// scripts/analyze-migration.py (both the 7.2 version Debian 12 ships and the
// current one) therefore prints every section of a migctl stream. It finds
// the vmdesc by taking the last NUL byte of the file's tail and the first
// '{' after it, so the Encoder pads the JSON with trailing spaces until its
// be32 length has no 0x7b byte after its last 0x00 byte. The script cannot
// read COMMAND records other than SWITCHOVER_START (7.2: none at all), so,
// exactly as with QEMU, only streams written without a return path (files,
// snapshots) can be analysed. It reads names with a signed length byte:
// keep idstrs under 128 bytes for it.
//
// # Extensions (migctl only)
//
// The handshake. The source's first FULL section has idstr
// "migctl/handshake", instance 0, version 1 and a JSON payload (Handshake):
//
//	{"protocol":1,"side":"source","capabilities":{"multifd":false,...},
//	 "parameters":{"downtime-limit":"300",...},"page_size":4096,
//	 "guest_id":"...","ram_blocks":{"pc.ram":67108864},"extra":{...}}
//
// Capabilities list enabled and disabled ones, so a capability the peer does
// not know is noticed. The destination reads it before any page
// (Limits.RequireHandshake makes its absence an error) and compares it with
// Handshake.Check. To analyze-migration.py it is an ordinary described
// device; a QEMU destination fails cleanly on the unknown section.
//
// The guest's UUID. With the capability validate-uuid on and a guest that
// has a UUID, the source adds "uuid":"11111111-2222-3333-4444-555555555555"
// (canonical lowercase) and writes the section with version 2; without a
// UUID it stays version 1, so a destination that reads only version 1 still
// reads it, and refuses a version 2 section cleanly rather than skip a check
// the source asked for (as QEMU refuses an unknown configuration subsection).
// A version 1 section carrying a UUID, or a version 2 one without a valid UUID,
// is corrupt.
//
// The fail reason. On the return path, message type 0x7f00
// (RPFailReason) carries up to 4096 bytes of UTF-8 text explaining why the
// destination fails the migration, sent before SHUT with a non-zero status.
//
// # Decoding
//
// A Decoder is pull-based: Next returns one Record at a time; after a
// KindPage record the caller reads the page with ReadPage into the guest
// memory it belongs to (see Copies) or
// discards it with SkipPage. Every length read from the stream is checked
// against Limits before it is used, blobs are read in chunks so memory
// follows the bytes actually received, and bad input yields a *DecodeError
// whose class (ErrCorrupt, ErrMismatch, ErrTooLarge, ErrUnsupported) and
// offset say what and where, e.g.
//
//	stream: page at 0x5000 outside block "pc.ram" (size 0x4000) (at stream byte 8215)
//
// Not supported (ErrUnsupported): XBZRLE, compressed pages, RDMA hooks,
// iterable sections other than RAM, PACKAGED postcopy blobs, and the vmstate
// payloads of QEMU's own devices (which are not length-prefixed).
//
// # Copies
//
// On a socket (a *net.TCPConn or *net.UnixConn, or a writer whose Unwrap()
// any returns one, as transport's tcp: and unix: Conns do) an Encoder writes
// with writev. PutPageRef queues a reference to the caller's page, and the
// kernel copies the page straight from guest RAM into the socket: one copy.
// PutPage, and every byte the Encoder produces itself, is copied into a
// 256 KiB arena first. Elsewhere (files, pipes, exec:) the Encoder writes
// through a bufio.Writer and PutPageRef copies like PutPage. The bytes on the
// wire are the same either way. PutPageRef's doc says when the caller may
// change a queued page, and why the dirty log makes guest RAM safe to queue.
//
// A Decoder's ReadPage copies the part of the page its read buffer holds and
// reads the rest straight into the destination (on a socket with one readv
// that also refills the buffer, so this costs no extra system call). A page's
// place is only known once its header has been read, and the buffer is
// refilled in large reads, so nearly every page arrives in the buffer with its
// header and is copied out of it: only the page at the end of each fill is
// read straight in (0.2 to 0.5 % of the page bytes in BenchmarkUnixSocket).
// One copy per page needs a format that announces the pages' places before
// their bytes, as multifd's packets do.
//
// On hosts where the kernel's first access to a user page is expensive (PVM
// guests: 6 to 9 µs per 4 KiB page here, see BenchmarkUnixSocket), writev from
// guest RAM the kernel has not touched yet costs more than the copy it saves,
// unless the RAM is backed by transparent huge pages.
//
// # Return path
//
// WriteRP and ReadRP frame destination → source messages as be16 type, be16
// length, data, checking each type's length (QEMU's SHUT, PONG, REQ_PAGES(_ID),
// RECV_BITMAP, RESUME_ACK, SWITCHOVER_ACK, and RPFailReason).
package stream
