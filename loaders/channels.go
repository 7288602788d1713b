package loaders

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/multifd"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// channelTimeout bounds how long an accepted connection may take to say
// what it is (its first bytes), and how long the destination waits for the
// multifd channels once the main one connected.
const channelTimeout = 10 * time.Second

// Roles of an incoming connection, told apart by its first four bytes as
// QEMU's migration_ioc_process_incoming does.
type role int

const (
	roleMain    role = iota + 1 // "QEVM": the main stream
	roleMultifd                 // 0x11223344: a multifd channel
	rolePreempt                 // "MGPC": migctl's postcopy preempt channel
)

func (r role) String() string {
	switch r {
	case roleMain:
		return "main"
	case roleMultifd:
		return "multifd"
	case rolePreempt:
		return "postcopy preempt"
	}
	return "unknown"
}

// peekedConn replays the bytes read to classify a connection, then reads
// from it.
type peekedConn struct {
	transport.Conn
	head []byte
	role role
	// start is the file offset of the channel's first byte when it is a
	// regular file (file:, or an fd: on one), -1 otherwise: where a
	// mapped-ram file's stream starts.
	start int64
}

func (c *peekedConn) Read(p []byte) (int, error) {
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// classify reads the first four bytes of c (bounded by channelTimeout and
// by ctx through the caller closing c) and returns its role and a Conn that
// replays them. With tls-creds set they must be a TLS ClientHello: the
// handshake runs and the role is read inside the TLS connection (tls.go).
// A mismatch of TLS and plaintext is a *creds.MismatchError; for a
// plaintext main stream refused by a TLS destination the Conn is returned
// with it, so the source can be told why over its return path.
func (l *loader) classify(c transport.Conn) (role, transport.Conn, error) {
	_ = c.SetDeadline(time.Now().Add(channelTimeout))
	defer c.SetDeadline(time.Time{})
	start := int64(-1)
	if f, ok := transport.RegularFile(c); ok {
		if off, err := f.Seek(0, io.SeekCurrent); err == nil {
			start = off
		}
	}
	var head [4]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return 0, nil, fmt.Errorf("read the first bytes of a new connection: %w", err)
	}
	cfg, err := l.tlsConfig()
	if err != nil {
		return 0, nil, err
	}
	kind := creds.KindOf(head[:])
	if cfg != nil || kind == creds.KindTLS {
		if err := creds.Expect(kind, head[:], cfg != nil); err != nil {
			if kind == creds.KindStream {
				return 0, &peekedConn{Conn: c, head: bytes.Clone(head[:]), start: start}, err
			}
			return 0, nil, err
		}
		if c, err = l.secure(c, bytes.Clone(head[:]), cfg); err != nil {
			return 0, nil, err
		}
		if _, err := io.ReadFull(c, head[:]); err != nil {
			return 0, nil, fmt.Errorf("read the first bytes inside TLS: %w", err)
		}
	}
	pc := &peekedConn{Conn: c, head: bytes.Clone(head[:]), start: start}
	switch binary.BigEndian.Uint32(head[:]) {
	case stream.Magic:
		pc.role = roleMain
		return roleMain, pc, nil
	case multifd.Magic:
		pc.role = roleMultifd
		return roleMultifd, pc, nil
	case stream.PreemptMagic:
		pc.role = rolePreempt
		return rolePreempt, pc, nil
	}
	return 0, nil, fmt.Errorf("unknown channel magic %#08x: neither a migration stream (QEVM) nor a multifd channel", binary.BigEndian.Uint32(head[:]))
}

// classifyRecovery is classify for the channels of a postcopy recovery:
// the preempt channel by its magic, anything else as the resumed main
// stream (which starts with a command, not with a header).
func classifyRecovery(c transport.Conn) (role, transport.Conn, error) {
	_ = c.SetDeadline(time.Now().Add(channelTimeout))
	defer c.SetDeadline(time.Time{})
	var head [4]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return 0, nil, fmt.Errorf("read the first bytes of a new connection: %w", err)
	}
	pc := &peekedConn{Conn: c, head: bytes.Clone(head[:]), start: -1, role: roleMain}
	if binary.BigEndian.Uint32(head[:]) == stream.PreemptMagic {
		pc.role = rolePreempt
	}
	return pc.role, pc, nil
}

// acceptMain accepts connections until the main stream's arrives; multifd
// channels that arrive first are kept (early) for acceptMultifd.
func (l *loader) acceptMain() (main transport.Conn, early []transport.Conn, err error) {
	in := l.in
	for {
		c, err := in.ln.Accept(in.ioCtx)
		if err != nil {
			closeAll(early)
			return nil, nil, fmt.Errorf("wait for the source on %s: %w", in.ln.Addr(), err)
		}
		// A cancel ends the wait for the connection's first bytes at once.
		stop := context.AfterFunc(in.ioCtx, func() { c.Close() })
		r, pc, err := l.classify(c)
		if !stop() {
			err = errors.Join(err, context.Cause(in.ioCtx))
		}
		if err != nil && pc != nil {
			// A plaintext source refused by TLS: finish tells it why
			// over its return path, in the clear it speaks.
			l.conn = pc
			closeAll(early)
			return nil, nil, err
		}
		if err != nil {
			c.Close()
			closeAll(early)
			return nil, nil, err
		}
		if r == roleMain {
			return pc, early, nil
		}
		if len(early) >= 255 {
			pc.Close()
			closeAll(early)
			return nil, nil, errors.New("more than 255 multifd channels arrived before the main stream")
		}
		early = append(early, pc)
	}
}

// acceptMultifd completes the n multifd channels (some may have arrived
// before the main stream): it accepts the rest, reads each one's initial
// packet and checks it (the UUID channelUUID asks for, or the first
// channel's when uuid is nil; a channel id below n; each id once), within
// channelTimeout. It returns the channels indexed by id.
func (l *loader) acceptMultifd(early []transport.Conn, n int, uuid *[16]byte) ([]transport.Conn, error) {
	in := l.in
	ctx, cancel := context.WithTimeout(in.ioCtx, channelTimeout)
	defer cancel()
	chans := make([]transport.Conn, n)
	got := 0
	fail := func(err error) ([]transport.Conn, error) {
		closeAll(early)
		closeAll(chans)
		return nil, err
	}
	take := func(c transport.Conn) error {
		_ = c.SetDeadline(time.Now().Add(channelTimeout))
		init, err := multifd.ReadInit(c)
		_ = c.SetDeadline(time.Time{})
		if err != nil {
			return fmt.Errorf("multifd channel: %w", err)
		}
		switch {
		case uuid == nil:
			first := init.UUID
			uuid = &first
		case init.UUID != *uuid && l.hs != nil && l.hs.UUID != "":
			return fmt.Errorf("multifd channel %d carries VM UUID %s, but the main stream announced %s: the channel belongs to another migration",
				init.Channel, guest.UUID(init.UUID), guest.UUID(*uuid))
		case init.UUID != *uuid:
			return fmt.Errorf("multifd channel %d carries VM UUID %s, another channel %s: the channels come from different sources",
				init.Channel, guest.UUID(init.UUID), guest.UUID(*uuid))
		}
		if err := init.Check(*uuid, n); err != nil {
			return err
		}
		if chans[init.Channel] != nil {
			return fmt.Errorf("multifd channel %d connected twice", init.Channel)
		}
		chans[init.Channel] = c
		got++
		return nil
	}
	for len(early) > 0 {
		c := early[0]
		early = early[1:]
		if err := take(c); err != nil {
			c.Close()
			return fail(err)
		}
	}
	for got < n {
		c, err := in.ln.Accept(ctx)
		if err != nil {
			return fail(fmt.Errorf("waiting for multifd channels (%d of %d connected): %w", got, n, err))
		}
		r, pc, err := l.classify(c)
		if err == nil && r != roleMultifd {
			err = errors.New("a second main stream connected while the multifd channels were expected")
		}
		if err == nil {
			err = take(pc)
		}
		if err != nil {
			c.Close()
			return fail(err)
		}
	}
	return chans, nil
}

func closeAll(cs []transport.Conn) {
	for _, c := range cs {
		if c != nil {
			c.Close()
		}
	}
}
