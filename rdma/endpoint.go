package rdma

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/rdma/control"
	"github.com/migctl/migctl/rdma/verbs"
)

// Defaults for Options.
const (
	DefaultTimeout   = 60 * time.Second
	DefaultCredits   = 4
	DefaultMaxWrites = 64
	// failGrace bounds how long a failed channel waits for its ERROR
	// message to leave before it drops the connection.
	failGrace  = 5 * time.Second
	replySlots = 4
)

// Options configure a channel. The zero value is usable on the destination;
// the source must list its Blocks.
type Options struct {
	// PinAll is QEMU's rdma-pin-all, set on the source: every block is
	// registered up front on both sides and no per-chunk registration
	// happens. The destination adopts what the source asks; its own
	// PinAll is ignored.
	PinAll bool
	// Timeout bounds every wait for the peer (a reply, a credit, a
	// completion, stream bytes for Read). A timeout fails the channel.
	// Default DefaultTimeout.
	Timeout time.Duration
	// Credits is how many control messages (QEMU_FILE and requests) one
	// side may have unconsumed at the other. Both sides must agree. Default 4.
	Credits int
	// MaxWrites bounds RDMA WRITEs in flight. Default 64.
	MaxWrites int
	// Blocks is the source's own RAM (required on the source): the names
	// and sizes it migrates, in its order, and the memory WriteRAM reads
	// without copying when its data lies inside one of them.
	Blocks []Block
	// HoldRAM (destination) keeps the destination's RAM closed to the
	// source until Dest.OpenRAM: the source's RAM_BLOCKS_REQUEST is held
	// unanswered, so the source can neither register a chunk nor write a
	// byte before the destination accepted the migration (migctl opens it
	// once its connect guard passed). QEMU's destination likewise answers
	// it only when its loader reaches the RAM section.
	HoldRAM bool
	// LazyBlocks (source) makes Dial send RAM_BLOCKS_REQUEST without
	// waiting for the answer; the first WriteRAM or WriteZero waits for
	// it (bounded by Timeout). Needed when the destination holds its RAM
	// (HoldRAM) until it has read what the source writes to the stream
	// after Dial. A layout mismatch then fails that first RAM write.
	LazyBlocks bool
}

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.Credits <= 0 {
		o.Credits = DefaultCredits
	}
	if o.MaxWrites <= 0 {
		o.MaxWrites = DefaultMaxWrites
	}
	return o
}

// Block is one guest RAM region: a name (QEMU's RAMBlock idstr) and its
// memory. For the verbs provider Mem must be mmap'd memory (never the Go
// heap), since the device accesses it outside Go's knowledge.
type Block struct {
	Name string
	Mem  []byte
}

type sendKind uint8

const (
	sendCredited sendKind = iota // a QEMU_FILE or request: holds a send slot and a peer credit
	sendReply                    // a reply: holds a reply slot
	sendConst                    // READY, REGISTER_FINISHED: constant bytes
	sendError                    // the ERROR message
	sendWrite                    // an RDMA WRITE
)

type sendRec struct {
	id      uint64
	kind    sendKind
	slot    int // send or reply slot; staging slot for a WRITE (-1 direct)
	finWait bool
}

type recvRec struct {
	id   uint64
	slot int
}

type inMsg struct {
	slot int
	data []byte
}

// endpoint is what both sides share: the connection, the control arena,
// credits, the stream in both directions and the service goroutine.
//
// Ownership: postMu serialises posting with the FIFO bookkeeping; sendMu
// serialises the application's sends (the stream, RAM writes, requests), so
// posting order is program order; mu guards every field below it and
// changed is closed and replaced (under mu) on every change.
type endpoint struct {
	conn   verbs.Conn
	opts   Options
	side   string // "source" or "destination"
	peer   string
	life   context.Context
	stop   context.CancelFunc
	served chan struct{}
	// handler serves requests from the peer (destination only); held
	// means it keeps the receive slot (and the peer's credit) for now and
	// reposts it itself later.
	handler func(m control.Message, slot int) (held bool, err error)

	arena     []byte
	arenaMR   verbs.MR
	recvSlot  [][]byte
	sendSlot  [][]byte
	replySlot [][]byte
	errSlot   []byte
	readyMsg  []byte
	finMsg    []byte

	postMu   sync.Mutex
	nextID   uint64
	sendFIFO []sendRec
	recvFIFO []recvRec

	sendMu sync.Mutex
	wbuf   []byte // stream bytes not yet sent (sendMu)

	mu         sync.Mutex
	changed    chan struct{}
	err        error
	credits    int
	freeSend   []int
	freeReply  []int
	writesOut  int
	finOut     int // REGISTER_FINISHED sends not yet completed
	inbound    []inMsg
	reply      *control.Message
	replyWant  control.Type
	finished   int
	waiting    int // goroutines blocked in waitFor (tests look)
	errorSent  bool
	errorDone  bool
	freeStage  []int
	failTimer  context.Context
	failCancel context.CancelFunc
}

func mmap(n int) ([]byte, error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("rdma: mmap %d bytes: %w", n, err)
	}
	return b, nil
}

// newEndpoint allocates and registers the control arena and posts every
// receive, before the connection is established.
func newEndpoint(conn verbs.Conn, opts Options, side, peer string) (*endpoint, error) {
	e := &endpoint{conn: conn, opts: opts, side: side, peer: peer, served: make(chan struct{}), changed: make(chan struct{})}
	c := opts.Credits
	nRecv := 2*c + replySlots + 2
	nSend := c + 2
	const slot = control.MaxBuffer
	n := (nRecv+nSend+replySlots+1)*slot + 64
	arena, err := mmap(n)
	if err != nil {
		return nil, err
	}
	e.arena = arena
	mr, err := conn.PD().Register(arena, verbs.AccessLocalWrite)
	if err != nil {
		_ = unix.Munmap(arena)
		return nil, fmt.Errorf("rdma: registering the %d-byte control arena: %w", n, err)
	}
	e.arenaMR = mr
	take := func(k int) []byte { b := arena[:k:k]; arena = arena[k:]; return b }
	for i := 0; i < nRecv; i++ {
		e.recvSlot = append(e.recvSlot, take(slot))
	}
	for i := 0; i < nSend; i++ {
		e.sendSlot = append(e.sendSlot, take(slot))
		e.freeSend = append(e.freeSend, i)
	}
	for i := 0; i < replySlots; i++ {
		e.replySlot = append(e.replySlot, take(slot))
		e.freeReply = append(e.freeReply, i)
	}
	e.errSlot = take(slot)
	e.readyMsg, _ = control.Append(take(32)[:0], control.Message{Type: control.TypeReady})
	e.finMsg, _ = control.Append(take(32)[:0], control.Message{Type: control.TypeRegisterFinished})
	for i := range e.recvSlot {
		if err := e.postRecv(i); err != nil {
			e.release()
			return nil, err
		}
	}
	return e, nil
}

func (e *endpoint) release() {
	if e.arenaMR != nil {
		_ = e.arenaMR.Deregister()
	}
	if e.arena != nil {
		_ = unix.Munmap(e.arena[:cap(e.arena)])
	}
}

// start runs the service goroutine and grants the peer its credits.
func (e *endpoint) start() {
	e.life, e.stop = context.WithCancel(context.Background())
	go e.serve()
	for i := 0; i < e.opts.Credits; i++ {
		e.postConst(e.readyMsg)
	}
}

func (e *endpoint) sge(b []byte) verbs.SGE {
	return verbs.SGE{Addr: e.arenaMR.Addr() + uint64(addrOf(b)-addrOf(e.arena[:1])), Length: uint32(len(b)), LKey: e.arenaMR.LKey()}
}

func (e *endpoint) postRecv(slot int) error {
	e.postMu.Lock()
	defer e.postMu.Unlock()
	e.nextID++
	id := e.nextID
	if err := e.conn.QP().PostRecv(verbs.RecvWR{ID: id, Local: e.sge(e.recvSlot[slot])}); err != nil {
		return fmt.Errorf("rdma: posting a receive: %w", err)
	}
	e.recvFIFO = append(e.recvFIFO, recvRec{id: id, slot: slot})
	return nil
}

func (e *endpoint) postSend(rec sendRec, wr verbs.SendWR) error {
	e.postMu.Lock()
	defer e.postMu.Unlock()
	e.nextID++
	rec.id, wr.ID = e.nextID, e.nextID
	if err := e.conn.QP().PostSend(wr); err != nil {
		return fmt.Errorf("rdma: posting a %v: %w", wr.Op, err)
	}
	e.sendFIFO = append(e.sendFIFO, rec)
	return nil
}

func (e *endpoint) postConst(msg []byte) {
	if err := e.postSend(sendRec{kind: sendConst, slot: -1}, verbs.SendWR{Op: verbs.OpSend, Local: e.sge(msg)}); err != nil {
		e.fail(err, false)
	}
}

// broadcast wakes every waiter; mu must be held.
func (e *endpoint) broadcast() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// wait blocks until cond (evaluated under mu) holds, the channel failed, or
// ctx or Options.Timeout ends. A timeout fails the channel.
func (e *endpoint) wait(ctx context.Context, op string, cond func() bool) error {
	return e.waitFor(ctx, op, cond, e.opts.Timeout)
}

// waitFor is wait bounded by limit instead of Options.Timeout; limit 0
// waits for as long as ctx lets it (and until the channel fails or
// closes).
func (e *endpoint) waitFor(ctx context.Context, op string, cond func() bool, limit time.Duration) error {
	var expired <-chan time.Time
	if limit > 0 {
		timer := time.NewTimer(limit)
		defer timer.Stop()
		expired = timer.C
	}
	for {
		e.mu.Lock()
		if e.err != nil {
			err := e.err
			e.mu.Unlock()
			return err
		}
		if cond() {
			e.mu.Unlock()
			return nil
		}
		ch := e.changed
		e.waiting++
		e.mu.Unlock()
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = fmt.Errorf("rdma: %s: %w", op, ctx.Err())
		case <-expired:
			err = &TimeoutError{Op: op, After: limit}
		}
		e.mu.Lock()
		e.waiting--
		e.mu.Unlock()
		if err != nil {
			var te *TimeoutError
			if errors.As(err, &te) {
				e.fail(err, true)
			}
			return err
		}
	}
}

// fail records the channel's first error and wakes every waiter; tell sends
// the peer an ERROR with the reason.
func (e *endpoint) fail(err error, tell bool) {
	e.mu.Lock()
	if e.err != nil {
		e.mu.Unlock()
		return
	}
	e.err = err
	e.errorSent = tell
	e.failTimer, e.failCancel = context.WithTimeout(context.Background(), failGrace)
	e.broadcast()
	e.mu.Unlock()
	if tell {
		msg, _ := control.Append(e.errSlot[:0], control.Message{Type: control.TypeError, Reason: e.side + ": " + err.Error()})
		if e.postSend(sendRec{kind: sendError, slot: -1}, verbs.SendWR{Op: verbs.OpSend, Local: e.sge(msg)}) != nil {
			e.mu.Lock()
			e.errorDone = true
			e.mu.Unlock()
		}
	}
}

// Err returns the error that failed the channel, or nil.
func (e *endpoint) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// serve is the only consumer of the CQ. It exits when the channel is
// closed, or after a failure once the ERROR left (bounded by failGrace), and
// then disconnects so the peer learns at once.
func (e *endpoint) serve() {
	defer close(e.served)
	wcs := make([]verbs.Completion, 64)
	for {
		n := e.conn.CQ().Poll(wcs)
		for _, wc := range wcs[:n] {
			e.complete(wc)
		}
		qpErr := e.conn.QP().Err()
		e.mu.Lock()
		failed, quiet, ft := e.err != nil, !e.errorSent || e.errorDone, e.failTimer
		e.mu.Unlock()
		if failed && (quiet || qpErr != nil) {
			break
		}
		if n > 0 {
			continue
		}
		if qpErr != nil && !failed {
			// The queue pair died and every flushed request was handled.
			e.fail(e.translate(qpErr), false)
			continue
		}
		ctx := e.life
		if failed {
			ctx = ft
		}
		if e.conn.CQ().Wait(ctx) != nil {
			if !failed && e.Err() != nil {
				// Woken by Close (which cancels life) right after a
				// failure this loop has not seen yet: look again, so
				// that an ERROR on its way still gets failGrace to
				// leave before the connection is dropped.
				continue
			}
			break
		}
	}
	e.mu.Lock()
	if e.failCancel != nil {
		e.failCancel()
	}
	e.mu.Unlock()
	_ = e.conn.Close()
}

// complete handles one completion, checking it is the oldest outstanding
// request of its queue.
func (e *endpoint) complete(wc verbs.Completion) {
	if wc.Op == verbs.OpRecv {
		e.postMu.Lock()
		if len(e.recvFIFO) == 0 || e.recvFIFO[0].id != wc.ID {
			var want uint64
			if len(e.recvFIFO) > 0 {
				want = e.recvFIFO[0].id
			}
			e.postMu.Unlock()
			e.fail(&LostCompletionError{Queue: "receive", Want: want, Got: wc.ID}, true)
			return
		}
		rec := e.recvFIFO[0]
		e.recvFIFO = e.recvFIFO[1:]
		e.postMu.Unlock()
		if wc.Status != verbs.StatusSuccess {
			e.qpFailed(wc)
			return
		}
		e.received(rec.slot, e.recvSlot[rec.slot][:wc.ByteLen])
		return
	}
	e.postMu.Lock()
	if len(e.sendFIFO) == 0 || e.sendFIFO[0].id != wc.ID {
		var want uint64
		if len(e.sendFIFO) > 0 {
			want = e.sendFIFO[0].id
		}
		e.postMu.Unlock()
		e.fail(&LostCompletionError{Queue: "send", Want: want, Got: wc.ID}, true)
		return
	}
	rec := e.sendFIFO[0]
	e.sendFIFO = e.sendFIFO[1:]
	e.postMu.Unlock()
	e.mu.Lock()
	switch rec.kind {
	case sendCredited:
		e.freeSend = append(e.freeSend, rec.slot)
		if rec.finWait {
			e.finOut--
		}
	case sendReply:
		e.freeReply = append(e.freeReply, rec.slot)
	case sendError:
		e.errorDone = true
	case sendWrite:
		e.writesOut--
		if rec.slot >= 0 {
			e.freeStage = append(e.freeStage, rec.slot)
		}
	}
	e.broadcast()
	e.mu.Unlock()
	if wc.Status != verbs.StatusSuccess {
		e.qpFailed(wc)
	}
}

// qpFailed turns a failed completion into the channel's error.
func (e *endpoint) qpFailed(wc verbs.Completion) {
	err := wc.Err
	if err == nil {
		err = fmt.Errorf("rdma: %v completed with status %v", wc.Op, wc.Status)
	}
	e.fail(e.translate(err), false)
}

// translate names the side at fault in a provider error.
func (e *endpoint) translate(err error) error {
	if errors.Is(err, verbs.ErrDisconnected) {
		return ErrPeerClosed
	}
	var ae *verbs.AccessError
	if errors.As(err, &ae) {
		if ae.Remote {
			return fmt.Errorf("rdma: the %s refused an RDMA WRITE: %w", e.peer, err)
		}
		return fmt.Errorf("rdma: refused an RDMA WRITE from the %s: %w", e.peer, err)
	}
	return err
}

// received dispatches one control message.
func (e *endpoint) received(slot int, b []byte) {
	m, err := control.Decode(b)
	if err != nil {
		e.fail(fmt.Errorf("rdma: from the %s: %w", e.peer, err), true)
		return
	}
	switch m.Type {
	case control.TypeReady:
		e.mu.Lock()
		e.credits++
		e.broadcast()
		e.mu.Unlock()
		e.repost(slot, false)
	case control.TypeQEMUFile:
		e.mu.Lock()
		if len(m.Data) == 0 {
			e.mu.Unlock()
			e.repost(slot, true)
			return
		}
		e.inbound = append(e.inbound, inMsg{slot: slot, data: m.Data})
		e.broadcast()
		e.mu.Unlock()
	case control.TypeError:
		e.fail(&PeerError{Side: e.peer, Reason: m.Reason}, false)
	case control.TypeRAMBlocksResult, control.TypeRegisterResult:
		e.mu.Lock()
		if e.replyWant != m.Type || e.reply != nil {
			e.mu.Unlock()
			e.fail(protocolf("unexpected %v from the %s", m.Type, e.peer), true)
			return
		}
		e.reply = &m
		e.broadcast()
		e.mu.Unlock()
		e.repost(slot, false)
	default:
		if e.handler == nil {
			e.fail(protocolf("unexpected %v from the %s", m.Type, e.peer), true)
			return
		}
		held, err := e.handler(m, slot)
		if err != nil {
			e.fail(err, true)
			return
		}
		if !held {
			e.repost(slot, true)
		}
	}
}

// repost gives a receive slot back to the queue; credit also returns the
// peer's credit with a READY.
func (e *endpoint) repost(slot int, credit bool) {
	if err := e.postRecv(slot); err != nil {
		e.fail(err, false)
		return
	}
	if credit {
		e.postConst(e.readyMsg)
	}
}

// sendCtrl sends a credited control message: it waits for a peer credit and
// a send slot. sendMu must be held.
func (e *endpoint) sendCtrl(ctx context.Context, m control.Message, finWait bool) error {
	var slot int
	err := e.wait(ctx, "sending "+m.Type.String(), func() bool {
		if e.credits == 0 || len(e.freeSend) == 0 {
			return false
		}
		e.credits--
		slot = e.freeSend[len(e.freeSend)-1]
		e.freeSend = e.freeSend[:len(e.freeSend)-1]
		if finWait {
			e.finOut++
		}
		return true
	})
	if err != nil {
		return err
	}
	b, err := control.Append(e.sendSlot[slot][:0], m)
	if err != nil {
		e.fail(err, true)
		return err
	}
	if err := e.postSend(sendRec{kind: sendCredited, slot: slot, finWait: finWait}, verbs.SendWR{Op: verbs.OpSend, Local: e.sge(b)}); err != nil {
		e.fail(err, false)
		return err
	}
	return nil
}

// request sends a credited request and waits for its reply.
func (e *endpoint) request(ctx context.Context, m control.Message, want control.Type) (control.Message, error) {
	if err := e.postRequest(ctx, m, want); err != nil {
		return control.Message{}, err
	}
	return e.awaitReply(ctx, want)
}

// postRequest sends a credited request whose reply awaitReply collects;
// no other request may be sent meanwhile. sendMu must be held.
func (e *endpoint) postRequest(ctx context.Context, m control.Message, want control.Type) error {
	e.mu.Lock()
	e.replyWant, e.reply = want, nil
	e.mu.Unlock()
	return e.sendCtrl(ctx, m, false)
}

// awaitReply waits for the reply of the request postRequest sent. A wait
// that ends without it fails the channel: the reply may still come, and
// the protocol's state is then unknown.
func (e *endpoint) awaitReply(ctx context.Context, want control.Type) (control.Message, error) {
	var r *control.Message
	err := e.wait(ctx, "waiting for "+want.String(), func() bool { r = e.reply; return r != nil })
	e.mu.Lock()
	e.replyWant, e.reply = 0, nil
	e.mu.Unlock()
	if err != nil {
		// The reply may still come: the protocol state is unknown.
		e.fail(err, true)
		return control.Message{}, err
	}
	return *r, nil
}

// postReply sends a reply from the service goroutine without a credit (the
// requester posted a receive for it).
func (e *endpoint) postReply(m control.Message) error {
	e.mu.Lock()
	if len(e.freeReply) == 0 {
		e.mu.Unlock()
		return protocolf("the %s has more than %d requests outstanding", e.peer, replySlots)
	}
	slot := e.freeReply[len(e.freeReply)-1]
	e.freeReply = e.freeReply[:len(e.freeReply)-1]
	e.mu.Unlock()
	b, err := control.Append(e.replySlot[slot][:0], m)
	if err != nil {
		return err
	}
	return e.postSend(sendRec{kind: sendReply, slot: slot}, verbs.SendWR{Op: verbs.OpSend, Local: e.sge(b)})
}

// writeStream buffers stream bytes, sending a QEMU_FILE per 32 KiB. sendMu
// must be held.
func (e *endpoint) writeStream(ctx context.Context, p []byte, flushRAM func(context.Context) error) (int, error) {
	n := 0
	for len(p) > 0 {
		if e.wbuf == nil {
			e.wbuf = make([]byte, 0, control.MaxQEMUFile)
		}
		k := copy(e.wbuf[len(e.wbuf):cap(e.wbuf)], p)
		e.wbuf = e.wbuf[:len(e.wbuf)+k]
		p, n = p[k:], n+k
		if len(e.wbuf) == cap(e.wbuf) {
			if err := e.flushStream(ctx, flushRAM); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// flushStream sends the buffered stream bytes, after posting any pending RAM
// write (so the stream never overtakes a write issued before it).
func (e *endpoint) flushStream(ctx context.Context, flushRAM func(context.Context) error) error {
	if flushRAM != nil {
		if err := flushRAM(ctx); err != nil {
			return err
		}
	}
	if len(e.wbuf) == 0 {
		return e.Err()
	}
	err := e.sendCtrl(ctx, control.Message{Type: control.TypeQEMUFile, Data: e.wbuf}, false)
	e.wbuf = e.wbuf[:0]
	return err
}

// readStream returns stream bytes from the peer. A drained slot goes back to
// the receive queue and its credit back to the peer.
func (e *endpoint) readStream(ctx context.Context, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	// Not bounded by Options.Timeout: a stream may idle for as long as the
	// peer likes (a source paused before switchover, a long pass of RDMA
	// WRITEs); ctx, Close and the channel's failure (a lost peer is seen
	// by the provider) end the wait.
	err := e.waitFor(ctx, "reading the stream", func() bool { return len(e.inbound) > 0 }, 0)
	if err != nil {
		e.mu.Lock()
		pending := len(e.inbound) > 0
		e.mu.Unlock()
		if !pending {
			if errors.Is(err, ErrPeerClosed) {
				return 0, io.EOF
			}
			return 0, err
		}
	}
	e.mu.Lock()
	in := &e.inbound[0]
	n = copy(p, in.data)
	in.data = in.data[n:]
	done, slot := len(in.data) == 0, in.slot
	if done {
		e.inbound = e.inbound[1:]
	}
	failed := e.err != nil
	e.mu.Unlock()
	if done && !failed {
		e.repost(slot, true)
	}
	return n, nil
}

// shutdown ends the channel. If no other goroutine is sending and the
// channel is healthy, it first sends the buffered stream bytes and waits
// (at most failGrace) until every posted send completed, so an orderly close
// loses nothing; otherwise it aborts the goroutines blocked in the channel.
// Then it stops the service goroutine, disconnects, runs release (with no
// goroutine inside the channel) and frees the arena.
func (e *endpoint) shutdown(readMu chan struct{}, flushRAM func(context.Context) error, release func()) error {
	if e.sendMu.TryLock() {
		if e.Err() == nil {
			ctx, cancel := context.WithTimeout(context.Background(), failGrace)
			if e.flushStream(ctx, flushRAM) == nil {
				e.drainSends(ctx)
			}
			cancel()
		}
	} else {
		e.abort()
		e.sendMu.Lock()
	}
	e.abort()
	readMu <- struct{}{}
	if e.stop != nil {
		<-e.served
	}
	err := e.conn.Close()
	e.mu.Lock()
	if e.failCancel != nil {
		e.failCancel()
	}
	e.mu.Unlock()
	release()
	e.release()
	<-readMu
	e.sendMu.Unlock()
	return err
}

// abort fails the channel with ErrClosed (unless it failed already) and
// stops the service goroutine.
func (e *endpoint) abort() {
	e.mu.Lock()
	if e.err == nil {
		e.err = ErrClosed
		e.failTimer, e.failCancel = context.WithTimeout(context.Background(), failGrace)
		e.broadcast()
	}
	e.mu.Unlock()
	if e.stop != nil {
		e.stop()
	}
}

// drainSends waits until every posted send completed, ctx ends, or the
// channel fails.
func (e *endpoint) drainSends(ctx context.Context) {
	for {
		e.postMu.Lock()
		empty := len(e.sendFIFO) == 0
		e.postMu.Unlock()
		e.mu.Lock()
		failed, ch := e.err != nil, e.changed
		e.mu.Unlock()
		if empty || failed {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
}

// replyWanted reports whether a request is waiting for its reply (tests).
func (e *endpoint) replyWanted() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.replyWant != 0
}

// waiters reports how many goroutines are blocked waiting on the channel
// (tests).
func (e *endpoint) waiters() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.waiting
}

// creditsLeft reports the credits the peer granted and this side has not
// used (tests).
func (e *endpoint) creditsLeft() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.credits
}
