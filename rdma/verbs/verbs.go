// Package verbs is the small, verbs-shaped interface migctl's RDMA transport
// is written against: a Provider opens connections (rdma_cm's listen, get
// request, accept, resolve, connect), each connection has a protection
// domain (PD) that registers memory (MR: local and remote keys), one reliable
// connected queue pair (QP) with SEND, RECV and one-sided RDMA WRITE, and one
// completion queue (CQ) that both of the QP's queues complete into, polled
// without blocking or waited on with a context.
//
// Semantics every provider keeps, because the layers above rely on them:
//
//   - Completions of one queue arrive in the order its work requests were
//     posted (send queue and receive queue separately), as on an RC QP.
//   - A WRITE's completion means the data was placed in the peer's memory;
//     a SEND posted after WRITEs on the same QP is received only after those
//     WRITEs were placed (RC ordering: a receive completion implies that
//     every earlier WRITE on that QP is visible).
//   - A WRITE outside the peer's registered regions, or with a stale key, is
//     refused by the peer: the work request completes with StatusRemoteAccess,
//     and both QPs go to the error state; every later request is flushed
//     (StatusFlushed) and QP.Err reports the cause on both sides.
//   - PostSend and PostRecv never block; they fail with ErrQueueFull past
//     the depths in Config.
//
// Providers: rdma/soft (pure Go over TCP) and rdma/ibv (rdma-core, build tag
// rdma_verbs); rdma/fault wraps either to inject failures.
package verbs

import (
	"context"
	"errors"
	"fmt"
	"net"
)

// MaxPrivateData is the most connection private data a provider must carry
// (rdma_cm's limit for an RC connect request over InfiniBand is 56 bytes).
const MaxPrivateData = 56

// Provider opens RDMA connections. It is chosen explicitly by name (see
// package rdma's Open); there is no fallback from one provider to another.
type Provider interface {
	// Name is the registry name: "soft", "verbs", or a wrapper's.
	Name() string
	// Probe looks for a usable device and describes it. A provider with no
	// device returns a *NoDeviceError saying which probe it ran.
	Probe(ctx context.Context) (Device, error)
	// Listen binds addr ("host:port", IPv4 or IPv6) and waits for
	// connection requests.
	Listen(ctx context.Context, addr string, cfg Config) (Listener, error)
	// Resolve prepares an active connection to addr: it returns a Conn
	// whose PD, QP and CQ are usable (register memory, post receives) but
	// which is not connected until Connect.
	Resolve(ctx context.Context, addr string, cfg Config) (Conn, error)
}

// Device describes what Probe found.
type Device struct {
	Name  string // device name ("soft-tcp", "mlx5_0", ...)
	Probe string // the probe that was run and its result, for messages
}

// Config sizes a connection's queues.
type Config struct {
	SendDepth int // most send work requests outstanding (posted, not completed)
	RecvDepth int // most receive work requests posted
}

// Listener yields connection requests.
type Listener interface {
	// Next waits for a connection request and returns it as a passive
	// Conn, not yet accepted: register memory and post receives on it, then
	// call Accept or Reject. Cancelling ctx ends the wait.
	Next(ctx context.Context) (Conn, error)
	// Addr is the bound address (with the port chosen for port 0).
	Addr() net.Addr
	// Close stops listening; a blocked Next returns an error.
	Close() error
}

// Conn is one reliable connection: a PD, an RC queue pair and its CQ.
type Conn interface {
	PD() PD
	QP() QP
	CQ() CQ
	// Connect (active side) sends the connection request carrying
	// private (at most MaxPrivateData bytes) and waits until the peer
	// accepts; it returns the peer's private data.
	Connect(ctx context.Context, private []byte) ([]byte, error)
	// PeerData (passive side) is the private data of the request.
	PeerData() []byte
	// Accept (passive side) establishes the connection, answering with
	// private.
	Accept(ctx context.Context, private []byte) error
	// Reject (passive side) refuses the request; the peer's Connect fails
	// with a *RejectedError carrying reason.
	Reject(ctx context.Context, reason string) error
	LocalAddr() net.Addr
	RemoteAddr() net.Addr
	// Close disconnects (the peer's QP goes to error with ErrDisconnected),
	// flushes every outstanding request and releases the connection. It
	// returns only when the provider no longer touches registered memory.
	Close() error
}

// Access says what a memory registration allows.
type Access uint8

// Access flags.
const (
	AccessLocalWrite  Access = 1 << iota // the local QP may write it (RECV buffers)
	AccessRemoteWrite                    // the peer may RDMA WRITE into it
)

// PD is a protection domain: memory registered in it is usable by its QP.
type PD interface {
	// Register pins buf (for ibv: it must not be Go heap memory; use mmap)
	// and returns its keys. buf must not be empty.
	Register(buf []byte, access Access) (MR, error)
}

// MR is a registered memory region.
type MR interface {
	LKey() uint32 // key for local scatter/gather entries
	RKey() uint32 // key the peer names in RDMA WRITEs
	Addr() uint64 // virtual address of the first byte
	Len() uint64  // length in bytes
	// Deregister ends the registration: later accesses with its keys fail.
	Deregister() error
}

// Opcode is a work request's operation.
type Opcode uint8

// Opcodes.
const (
	OpSend  Opcode = iota + 1 // two-sided SEND: consumes one receive at the peer
	OpWrite                   // one-sided RDMA WRITE into (RKey, RemoteAddr)
	OpRecv                    // a receive (completions only)
)

func (o Opcode) String() string {
	switch o {
	case OpSend:
		return "SEND"
	case OpWrite:
		return "RDMA WRITE"
	case OpRecv:
		return "RECV"
	}
	return fmt.Sprintf("opcode(%d)", uint8(o))
}

// SGE is one scatter/gather entry: Length bytes at Addr inside the local MR
// whose local key is LKey.
type SGE struct {
	Addr   uint64
	Length uint32
	LKey   uint32
}

// SendWR is a send-queue work request. Every send WR is signaled: it
// produces exactly one completion.
type SendWR struct {
	ID         uint64
	Op         Opcode // OpSend or OpWrite
	Local      SGE
	RemoteAddr uint64 // OpWrite: destination address in the peer's MR
	RKey       uint32 // OpWrite: the peer MR's remote key
}

// RecvWR is a receive-queue work request: an incoming SEND lands in Local.
type RecvWR struct {
	ID    uint64
	Local SGE
}

// Status is a completion's outcome.
type Status uint8

// Completion statuses (the subset of ibv_wc_status migctl distinguishes).
const (
	StatusSuccess       Status = iota
	StatusLocalProt            // a local SGE is outside its MR (IBV_WC_LOC_PROT_ERR)
	StatusLocalLength          // an incoming SEND is larger than the receive buffer (IBV_WC_LOC_LEN_ERR)
	StatusRemoteAccess         // the peer refused a WRITE (IBV_WC_REM_ACCESS_ERR)
	StatusRemoteInvalid        // the peer could not take a SEND: too large for its buffer (IBV_WC_REM_INV_REQ_ERR)
	StatusRNR                  // a SEND arrived with no receive posted (IBV_WC_RNR_RETRY_EXC_ERR)
	StatusFlushed              // the QP was in error (IBV_WC_WR_FLUSH_ERR)
	StatusTransport            // the connection failed (IBV_WC_RETRY_EXC_ERR)
)

func (s Status) String() string {
	switch s {
	case StatusSuccess:
		return "success"
	case StatusLocalProt:
		return "local protection error"
	case StatusLocalLength:
		return "local length error"
	case StatusRemoteAccess:
		return "remote access error"
	case StatusRemoteInvalid:
		return "remote invalid request"
	case StatusRNR:
		return "receiver not ready"
	case StatusFlushed:
		return "flushed"
	case StatusTransport:
		return "transport error"
	}
	return fmt.Sprintf("status(%d)", uint8(s))
}

// Completion is one work completion.
type Completion struct {
	ID      uint64
	Op      Opcode
	Status  Status
	ByteLen uint32 // OpRecv: bytes received
	Err     error  // non-nil unless Status is StatusSuccess: the cause, typed
}

// QP is a reliable connected queue pair.
type QP interface {
	// PostSend queues a SEND or WRITE. It never blocks.
	PostSend(wr SendWR) error
	// PostRecv queues a receive buffer. It never blocks.
	PostRecv(wr RecvWR) error
	// Err is nil while the QP works, else the error that moved it to the
	// error state (an *AccessError, ErrDisconnected, a connection error).
	Err() error
}

// CQ is a completion queue.
type CQ interface {
	// Poll moves up to len(wc) completions into wc, oldest first, and
	// returns how many. It never blocks.
	Poll(wc []Completion) int
	// Wait blocks until the CQ holds a completion or the connection died
	// (then Poll returns the flushed requests), or ctx is done (it returns
	// ctx's error). Callers bound it with a deadline on ctx.
	Wait(ctx context.Context) error
}

// ErrQueueFull is returned by PostSend/PostRecv past the configured depth.
var ErrQueueFull = errors.New("rdma: work queue full")

// ErrDisconnected is the QP error after the peer closed the connection in
// order (rdma_cm's DISCONNECTED event).
var ErrDisconnected = errors.New("rdma: peer disconnected")

// ErrConnLost is the QP error when the connection broke without an orderly
// disconnect (reset, cut, a frame cut short).
var ErrConnLost = errors.New("rdma: connection lost")

// ErrRNR is the QP error when a SEND arrived and no receive was posted.
var ErrRNR = errors.New("rdma: a SEND arrived with no receive posted (receiver not ready)")

// ErrTooLong is the QP error when a SEND was larger than the receive buffer.
var ErrTooLong = errors.New("rdma: a SEND was larger than the posted receive buffer")

// ErrLocalProtection is the QP error when a local SGE lies outside its MR
// or names an unknown local key.
var ErrLocalProtection = errors.New("rdma: local protection error")

// ErrNotConnected is returned by PostSend before the connection is
// established.
var ErrNotConnected = errors.New("rdma: queue pair not connected")

// ErrRemoteAccess matches (errors.Is) every *AccessError.
var ErrRemoteAccess = errors.New("rdma: remote access error")

// ErrNoDevice matches (errors.Is) every *NoDeviceError.
var ErrNoDevice = errors.New("rdma: no RDMA device")

// AccessError reports a WRITE the receiving side refused: its key is unknown
// or stale, it lies (partly) outside the registered region, or the region
// does not allow remote writes. Both sides report it: the writer in the
// WRITE's completion and QP.Err, the target in QP.Err.
type AccessError struct {
	RKey   uint32
	Addr   uint64
	Len    uint64
	Reason string // what was wrong, e.g. "0x1000 bytes at 0x7f.. exceed region [0x7f.., 0x7f..)"
	Remote bool   // true on the writer's side: the peer refused
}

func (e *AccessError) Error() string {
	who := "refused an RDMA WRITE"
	if e.Remote {
		who = "peer refused our RDMA WRITE"
	}
	return fmt.Sprintf("rdma: %s of %d bytes at %#x with rkey %#x: %s (writes must stay inside a region the target registered)",
		who, e.Len, e.Addr, e.RKey, e.Reason)
}

// Is makes errors.Is(err, ErrRemoteAccess) match.
func (e *AccessError) Is(target error) bool { return target == ErrRemoteAccess }

// NoDeviceError reports that a provider found no RDMA device; Probe says
// what it ran and what came back.
type NoDeviceError struct {
	Provider string
	Probe    string // e.g. "ibv_get_device_list returned 0 devices"
	Err      error  // an underlying cause, if any
}

func (e *NoDeviceError) Error() string {
	s := "rdma: provider " + e.Provider + ": no RDMA device (" + e.Probe + ")"
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s + "; load an RDMA driver (e.g. rdma_rxe: rdma link add rxe0 type rxe netdev eth0) or choose the soft provider explicitly"
}

// Is makes errors.Is(err, ErrNoDevice) match.
func (e *NoDeviceError) Is(target error) bool { return target == ErrNoDevice }

// Unwrap returns the underlying cause.
func (e *NoDeviceError) Unwrap() error { return e.Err }

// RejectedError is returned by Connect when the peer rejected the request.
type RejectedError struct {
	Reason string
}

func (e *RejectedError) Error() string {
	return "rdma: connection rejected by peer: " + e.Reason
}
