package stream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// RPType is the type of a return-path message (destination → source),
// qemu-wire.md §6.1.
type RPType uint16

// Return-path message types. 1..7 are QEMU's; RPFailReason is migctl's.
const (
	RPShut          RPType = 1 // be32 status: 0 done, non-0 failed
	RPPong          RPType = 2 // be32 echo of a PING value
	RPReqPagesID    RPType = 3 // be64 start, be32 len, u8 namelen, block name
	RPReqPages      RPType = 4 // be64 start, be32 len (same block as before)
	RPRecvBitmap    RPType = 5 // u8 namelen, block name (bitmap follows outside)
	RPResumeAck     RPType = 6 // be32 value (1)
	RPSwitchoverAck RPType = 7 // no data: the destination allows switchover

	// RPFailReason is a migctl extension: the destination explains in UTF-8
	// text (at most MaxFailReason bytes) why it is failing the migration,
	// typically right before RPShut with a non-zero status. QEMU's source
	// rejects unknown types, so a destination sends it only to a source that
	// announced migctl in its handshake.
	RPFailReason RPType = 0x7f00
)

// MaxFailReason bounds the text of an RPFailReason message.
const MaxFailReason = 4096

// RPMessage is one return-path message: a type and its payload.
type RPMessage struct {
	Type RPType
	Data []byte
}

// NewShut returns SHUT(status): 0 means the destination finished, anything
// else that it failed.
func NewShut(status uint32) RPMessage { return rpUint32(RPShut, status) }

// NewPong returns PONG(v), the answer to PING(v).
func NewPong(v uint32) RPMessage { return rpUint32(RPPong, v) }

// NewSwitchoverAck returns SWITCHOVER_ACK.
func NewSwitchoverAck() RPMessage { return RPMessage{Type: RPSwitchoverAck} }

// NewFailReason returns an RPFailReason message carrying text, cut to
// MaxFailReason bytes at a UTF-8 character boundary.
func NewFailReason(text string) RPMessage {
	if len(text) > MaxFailReason {
		cut := MaxFailReason
		for cut > 0 && !utf8.RuneStart(text[cut]) {
			cut--
		}
		text = text[:cut]
	}
	return RPMessage{Type: RPFailReason, Data: []byte(text)}
}

func rpUint32(t RPType, v uint32) RPMessage {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, v)
	return RPMessage{Type: t, Data: b}
}

// Value returns the be32 value of a SHUT, PONG or RESUME_ACK message, and
// false for any other message.
func (m RPMessage) Value() (uint32, bool) {
	switch m.Type {
	case RPShut, RPPong, RPResumeAck:
		if len(m.Data) == 4 {
			return binary.BigEndian.Uint32(m.Data), true
		}
	}
	return 0, false
}

// String describes the message, e.g. "PONG(7)".
func (m RPMessage) String() string {
	switch m.Type {
	case RPShut, RPPong, RPResumeAck:
		if v, ok := m.Value(); ok {
			return fmt.Sprintf("%v(%d)", m.Type, v)
		}
	case RPFailReason, RPHello:
		return fmt.Sprintf("%v(%q)", m.Type, m.Data)
	}
	return fmt.Sprintf("%v[%d bytes]", m.Type, len(m.Data))
}

// String returns QEMU's name of the type without its MIG_RP_MSG_ prefix.
func (t RPType) String() string {
	switch t {
	case RPShut:
		return "SHUT"
	case RPPong:
		return "PONG"
	case RPReqPagesID:
		return "REQ_PAGES_ID"
	case RPReqPages:
		return "REQ_PAGES"
	case RPRecvBitmap:
		return "RECV_BITMAP"
	case RPResumeAck:
		return "RESUME_ACK"
	case RPSwitchoverAck:
		return "SWITCHOVER_ACK"
	case RPFailReason:
		return "MIGCTL_FAIL_REASON"
	case RPHello:
		return "MIGCTL_HELLO"
	case RPLoaded:
		return "MIGCTL_LOADED"
	case RPKeepalive:
		return "MIGCTL_KEEPALIVE"
	}
	return fmt.Sprintf("RP(%#x)", uint16(t))
}

// rpMaxLen is the largest payload ReadRP accepts for t, and -1 for an
// unknown type. It is checked before reading, so ReadRP allocates at most
// this much.
func rpMaxLen(t RPType) int {
	switch t {
	case RPShut, RPPong, RPResumeAck:
		return 4
	case RPReqPagesID:
		return 8 + 4 + 1 + MaxIDStr
	case RPReqPages:
		return 12
	case RPRecvBitmap:
		return 1 + MaxIDStr
	case RPSwitchoverAck:
		return 0
	case RPFailReason:
		return MaxFailReason
	case RPHello:
		return MaxHello
	case RPLoaded, RPKeepalive:
		return 0
	}
	return -1
}

// checkRP reports why m is not a valid message, or "" if it is.
func checkRP(m RPMessage) string {
	n := len(m.Data)
	limit := rpMaxLen(m.Type)
	if limit < 0 {
		return fmt.Sprintf("unknown return-path message type %#x", uint16(m.Type))
	}
	if n > limit {
		return fmt.Sprintf("%v message of %d bytes, at most %d allowed", m.Type, n, limit)
	}
	switch m.Type {
	case RPShut, RPPong, RPResumeAck, RPReqPages, RPSwitchoverAck, RPLoaded, RPKeepalive:
		if n != limit {
			return fmt.Sprintf("%v message of %d bytes, want %d", m.Type, n, limit)
		}
	case RPReqPagesID:
		if n < 14 || int(m.Data[12]) != n-13 {
			return fmt.Sprintf("%v message of %d bytes is not start, length and a u8-counted block name", m.Type, n)
		}
	case RPRecvBitmap:
		if n < 2 || int(m.Data[0]) != n-1 {
			return fmt.Sprintf("%v message of %d bytes is not a u8-counted block name", m.Type, n)
		}
	case RPFailReason:
		if !utf8.Valid(m.Data) {
			return fmt.Sprintf("%v text is not valid UTF-8", m.Type)
		}
	case RPHello:
		return checkHello(m.Data)
	}
	return ""
}

// WriteRP writes m as be16 type, be16 length, data, in one Write call. It
// returns an error wrapping ErrInvalid, writing nothing, if the payload does
// not have the length (or shape) its type requires.
func WriteRP(w io.Writer, m RPMessage) error {
	if msg := checkRP(m); msg != "" {
		return fmt.Errorf("%w: %s", ErrInvalid, msg)
	}
	b := make([]byte, 4, 4+len(m.Data))
	binary.BigEndian.PutUint16(b[0:], uint16(m.Type))
	binary.BigEndian.PutUint16(b[2:], uint16(len(m.Data)))
	b = append(b, m.Data...)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("stream: writing return-path %v: %w", m.Type, err)
	}
	return nil
}

// ReadRP reads one return-path message. It returns io.EOF if r ends cleanly
// before the message, and a *DecodeError of class ErrCorrupt (Offset -1) for
// an unknown type, a length its type does not allow (checked before any
// payload is read or allocated) or a truncated message. Other read errors are
// returned wrapped.
func ReadRP(r io.Reader) (RPMessage, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if err == io.EOF {
			return RPMessage{}, io.EOF
		}
		return RPMessage{}, rpReadErr(err, "header")
	}
	m := RPMessage{Type: RPType(binary.BigEndian.Uint16(hdr[0:]))}
	n := int(binary.BigEndian.Uint16(hdr[2:]))
	limit := rpMaxLen(m.Type)
	switch {
	case limit < 0:
		return RPMessage{}, &DecodeError{Offset: -1, Class: ErrCorrupt,
			Detail: fmt.Sprintf("unknown return-path message type %#x (%d bytes)", uint16(m.Type), n)}
	case n > limit:
		return RPMessage{}, &DecodeError{Offset: -1, Class: ErrCorrupt,
			Detail: fmt.Sprintf("%v message of %d bytes, at most %d allowed", m.Type, n, limit)}
	}
	if n > 0 {
		m.Data = make([]byte, n)
		if _, err := io.ReadFull(r, m.Data); err != nil {
			return RPMessage{}, rpReadErr(err, m.Type.String()+" payload")
		}
	}
	if msg := checkRP(m); msg != "" {
		return RPMessage{}, &DecodeError{Offset: -1, Class: ErrCorrupt, Detail: msg}
	}
	return m, nil
}

func rpReadErr(err error, what string) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &DecodeError{Offset: -1, Class: ErrCorrupt, Detail: "return path ends inside a message " + what, Err: io.ErrUnexpectedEOF}
	}
	return fmt.Errorf("stream: reading return-path message %s: %w", what, err)
}
