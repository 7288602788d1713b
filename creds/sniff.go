package creds

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Kind is what a peer speaks, told from its first bytes.
type Kind int

// Kinds of first bytes.
const (
	// KindUnknown: none of the below.
	KindUnknown Kind = iota
	// KindTLS: a TLS handshake record (a ClientHello): 0x16 0x03 0x00–0x04.
	KindTLS
	// KindStream: the migration stream's magic "QEVM" (be32 0x5145564d).
	KindStream
	// KindMultifd: a multifd channel's MULTIFD_MAGIC (be32 0x11223344).
	KindMultifd
)

// Magics of the plaintext channels (QEMU's QEMU_VM_FILE_MAGIC and
// MULTIFD_MAGIC, both big-endian on the wire).
const (
	StreamMagic  = 0x5145564d
	MultifdMagic = 0x11223344
)

// SniffLen is how many bytes Sniff reads.
const SniffLen = 4

func (k Kind) String() string {
	switch k {
	case KindTLS:
		return "a TLS ClientHello"
	case KindStream:
		return "a migration stream (QEVM magic)"
	case KindMultifd:
		return "a multifd channel (MULTIFD magic 0x11223344)"
	default:
		return "unknown bytes"
	}
}

// KindOf tells what head (the first bytes a peer sent, at least 3 for TLS
// and 4 for the magics) is.
func KindOf(head []byte) Kind {
	if len(head) >= 3 && head[0] == 0x16 && head[1] == 0x03 && head[2] <= 0x04 {
		return KindTLS
	}
	if len(head) >= 4 {
		switch binary.BigEndian.Uint32(head) {
		case StreamMagic:
			return KindStream
		case MultifdMagic:
			return KindMultifd
		}
	}
	return KindUnknown
}

// Sniff reads the first SniffLen bytes of c and tells what the peer speaks,
// without consuming them: it returns a net.Conn that reads them again
// before the rest (hand it to tls.Server, or to the stream decoder). The
// read is bounded by ctx (its deadline, and cancellation); Sniff clears
// c's read deadline afterwards. A peer that closes before SniffLen bytes
// gives an error wrapping io.ErrUnexpectedEOF.
//
// Sniff only reports; [Expect] turns the kind into a refusal when it does
// not fit this side's TLS setting. The returned conn implements
// CloseWrite when c does.
func Sniff(ctx context.Context, c net.Conn) (Kind, net.Conn, error) {
	if dl, ok := ctx.Deadline(); ok {
		if err := c.SetReadDeadline(dl); err != nil {
			return KindUnknown, c, err
		}
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
	head := make([]byte, SniffLen)
	n, err := io.ReadFull(c, head)
	stopped := stop()
	_ = c.SetReadDeadline(time.Time{})
	head = head[:n]
	rc := &replayConn{Conn: c, head: head}
	if err != nil {
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			err = fmt.Errorf("the peer closed the connection after %d bytes, before saying what it speaks: %w", n, io.ErrUnexpectedEOF)
		case !stopped || ctx.Err() != nil:
			err = fmt.Errorf("waiting for the peer's first bytes: %w", ctx.Err())
		default:
			err = fmt.Errorf("waiting for the peer's first bytes: %w", err)
		}
		return KindOf(head), rc, err
	}
	return KindOf(head), rc, nil
}

// Expect refuses a peer whose first bytes do not fit this side: a TLS
// side (wantTLS) needs KindTLS, a plaintext one the stream or a multifd
// channel. The error is a *MismatchError whose message names TLS and says
// which side to change.
func Expect(k Kind, head []byte, wantTLS bool) error {
	switch {
	case wantTLS && k == KindTLS, !wantTLS && (k == KindStream || k == KindMultifd):
		return nil
	}
	return &MismatchError{LocalTLS: wantTLS, Peer: k, Head: append([]byte(nil), head...)}
}

// replayConn reads head before the rest of Conn.
type replayConn struct {
	net.Conn
	head []byte
}

func (r *replayConn) Read(p []byte) (int, error) {
	if len(r.head) > 0 {
		n := copy(p, r.head)
		r.head = r.head[n:]
		return n, nil
	}
	return r.Conn.Read(p)
}

// CloseWrite half-closes the connection when the underlying one can.
func (r *replayConn) CloseWrite() error {
	if cw, ok := r.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// Unwrap returns the connection Sniff read from (its first bytes are gone
// from it).
func (r *replayConn) Unwrap() net.Conn { return r.Conn }
