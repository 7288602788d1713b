package proc

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/migctl/migctl/guest"
	"golang.org/x/sys/unix"
)

// Protocol versions this package speaks. A client offers [minVersion,
// maxVersion] in HELLO; the guest process picks the highest it also speaks.
const (
	ProtocolVersion    = 1
	minProtocolVersion = 1
)

// Frame header: type u16, flags u16 (0), payload length u32; little-endian.
const headerSize = 8

// msgType is a frame's type. A reply to request t has type t|replyBit; an
// error reply has type msgError.
type msgType uint16

const (
	msgHello       msgType = 1  // req: u16 min, u16 max; reply: JSON Hello + SCM_RIGHTS
	msgStart       msgType = 2  // req: -; reply: -
	msgStop        msgType = 3  // req: -; reply: -
	msgDirtyStart  msgType = 4  // req: -; reply: -
	msgDirtyStop   msgType = 5  // req: -; reply: -
	msgDirtySync   msgType = 6  // req: -; reply: every block's bitmap words, u64 each, in block order
	msgDigest      msgType = 7  // req: -; reply: JSON guest.Digest
	msgDevSave     msgType = 8  // req: u32 device index; reply: state bytes
	msgDevLoad     msgType = 9  // req: u32 device index, state bytes; reply: -
	msgStats       msgType = 10 // req: -; reply: JSON Stats
	msgThrottle    msgType = 11 // req: u32 percent; reply: -
	msgVerify      msgType = 12 // req: -; reply: - (or an error naming the first bad page)
	msgWaitReaders msgType = 13 // req: u32 passes, u32 timeout ms; reply: -
	msgPing        msgType = 14 // req: -; reply: -
	msgQuit        msgType = 15 // req: -; reply: -, then the guest process exits

	replyBit msgType = 0x8000
	msgError msgType = 0xffff // payload: u16 code, message (UTF-8)
)

var msgNames = map[msgType]string{
	msgHello: "HELLO", msgStart: "START", msgStop: "STOP", msgDirtyStart: "DIRTY_START",
	msgDirtyStop: "DIRTY_STOP", msgDirtySync: "DIRTY_SYNC", msgDigest: "DIGEST", msgDevSave: "DEV_SAVE",
	msgDevLoad: "DEV_LOAD", msgStats: "STATS", msgThrottle: "THROTTLE", msgVerify: "VERIFY",
	msgWaitReaders: "WAIT_READERS", msgPing: "PING", msgQuit: "QUIT", msgError: "ERROR",
}

func (t msgType) String() string {
	if n, ok := msgNames[t&^replyBit]; ok && t != msgError {
		if t&replyBit != 0 {
			return n + " reply"
		}
		return n
	}
	if t == msgError {
		return "ERROR"
	}
	return fmt.Sprintf("type %#x", uint16(t))
}

// Limits. Every length read from the socket is checked against one of them
// before anything is allocated.
const (
	// maxRequest bounds a request's payload (DEV_LOAD: index + state).
	maxRequest = 4 + MaxDeviceState
	// MaxDeviceState bounds one device's saved state.
	MaxDeviceState = 1 << 20
	// maxJSON bounds a JSON payload (HELLO, STATS, DIGEST replies).
	maxJSON = 1 << 20
	// maxErrorText bounds an error reply's message.
	maxErrorText = 4096
	// MaxBlocks bounds the guest's RAM blocks (and the descriptors of HELLO).
	MaxBlocks = 64
	// maxFDs is the most descriptors a HELLO reply carries.
	maxFDs = MaxBlocks + 2
	// maxBitmapBytes bounds a DIRTY_SYNC reply: 64 MiB of bitmap covers
	// 2 TiB of 4 KiB pages.
	maxBitmapBytes = 64 << 20
)

// Error codes of an ERROR reply.
const (
	codeBadRequest uint16 = 1 // malformed or unknown request
	codeVersion    uint16 = 2 // no common protocol version
	codeBusy       uint16 = 3 // another client is attached
	codeState      uint16 = 4 // wrong state: running, closed, stopping
	codeMissing    uint16 = 5 // pages not received yet
	codeTimeout    uint16 = 6 // the operation did not finish within its bound
	codeFailed     uint16 = 7 // the operation failed (verify, device load, ...)
)

// Errors a client branches on; a *RemoteError wraps one of them.
var (
	// ErrProtocol: the peer broke the protocol (bad frame, bad payload).
	ErrProtocol = errors.New("guest process protocol violation")
	// ErrBusy: another migctl is attached to the guest process.
	ErrBusy = errors.New("guest process busy: another client is attached")
	// ErrVersion: client and guest process share no protocol version.
	ErrVersion = errors.New("no common protocol version")
	// ErrMissingPages: the operation needs every page and some have not
	// been received.
	ErrMissingPages = errors.New("pages not received yet")
	// ErrTimeout: the guest process gave up waiting (e.g. vCPUs blocked on
	// missing pages would not stop within the bound).
	ErrTimeout = errors.New("guest process operation timed out")
	// ErrState: the guest is in the wrong state for the request.
	ErrState = errors.New("guest in the wrong state")
	// ErrFailed: the operation ran and failed.
	ErrFailed = errors.New("guest process operation failed")
)

// RemoteError is an ERROR reply.
type RemoteError struct {
	Op   string // the request
	Code uint16
	Msg  string
}

// Error names the request and the guest process's message.
func (e *RemoteError) Error() string { return fmt.Sprintf("guest process: %s: %s", e.Op, e.Msg) }

// Unwrap returns the sentinel of the error code.
func (e *RemoteError) Unwrap() error {
	switch e.Code {
	case codeVersion:
		return ErrVersion
	case codeBusy:
		return ErrBusy
	case codeState:
		return ErrState
	case codeMissing:
		return ErrMissingPages
	case codeTimeout:
		return ErrTimeout
	case codeFailed:
		return ErrFailed
	}
	return ErrProtocol
}

// Hello is the guest process's answer to HELLO: what it is and how its
// memory is laid out. The descriptors travel with it (SCM_RIGHTS), in this
// order: one memfd per block, then the received-bitmap memfd (if Bitmap),
// then the userfaultfd (if UFFD).
type Hello struct {
	Version     int          `json:"version"`
	PID         int          `json:"pid"`
	Role        Role         `json:"role"`
	ID          string       `json:"id"`
	Config      guest.Config `json:"config"`
	Blocks      []BlockInfo  `json:"blocks"`
	Devices     []DeviceInfo `json:"devices"`
	UFFD        bool         `json:"uffd"`
	Features    uint64       `json:"features"`
	Bitmap      bool         `json:"bitmap"`
	BitmapSize  int64        `json:"bitmap_size"`
	VCPUThreads []int        `json:"vcpu_threads"`
	Running     bool         `json:"running"`
	Attaches    int          `json:"attaches"`     // sessions before this one
	IdleTimeout int64        `json:"idle_timeout"` // ns: the client must send a request at least this often
}

// BlockInfo is one RAM block of the guest process.
type BlockInfo struct {
	Name     string `json:"name"`
	Size     int64  `json:"size"`
	PageSize int    `json:"page_size"`
	Addr     uint64 `json:"addr"` // where the guest process maps it
}

// DeviceInfo is one device of the guest process.
type DeviceInfo struct {
	Name      string `json:"name"`
	Instance  uint32 `json:"instance"`
	Version   uint32 `json:"version"`
	NeedsLock bool   `json:"needs_lock"`
}

// fds returns how many descriptors come with h.
func (h *Hello) fds() int {
	n := len(h.Blocks)
	if h.Bitmap {
		n++
	}
	if h.UFFD {
		n++
	}
	return n
}

// validate checks a decoded Hello before the client trusts any of it.
func (h *Hello) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("guest process: HELLO: %s: %w", fmt.Sprintf(format, args...), ErrProtocol)
	}
	switch {
	case h.Version < minProtocolVersion || h.Version > ProtocolVersion:
		return bad("version %d outside %d..%d", h.Version, minProtocolVersion, ProtocolVersion)
	case h.Role != RoleSource && h.Role != RoleDestination:
		return bad("role %q", h.Role)
	case h.ID == "" || len(h.ID) > 4096:
		return bad("ID of %d bytes", len(h.ID))
	case len(h.Blocks) == 0 || len(h.Blocks) > MaxBlocks:
		return bad("%d blocks (1..%d)", len(h.Blocks), MaxBlocks)
	case len(h.Devices) > 64:
		return bad("%d devices", len(h.Devices))
	case h.Role == RoleDestination && (!h.UFFD || !h.Bitmap):
		return bad("a destination guest process must send its userfaultfd and received bitmap")
	case h.Bitmap && (h.BitmapSize <= 0 || h.BitmapSize > 1<<32):
		return bad("bitmap size %d", h.BitmapSize)
	case len(h.VCPUThreads) > 1024:
		return bad("%d vCPU threads", len(h.VCPUThreads))
	case h.IdleTimeout <= 0:
		return bad("idle timeout %d", h.IdleTimeout)
	}
	seen := map[string]bool{}
	for _, b := range h.Blocks {
		switch {
		case b.Name == "" || len(b.Name) > guest.MaxBlockName || seen[b.Name]:
			return bad("block name %.64q empty, too long or repeated", b.Name)
		case b.PageSize < 512 || b.PageSize > 1<<30 || b.PageSize&(b.PageSize-1) != 0:
			return bad("block %q page size %d", b.Name, b.PageSize)
		case b.Size <= 0 || b.Size%int64(b.PageSize) != 0 || b.Size > 1<<44:
			return bad("block %q size %d", b.Name, b.Size)
		case b.Addr == 0 || b.Addr%uint64(b.PageSize) != 0 || b.Addr+uint64(b.Size) < b.Addr:
			return bad("block %q address %#x", b.Name, b.Addr)
		}
		seen[b.Name] = true
	}
	for _, d := range h.Devices {
		if d.Name == "" || len(d.Name) > 255 {
			return bad("device name %.64q", d.Name)
		}
	}
	return nil
}

// frame is one decoded frame.
type frame struct {
	typ     msgType
	payload []byte
	fds     []int // descriptors received with it (owned by the receiver)
}

// encodeHeader returns the header of a frame.
func encodeHeader(t msgType, n int) []byte {
	h := make([]byte, headerSize, headerSize+n)
	binary.LittleEndian.PutUint16(h[0:2], uint16(t))
	binary.LittleEndian.PutUint32(h[4:8], uint32(n))
	return h
}

// parseHeader decodes a frame header and checks the payload length against
// limit.
func parseHeader(h []byte, limit int) (msgType, int, error) {
	if len(h) != headerSize {
		return 0, 0, fmt.Errorf("frame header of %d bytes: %w", len(h), ErrProtocol)
	}
	t := msgType(binary.LittleEndian.Uint16(h[0:2]))
	if f := binary.LittleEndian.Uint16(h[2:4]); f != 0 {
		return 0, 0, fmt.Errorf("%v frame has flags %#x, none are defined: %w", t, f, ErrProtocol)
	}
	n := binary.LittleEndian.Uint32(h[4:8])
	if uint64(n) > uint64(limit) {
		return 0, 0, fmt.Errorf("%v frame of %d bytes exceeds the limit of %d: %w", t, n, limit, ErrProtocol)
	}
	return t, int(n), nil
}

// writeFrame writes one frame (with fds, if any) before deadline.
func writeFrame(c *net.UnixConn, t msgType, payload []byte, fds []int, deadline time.Time) error {
	if err := c.SetWriteDeadline(deadline); err != nil {
		return err
	}
	b := append(encodeHeader(t, len(payload)), payload...)
	if len(fds) > 0 {
		n, oobn, err := c.WriteMsgUnix(b, unix.UnixRights(fds...), nil)
		if err != nil {
			return err
		}
		if oobn == 0 {
			return fmt.Errorf("%v: descriptors not sent", t)
		}
		b = b[n:]
	}
	for len(b) > 0 {
		n, err := c.Write(b)
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// readFrame reads one frame. The header must start arriving before
// headerDeadline; once it has, the rest of the frame must arrive within
// bodyTimeout (0: by headerDeadline); the payload is at most limit bytes. With
// wantFDs > 0 it accepts up to that many descriptors with the frame
// (closing any surplus and failing); with 0 any descriptor is a protocol
// error (and is closed).
func readFrame(c *net.UnixConn, headerDeadline time.Time, bodyTimeout time.Duration, limit, wantFDs int) (frame, error) {
	var f frame
	oob := make([]byte, unix.CmsgSpace(4*max(wantFDs, 1)))
	h := make([]byte, headerSize)
	if err := c.SetReadDeadline(headerDeadline); err != nil {
		return f, err
	}
	got := 0
	for got < headerSize {
		n, oobn, flags, _, err := c.ReadMsgUnix(h[got:], oob)
		if oobn > 0 || flags&unix.MSG_CTRUNC != 0 {
			fds, perr := parseRights(oob[:oobn])
			f.fds = append(f.fds, fds...)
			if perr == nil && flags&unix.MSG_CTRUNC != 0 {
				perr = fmt.Errorf("descriptors truncated (more than %d sent): %w", wantFDs, ErrProtocol)
			}
			if perr == nil && len(f.fds) > wantFDs {
				perr = fmt.Errorf("%d descriptors received, at most %d expected: %w", len(f.fds), wantFDs, ErrProtocol)
			}
			if perr != nil {
				closeFDs(f.fds)
				return frame{}, perr
			}
		}
		got += n
		if err != nil {
			if got > 0 && err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			closeFDs(f.fds)
			return frame{}, err
		}
		if got > 0 && got == n && bodyTimeout > 0 { // the first bytes of the frame: the rest is due soon
			if err := c.SetReadDeadline(time.Now().Add(bodyTimeout)); err != nil {
				closeFDs(f.fds)
				return frame{}, err
			}
		}
	}
	t, n, err := parseHeader(h, limit)
	if err != nil {
		closeFDs(f.fds)
		return frame{}, err
	}
	f.typ = t
	f.payload = make([]byte, n)
	if _, err := io.ReadFull(c, f.payload); err != nil {
		closeFDs(f.fds)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return frame{}, err
	}
	return f, nil
}

func parseRights(oob []byte) ([]int, error) {
	scms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %v: %w", err, ErrProtocol)
	}
	var fds []int
	for i := range scms {
		if scms[i].Header.Level != unix.SOL_SOCKET || scms[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&scms[i])
		if err != nil {
			closeFDs(fds)
			return nil, fmt.Errorf("SCM_RIGHTS: %v: %w", err, ErrProtocol)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// closeFDs closes every descriptor of fds that is not negative (a slot a
// caller has taken over).
func closeFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// encodeError builds an ERROR payload.
func encodeError(code uint16, msg string) []byte {
	if len(msg) > maxErrorText {
		msg = msg[:maxErrorText]
	}
	return append(binary.LittleEndian.AppendUint16(nil, code), msg...)
}

// decodeError decodes an ERROR payload.
func decodeError(op msgType, p []byte) error {
	if len(p) < 2 || len(p) > 2+maxErrorText {
		return fmt.Errorf("guest process: %v: ERROR reply of %d bytes: %w", op, len(p), ErrProtocol)
	}
	return &RemoteError{Op: op.String(), Code: binary.LittleEndian.Uint16(p), Msg: string(p[2:])}
}

// decodeU32s decodes a payload of exactly n little-endian u32 values.
func decodeU32s(p []byte, n int) ([]uint32, error) {
	if len(p) != 4*n {
		return nil, fmt.Errorf("payload of %d bytes, want %d: %w", len(p), 4*n, ErrProtocol)
	}
	v := make([]uint32, n)
	for i := range v {
		v[i] = binary.LittleEndian.Uint32(p[4*i:])
	}
	return v, nil
}

// decodeJSON decodes a JSON payload strictly (unknown fields are an error:
// both sides of one version agree on the shape).
func decodeJSON(p []byte, v any) error {
	if len(p) > maxJSON {
		return fmt.Errorf("JSON payload of %d bytes: %w", len(p), ErrProtocol)
	}
	d := json.NewDecoder(bytes.NewReader(p))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("%v: %w", err, ErrProtocol)
	}
	if d.More() {
		return fmt.Errorf("trailing data after JSON: %w", ErrProtocol)
	}
	return nil
}
