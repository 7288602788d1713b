package rdma

import (
	"errors"
	"fmt"
	"time"
)

// ErrClosed is returned by operations on a channel after Close.
var ErrClosed = errors.New("rdma: channel closed")

// ErrPeerFailed matches (errors.Is) every *PeerError.
var ErrPeerFailed = errors.New("rdma: peer failed")

// ErrLostCompletion matches (errors.Is) every *LostCompletionError.
var ErrLostCompletion = errors.New("rdma: completion lost")

// ErrTimeout matches (errors.Is) every *TimeoutError.
var ErrTimeout = errors.New("rdma: timed out")

// ErrProtocol matches (errors.Is) every *ProtocolError.
var ErrProtocol = errors.New("rdma: protocol error")

// ErrPeerClosed is the channel error after the peer closed the connection in
// order; Read returns io.EOF for it once the buffered stream is consumed.
var ErrPeerClosed = errors.New("rdma: peer closed the connection")

// PeerError reports that the peer failed and said so with an ERROR control
// message. Reason is the peer's own error text (empty from a QEMU peer).
type PeerError struct {
	Side   string // "source" or "destination": who failed
	Reason string
}

func (e *PeerError) Error() string {
	if e.Reason == "" {
		return "rdma: the " + e.Side + " failed (it sent ERROR without a reason)"
	}
	return "rdma: the " + e.Side + " failed: " + e.Reason
}

// Is makes errors.Is(err, ErrPeerFailed) match.
func (e *PeerError) Is(target error) bool { return target == ErrPeerFailed }

// LostCompletionError reports a completion that never arrived: completions
// of one queue arrive in posting order, so a completion for a later request
// proves the earlier one was lost.
type LostCompletionError struct {
	Queue string // "send" or "receive"
	Want  uint64 // the work request whose completion is missing
	Got   uint64 // the work request that completed instead
}

func (e *LostCompletionError) Error() string {
	return fmt.Sprintf("rdma: the completion of %s work request %d was lost (work request %d completed first; completions arrive in posting order)",
		e.Queue, e.Want, e.Got)
}

// Is makes errors.Is(err, ErrLostCompletion) match.
func (e *LostCompletionError) Is(target error) bool { return target == ErrLostCompletion }

// TimeoutError reports a wait for the peer that outlasted Options.Timeout.
type TimeoutError struct {
	Op    string
	After time.Duration
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("rdma: %s: no answer from the peer within %v (raise Options.Timeout if the peer is slow, or check that it is alive)", e.Op, e.After)
}

// Is makes errors.Is(err, ErrTimeout) match.
func (e *TimeoutError) Is(target error) bool { return target == ErrTimeout }

// ProtocolError reports a control message that breaks QEMU's RDMA protocol.
type ProtocolError struct {
	Reason string
}

func (e *ProtocolError) Error() string { return "rdma: protocol error: " + e.Reason }

// Is makes errors.Is(err, ErrProtocol) match.
func (e *ProtocolError) Is(target error) bool { return target == ErrProtocol }

func protocolf(format string, args ...any) error {
	return &ProtocolError{Reason: fmt.Sprintf(format, args...)}
}

// RangeError reports a RAM write the source refused before sending: an
// unknown block, or bytes past the end of the destination's block.
type RangeError struct {
	Block  string
	Offset uint64
	Len    uint64
	Size   uint64 // the destination block's length (0 for an unknown block)
}

func (e *RangeError) Error() string {
	if e.Size == 0 {
		return fmt.Sprintf("rdma: RAM write to unknown block %q (the destination announced no such block)", e.Block)
	}
	return fmt.Sprintf("rdma: RAM write of %d bytes at %#x in block %q runs past the destination block's %d bytes", e.Len, e.Offset, e.Block, e.Size)
}

// LayoutError reports that the two sides' RAM blocks differ.
type LayoutError struct {
	Reason string
}

func (e *LayoutError) Error() string {
	return "rdma: the source's and the destination's RAM blocks differ: " + e.Reason
}
