package multifd

import (
	"errors"
	"fmt"
	"strings"

	"github.com/migctl/migctl/stream"
)

// Error classes are the stream package's, so a loader handles a bad multifd
// channel as it handles a bad main stream: errors.Is(err, stream.ErrCorrupt),
// stream.ErrMismatch, stream.ErrTooLarge or stream.ErrUnsupported; and the
// reasons stream.ErrUnknownBlock, stream.ErrPageOutside, stream.ErrUnaligned.

// ErrCompression is the reason of a packet whose compression method is not
// this destination's multifd-compression (class stream.ErrMismatch).
var ErrCompression = errors.New("multifd compression differs")

// ErrInvalid is returned (wrapped) for a Writer argument that cannot be
// encoded: nothing is written and the Writer stays usable.
var ErrInvalid = errors.New("multifd: invalid argument")

// DecodeError describes bad input on a multifd channel.
type DecodeError struct {
	// Channel is the channel id, or -1 when not known yet.
	Channel int
	// Offset is the channel byte offset where the problem was found, or -1.
	Offset int64
	// Class is one of stream.ErrCorrupt, ErrMismatch, ErrTooLarge,
	// ErrUnsupported; Reason a finer sentinel or nil.
	Class, Reason error
	// Block is the RAM block concerned, if any.
	Block string
	// Detail says what was wrong.
	Detail string
	// Err is an underlying cause (io.ErrUnexpectedEOF, a decompressor's
	// error) or nil.
	Err error
}

// Error formats "multifd channel N: DETAIL (at channel byte X): CAUSE".
func (e *DecodeError) Error() string {
	var b strings.Builder
	b.WriteString("multifd")
	if e.Channel >= 0 {
		fmt.Fprintf(&b, " channel %d", e.Channel)
	}
	b.WriteString(": ")
	b.WriteString(e.Detail)
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " (at channel byte %d)", e.Offset)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the class, the reason and the cause.
func (e *DecodeError) Unwrap() []error {
	var errs []error
	for _, x := range []error{e.Class, e.Reason, e.Err} {
		if x != nil {
			errs = append(errs, x)
		}
	}
	return errs
}

func decodeErr(class error, off int64, ch int, reason error, format string, args ...any) *DecodeError {
	return &DecodeError{Channel: ch, Offset: off, Class: class, Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

func corrupt(off int64, ch int, reason error, format string, args ...any) *DecodeError {
	return decodeErr(stream.ErrCorrupt, off, ch, reason, format, args...)
}

func mismatch(off int64, ch int, reason error, format string, args ...any) *DecodeError {
	return decodeErr(stream.ErrMismatch, off, ch, reason, format, args...)
}

func unsupported(off int64, ch int, format string, args ...any) *DecodeError {
	return decodeErr(stream.ErrUnsupported, off, ch, nil, format, args...)
}

func tooLarge(off int64, ch int, format string, args ...any) *DecodeError {
	return decodeErr(stream.ErrTooLarge, off, ch, nil, format, args...)
}
