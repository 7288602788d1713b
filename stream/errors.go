package stream

import (
	"errors"
	"fmt"
	"strings"
)

// Error classes. Every error the Decoder and ReadRP return for bad input
// matches exactly one of these with errors.Is, so a caller can decide what to
// tell the user without parsing messages.
var (
	// ErrCorrupt means the bytes are not a valid stream: a wrong magic, an
	// unknown section type, a length that does not add up, a footer that names
	// another section, a truncated record. The sender or the transport is at
	// fault; retrying the same bytes cannot help.
	ErrCorrupt = errors.New("corrupt migration stream")

	// ErrMismatch means the stream is well formed but does not fit this
	// destination: it names a RAM block the destination does not have or one
	// bigger than the destination's. Fix the destination's configuration (or
	// the source's) so both describe the same guest.
	ErrMismatch = errors.New("stream does not fit this destination")

	// ErrTooLarge means a length in the stream exceeds one of the decoder's
	// Limits (device payload, JSON, idstr, number of RAM blocks). Raise the
	// limit if the sender is trusted and the value is expected.
	ErrTooLarge = errors.New("stream exceeds a decoder limit")

	// ErrUnsupported means the stream uses a valid QEMU feature this package
	// does not implement (XBZRLE, RDMA hooks, compressed pages, packaged
	// postcopy blobs, iterable sections other than "ram", vmstate payloads
	// that are not length-prefixed). Turn the feature off on the source.
	ErrUnsupported = errors.New("unsupported migration stream feature")
)

// Reasons: finer sentinels carried by a DecodeError next to its class, for
// the RAM checks a loader most often needs to report precisely.
var (
	// ErrUnknownBlock: a MEM_SIZE entry or a page names a RAM block the
	// destination does not have (class ErrMismatch).
	ErrUnknownBlock = errors.New("unknown RAM block")
	// ErrBlockSize: the source's block is bigger than the destination's
	// (class ErrMismatch).
	ErrBlockSize = errors.New("RAM block bigger than the destination's")
	// ErrPageOutside: a page or zero record lies (partly) beyond the end of its
	// block (class ErrCorrupt).
	ErrPageOutside = errors.New("page outside its RAM block")
	// ErrUnaligned: a record's offset is not a multiple of the page size
	// (class ErrCorrupt).
	ErrUnaligned = errors.New("page offset not aligned to the page size")
	// ErrNoBlock: a record has the CONTINUE flag but no earlier record named a
	// block (class ErrCorrupt).
	ErrNoBlock = errors.New("CONTINUE record with no previous block")
	// ErrFooter: a section footer is missing or names another section
	// (class ErrCorrupt).
	ErrFooter = errors.New("bad section footer")
)

// DecodeError describes bad input found by the Decoder or by ReadRP: where it
// was found, which class it belongs to, and what exactly was wrong.
//
// errors.Is(err, ErrCorrupt) (or ErrMismatch, ErrTooLarge, ErrUnsupported)
// tells the class; errors.Is with a reason sentinel such as ErrPageOutside
// tells the precise check; errors.As gives the offset and the block.
type DecodeError struct {
	// Offset is the byte offset in the stream at which the problem was
	// detected (the start of the offending record or field). It is -1 for
	// return-path messages, which are read one at a time without a stream
	// position.
	Offset int64
	// Class is one of ErrCorrupt, ErrMismatch, ErrTooLarge, ErrUnsupported.
	Class error
	// Reason is a finer sentinel (ErrPageOutside, ErrUnknownBlock, ...) or nil.
	Reason error
	// Block is the RAM block concerned, if any.
	Block string
	// Detail is the human-readable description, e.g.
	// `page at 0x5000 outside block "pc.ram" (size 0x4000)`.
	Detail string
	// Err is an underlying cause such as io.ErrUnexpectedEOF, or nil.
	Err error
}

// Error formats the error as "stream: DETAIL (at byte N)".
func (e *DecodeError) Error() string {
	var b strings.Builder
	b.WriteString("stream: ")
	b.WriteString(e.Detail)
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " (at stream byte %d)", e.Offset)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the class, the reason and the cause, so errors.Is matches any
// of them.
func (e *DecodeError) Unwrap() []error {
	errs := make([]error, 0, 3)
	for _, x := range []error{e.Class, e.Reason, e.Err} {
		if x != nil {
			errs = append(errs, x)
		}
	}
	return errs
}

// ErrOrder is returned (wrapped, with what was expected) when a method is
// called in a state where it makes no sense: an Encoder call that would
// produce an invalid stream (PutPage with no RAM section open, anything after
// Close), or Decoder.Next while a page record's bytes are still unread.
// Nothing is written or read in that case and the Encoder or Decoder remains
// usable.
var ErrOrder = errors.New("stream: call out of order")

// ErrInvalid is returned (wrapped, with detail) when an Encoder or WriteRP
// argument cannot be encoded: an empty or over-long name, a page of the wrong
// size, a page outside its block, a payload too big for its length field.
// Nothing is written in that case and the Encoder remains usable.
var ErrInvalid = errors.New("stream: invalid argument")

// ErrHandshake is returned by Handshake.Check when the two sides disagree on
// something that must match; the message lists every difference.
var ErrHandshake = errors.New("stream: handshake mismatch")

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...)
}

func orderf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrOrder}, args...)...)
}
