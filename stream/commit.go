package stream

import (
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"strings"
)

// The switchover commit protocol, a migctl extension (docs/stream.md,
// "Switchover commit"). A source announces it in its handshake
// (Handshake.Extensions); a destination that speaks it answers RPHello on
// the return path when the source opens it. Then, after the stream's EOF
// marker and vmdesc:
//
//	destination: RPLoaded          everything is loaded; it waits
//	source:      TrailerGo         the source committed: the guest is yours
//	destination: SHUT(0)           its guest runs
//
// A source that fails before it commits sends TrailerAbort instead (best
// effort), and a destination that fails before go sends its reason and
// SHUT(1): either way the guest runs only at the source. While either side
// waits, the source sends TrailerKeepalive frames and the destination
// RPKeepalive messages (every x-migctl-keepalive), so silence means a dead or
// stalled peer.
const (
	// ExtSwitchoverCommit names the protocol and its version in
	// Handshake.Extensions and RPHello.
	ExtSwitchoverCommit = "switchover-commit/1"
)

// Return-path messages of the commit protocol, sent only to a source that
// announced ExtSwitchoverCommit (QEMU's source refuses unknown types).
const (
	// RPHello lists the extensions the destination speaks, separated by
	// spaces (printable ASCII, at most MaxHello bytes). It answers the
	// source's OPEN_RETURN_PATH, before the PONG of any later PING, so a
	// source that sees PONG first knows the destination lacks them.
	RPHello RPType = 0x7f01
	// RPLoaded says every byte of the stream, vmdesc included, is loaded and
	// the destination waits for the source's go. No data.
	RPLoaded RPType = 0x7f02
	// RPKeepalive proves the destination is alive while the source waits
	// for it. No data.
	RPKeepalive RPType = 0x7f03
)

// MaxHello bounds the text of an RPHello message.
const MaxHello = 256

// NewHello returns an RPHello message listing exts.
func NewHello(exts ...string) RPMessage {
	return RPMessage{Type: RPHello, Data: []byte(strings.Join(exts, " "))}
}

// Extensions returns the extensions an RPHello message lists (nil for any
// other message).
func (m RPMessage) Extensions() []string {
	if m.Type != RPHello {
		return nil
	}
	return strings.Fields(string(m.Data))
}

// checkHello reports why data is not a valid RPHello payload, or "".
func checkHello(data []byte) string {
	for _, c := range data {
		if c < 0x20 || c > 0x7e {
			return fmt.Sprintf("%v text has byte %#02x; want printable ASCII", RPHello, c)
		}
	}
	return ""
}

// Trailer is one frame the source sends after the vmdesc, on a stream
// whose destination speaks ExtSwitchoverCommit: 4 bytes TrailerMagic, a
// be32 code.
type Trailer uint32

// Trailer frames.
const (
	// TrailerKeepalive proves the source is alive while it waits.
	TrailerKeepalive Trailer = 1
	// TrailerGo says the source committed: the destination may run the
	// guest, and the source never will on its own.
	TrailerGo Trailer = 2
	// TrailerAbort says the source gave up before it committed: the
	// destination must discard what it loaded.
	TrailerAbort Trailer = 3
)

// TrailerMagic opens every trailer frame ("MGCT").
const TrailerMagic = 0x4d474354

// TrailerSize is the size of one trailer frame.
const TrailerSize = 8

// String returns the frame's name.
func (t Trailer) String() string {
	switch t {
	case TrailerKeepalive:
		return "KEEPALIVE"
	case TrailerGo:
		return "GO"
	case TrailerAbort:
		return "ABORT"
	}
	return fmt.Sprintf("TRAILER(%d)", uint32(t))
}

// WriteTrailer writes one trailer frame and flushes it. It is valid only
// after Close (the EOF marker and vmdesc are on the wire); before, it
// returns an error wrapping ErrOrder and writes nothing.
func (e *Encoder) WriteTrailer(t Trailer) error {
	if e.err != nil {
		return e.err
	}
	if e.state != esClosed {
		return fmt.Errorf("%w: WriteTrailer before Close", ErrOrder)
	}
	if t < TrailerKeepalive || t > TrailerAbort {
		return invalidf("trailer code %d", uint32(t))
	}
	e.write(AppendTrailer(nil, t))
	return e.Flush()
}

// AppendTrailer appends frame t to b, for a source that must write it
// outside its Encoder (whose stream may have failed): only after the
// Encoder's Close succeeded, so that the frame follows the vmdesc.
func AppendTrailer(b []byte, t Trailer) []byte {
	b = binary.BigEndian.AppendUint32(b, TrailerMagic)
	return binary.BigEndian.AppendUint32(b, uint32(t))
}

// NextTrailer reads one trailer frame. It is valid once Next returned the
// KindVMDesc record; before, it returns an error wrapping ErrOrder. It
// returns io.EOF when the source closed cleanly between frames, and a
// *DecodeError of class ErrCorrupt for a frame without the magic, with an
// unknown code, or cut short.
func (d *Decoder) NextTrailer() (Trailer, error) {
	if d.err != nil {
		return 0, d.err
	}
	if d.state != dsDone || !d.vmdesc {
		return 0, fmt.Errorf("%w: NextTrailer before the vmdesc", ErrOrder)
	}
	pos := d.Offset()
	var b [TrailerSize]byte
	n, err := io.ReadFull(d.rb, b[:])
	d.off.Add(int64(n))
	switch {
	case err == io.EOF:
		return 0, io.EOF
	case err != nil:
		return 0, d.ioErr(err, "a trailer frame")
	}
	if m := binary.BigEndian.Uint32(b[0:]); m != TrailerMagic {
		return 0, d.corrupt(pos, nil, "trailer frame magic %#08x, want %#08x", m, TrailerMagic)
	}
	t := Trailer(binary.BigEndian.Uint32(b[4:]))
	if t < TrailerKeepalive || t > TrailerAbort {
		return 0, d.corrupt(pos, nil, "unknown trailer frame code %d", uint32(t))
	}
	return t, nil
}

// Speaks reports whether the handshake announces extension ext.
func (h *Handshake) Speaks(ext string) bool { return slices.Contains(h.Extensions, ext) }
