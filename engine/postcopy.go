package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// Postcopy, source side (docs/stream.md "Postcopy"; the destination's half
// is in package loaders).
//
// With postcopy-ram on, the source advises postcopy at the start and runs
// precopy passes as usual. migrate-start-postcopy (Migration.StartPostcopy,
// the only trigger: a pass may recommend it, never start it) makes the
// scanner stop at the next section boundary; then the source switches over:
// switchover (device, or pre-switchover first), the guest stops, every page
// still dirty is discarded on the destination (POSTCOPY_RAM_DISCARD), the
// side moves to postcopy-device and sends the package (POSTCOPY_LISTEN, the
// device state, PING 0x42). Until here a failure restarts the guest here:
// the destination never runs it before POSTCOPY_RUN.
//
// The postcopy commit point is the run trigger, fired when the PONG of PING
// 0x42 says the destination loaded the package, before POSTCOPY_RUN is
// written. From then on the source never runs its guest on its own: every
// fault — a cut, a stall, garbage, migrate-pause — moves it to
// postcopy-paused, where migrate resume=true (Migration.Resume) dials a new
// channel (postcopy-recover-setup), asks for the destination's received
// bitmaps (RECV_BITMAP: what it lacks is sent again), sends POSTCOPY_RESUME
// and, on RESUME_ACK, carries on (postcopy-active). A second failure during
// the reconnect or the handshake returns to postcopy-paused.
//
// In postcopy-active the source sends the pages the destination asks for
// (REQ_PAGES) before any background page: on the main stream, or with
// postcopy-preempt on the preempt channel, which never queues behind the
// background stream. The background stream is paced to
// max-postcopy-bandwidth. When every page is sent the stream ends and the
// destination's SHUT(0) completes the migration.

// ErrPausedByUser is the cause of a pause asked for with migrate-pause.
var ErrPausedByUser = errors.New("Postcopy migration is paused by the user")

// ErrNotPausable is migrate-pause's refusal outside postcopy-active and
// postcopy-recover, in QEMU's words.
var ErrNotPausable = errors.New("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")

// errStartPostcopy stops the page scanner at a section boundary once
// migrate-start-postcopy was given.
var errStartPostcopy = errors.New("migrate-start-postcopy")

// pageReq is a validated page request: count pages from page of block.
type pageReq struct{ block, page, count int }

// pcOut is the source's postcopy state. The migration goroutine owns it,
// except where a field says otherwise.
type pcOut struct {
	s       *sender
	preempt bool

	committed bool // the run trigger fired: the guest never runs here again on its own

	// Requests parsed by the return-path reader (intercept), for the
	// sender loop or the preempt writer. reqMu guards reqs and lastBlock.
	reqMu     sync.Mutex
	reqs      []pageReq
	lastBlock int // the block of the previous request on the current link
	reqWake   chan struct{}
	requests  atomic.Uint64 // requests served (postcopy-requests)

	loaded     chan struct{} // closed by the PONG of PING(0x42)
	loadedOnce sync.Once

	// urgent marks pages sent on the preempt channel since the last
	// recovery (atomic words); the background skips them.
	urgent [][]atomic.Uint64

	// resumeCh hands migrate resume=true's address to the migration
	// goroutine.
	resumeCh chan transport.Addr

	// mu guards link: Migration.Pause kills it.
	mu   sync.Mutex
	link *pcLinkOut

	startBytes uint64 // bytes moved when postcopy began (postcopy-bytes)
	preBytes   atomic.Uint64
	cursor     int // background: the next block to scan (owned by the migration goroutine)
}

// pcLinkOut is one connection of the postcopy phase: the main channel, its
// return-path reader and, with postcopy-preempt, the preempt channel and
// its writer.
type pcLinkOut struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	conns  []transport.Conn
	wg     sync.WaitGroup
	pw     *stream.PageWriter
	preEnd chan chan error // asks the preempt writer to end the channel
}

func (k *pcLinkOut) kill(cause error) {
	k.cancel(cause)
	for _, c := range k.conns {
		_ = c.SetDeadline(time.Unix(1, 0))
	}
}

// newPostcopy prepares postcopy at the start of a migration with
// postcopy-ram on.
func (s *sender) newPostcopy(cfg guards.Config) {
	pc := &pcOut{s: s, preempt: cfg.Caps["postcopy-preempt"], lastBlock: -1, reqWake: make(chan struct{}, 1), loaded: make(chan struct{}), resumeCh: make(chan transport.Addr)}
	for _, b := range s.blocks {
		pc.urgent = append(pc.urgent, make([]atomic.Uint64, guest.BitmapWords(b.Pages())))
	}
	s.pc = pc
	s.m.pcMu.Lock()
	s.m.pc = pc
	s.m.pcMu.Unlock()
}

// advisePostcopy sends POSTCOPY_ADVISE (after OPEN_RETURN_PATH, before
// the RAM section, as QEMU does).
func (s *sender) advisePostcopy(pageSize uint64) error {
	return s.enc.WriteCommand(stream.CmdPostcopyAdvise, stream.PostcopyAdvise(pageSize, pageSize))
}

// openPreempt opens the preempt channel when postcopy-preempt is on, once
// the main stream's header is on the wire: it connects and writes the
// channel's magic at once, so the destination tells it apart from the
// others when it accepts it.
func (s *sender) openPreempt() error {
	if !s.pc.preempt {
		return nil
	}
	pre, err := s.m.opts.Dial(s.m.ioCtx, s.m.addr)
	if err != nil {
		return fmt.Errorf("connect the postcopy preempt channel to %s: %w", s.m.addr, err)
	}
	pw := s.newPageWriter(pre)
	if err := pw.Flush(); err != nil {
		pre.Close()
		return fmt.Errorf("the postcopy preempt channel: %w", err)
	}
	s.preConn, s.prePW = pre, pw
	return nil
}

func (s *sender) newPageWriter(c transport.Conn) *stream.PageWriter {
	blocks := map[string]uint64{}
	for _, b := range s.blocks {
		blocks[b.Name] = uint64(len(b.Mem))
	}
	return stream.NewPageWriter(c, uint64(s.blocks[0].PageSize), blocks)
}

// intercept is called by the return-path reader (readRP) for every
// message: it queues page requests and notes the package-loaded PONG.
// handled is true for those; a malformed request is an error.
func (pc *pcOut) intercept(msg stream.RPMessage) (handled bool, err error) {
	switch msg.Type {
	case stream.RPPong:
		if v, _ := msg.Value(); v == stream.PingPackageLoaded {
			pc.loadedOnce.Do(func() { close(pc.loaded) })
			return true, nil
		}
		return false, nil
	case stream.RPReqPages, stream.RPReqPagesID:
	default:
		return false, nil
	}
	name, named, start, length, ok := msg.PageRequest()
	if !ok {
		return true, fmt.Errorf("a malformed %v", msg.Type)
	}
	pc.reqMu.Lock()
	defer pc.reqMu.Unlock()
	bi := pc.lastBlock
	if named {
		bi = -1
		for i, b := range pc.s.blocks {
			if b.Name == name {
				bi = i
			}
		}
		if bi < 0 {
			return true, fmt.Errorf("the destination asked for pages of unknown block %q", name)
		}
	}
	if bi < 0 {
		return true, errors.New("the destination's REQ_PAGES names no block (no REQ_PAGES_ID came first)")
	}
	b := pc.s.blocks[bi]
	ps := uint64(b.PageSize)
	size := uint64(len(b.Mem))
	if length == 0 || start%ps != 0 || uint64(length)%ps != 0 || start >= size || uint64(length) > size-start || uint64(length)/ps > 1024 {
		return true, fmt.Errorf("the destination asked for %d bytes at %#x of %s (%#x bytes, %d-byte pages)", length, start, b.Name, size, ps)
	}
	pc.lastBlock = bi
	pc.reqs = append(pc.reqs, pageReq{block: bi, page: int(start / ps), count: int(uint64(length) / ps)})
	select {
	case pc.reqWake <- struct{}{}:
	default:
	}
	return true, nil
}

func (pc *pcOut) takeRequests() []pageReq {
	pc.reqMu.Lock()
	defer pc.reqMu.Unlock()
	q := pc.reqs
	pc.reqs = nil
	return q
}

func (pc *pcOut) markUrgent(bi, p int) {
	pc.urgent[bi][p>>6].Or(1 << (uint(p) & 63))
}

func (pc *pcOut) isUrgent(bi, p int) bool {
	return pc.urgent[bi][p>>6].Load()&(1<<(uint(p)&63)) != 0
}

// postcopyRequested reports whether migrate-start-postcopy was given.
func (s *sender) postcopyRequested() bool { return s.pc != nil && s.m.pcStart.Load() }

// startPostcopy switches the migration to postcopy and runs it to its end.
func (s *sender) startPostcopy(cfg guards.Config) error {
	m := s.m
	pc := s.pc
	if err := s.awaitProto(); err != nil {
		return err
	}
	if s.proto.Load() != peerSpeaks {
		return errors.New("postcopy needs a destination that speaks migctl's extensions (switchover-commit/1), and this one did not answer HELLO: switch postcopy-ram off, or migrate to a newer migctl")
	}
	out, err := m.c.Fire(m.ioCtx, spec.Outgoing, machine.TriggerSwitchover, nil)
	if err != nil {
		return err
	}
	if out.To == machine.StatePreSwitchover {
		if err := s.awaitContinue(); err != nil {
			return err
		}
	}
	tStop, err := s.stopForSwitchover()
	if err != nil {
		return err
	}
	m.g.SyncDirty(s.dirty)
	s.stats.Remaining = s.dirtyBytes()
	// Every page still dirty, sent or not, is dropped on the destination:
	// it comes again, on demand or in the background.
	for bi, b := range s.blocks {
		if err := s.enc.WriteDiscard(b.Name, dirtyRanges(guest.Bitmap(s.dirty[bi]), b.PageSize)); err != nil {
			return err
		}
	}
	if _, err := m.c.Fire(m.ioCtx, spec.Outgoing, machine.TriggerPostcopy, nil); err != nil {
		return err
	}
	if err := s.enc.WritePackage(func(p *stream.Encoder) error {
		if err := p.WriteCommand(stream.CmdPostcopyListen, nil); err != nil {
			return err
		}
		for _, d := range m.g.Devices() {
			state, err := d.Save()
			if err != nil {
				return fmt.Errorf("save device %s: %w", d.Name(), err)
			}
			if err := p.WriteDevice(d.Name(), d.Instance(), d.Version(), state); err != nil {
				return err
			}
		}
		return p.Ping(stream.PingPackageLoaded)
	}); err != nil {
		return err
	}
	if err := s.enc.Flush(); err != nil {
		return err
	}
	if err := s.awaitPackageLoaded(); err != nil {
		return err
	}
	// The postcopy link exists before the side shows postcopy-active, so
	// that migrate-pause (which kills the link) works from the first
	// moment QMP reports that state. In postcopy a stall pauses (the
	// link's watchdog), never fails.
	s.stopWatch()
	k := s.newLinkOut(s.preConn, s.prePW)
	s.preConn, s.prePW = nil, nil
	// The commit point: POSTCOPY_RUN goes out next.
	if _, err := m.c.Fire(m.ioCtx, spec.Outgoing, machine.TriggerRun, nil); err != nil {
		s.closeLink(k, err)
		return err
	}
	s.committed, pc.committed = true, true
	s.stats.Downtime = time.Since(tStop)
	pc.startBytes = s.moved()
	m.log.Info("switched to postcopy", "downtime", s.stats.Downtime, "remaining", s.stats.Remaining)
	return s.runPostcopy(k)
}

// dirtyRanges turns the set bits of bm into byte ranges.
func dirtyRanges(bm guest.Bitmap, pageSize int) []stream.Range {
	var out []stream.Range
	ps := uint64(pageSize)
	for p := bm.Next(0); p >= 0; {
		q := p + 1
		for q < 64*len(bm) && bm.Test(q) {
			q++
		}
		out = append(out, stream.Range{Start: uint64(p) * ps, Length: uint64(q-p) * ps})
		p = bm.Next(q)
	}
	return out
}

// awaitPackageLoaded waits for the PONG of PING(0x42), still before the
// commit point: the precopy watchdog bounds it, and a failure the
// destination reports, a cut or a stall fail the migration with the guest
// running here again.
func (s *sender) awaitPackageLoaded() error {
	for {
		select {
		case <-s.pc.loaded:
			return nil
		case ev, ok := <-s.rp:
			if err := s.beforeSwitchover(ev, ok); err != nil {
				return err
			}
		case <-s.m.ioCtx.Done():
			return context.Cause(s.m.ioCtx)
		}
	}
}

// runPostcopy serves the postcopy phase until the destination confirmed
// every page (nil) or the process shuts down (Abort). A link that fails
// pauses the migration and waits for migrate resume=true.
func (s *sender) runPostcopy(k *pcLinkOut) error {
	m := s.m
	err := s.enc.WriteCommand(stream.CmdPostcopyRun, nil)
	if err == nil {
		err = s.enc.Flush()
	}
	for {
		if err == nil {
			err = s.servePostcopy(k)
		}
		if err == nil {
			return s.completePostcopy(k)
		}
		s.closeLink(k, err)
		if cause := context.Cause(m.ioCtx); cause != nil {
			return cause
		}
		m.log.Warn("postcopy paused", "err", err)
		if _, ferr := m.c.Fire(context.Background(), spec.Outgoing, machine.TriggerPause, &machine.Args{Reason: "postcopy paused: " + err.Error()}); ferr != nil {
			return errors.Join(err, ferr)
		}
		s.publish(true)
		if k, err = s.recoverPostcopy(); err != nil {
			return err
		}
	}
}

// newLinkOut starts serving the current main channel (s.conn, s.enc) and,
// with postcopy-preempt, the preempt channel pre: the return-path reader,
// the link's watchdog, and the preempt writer.
func (s *sender) newLinkOut(pre transport.Conn, pw *stream.PageWriter) *pcLinkOut {
	m := s.m
	pc := s.pc
	k := &pcLinkOut{conns: []transport.Conn{s.conn}}
	k.ctx, k.cancel = context.WithCancelCause(m.ioCtx)
	if pre != nil {
		k.conns = append(k.conns, pre)
	}
	stop := context.AfterFunc(k.ctx, func() { k.kill(context.Cause(k.ctx)) })
	s.dog.Feed()
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		defer stop()
		s.dog.Run(k.ctx, watchdog.Watch{
			Limits: func() watchdog.Limits {
				return watchdog.Limits{Keepalive: s.liveDuration(paramKeepalive, time.Second), Timeout: s.liveDuration(paramIOTimeout, 30*time.Second)}
			},
			Stalled: func(since time.Time) { _ = m.c.PublishStalled(spec.Outgoing, since) },
			Timeout: func(silent time.Duration) {
				k.kill(&StallError{Silent: silent, Timeout: s.liveDuration(paramIOTimeout, 30*time.Second)})
			},
		})
		_ = m.c.PublishStalled(spec.Outgoing, time.Time{})
	}()
	if pre != nil {
		k.pw = pw
		k.preEnd = make(chan chan error)
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			s.preemptWriter(k)
		}()
	}
	pc.mu.Lock()
	pc.link = k
	pc.mu.Unlock()
	return k
}

// preemptWriter sends requested pages on the preempt channel as they are
// asked for, until the link ends or the sender asks it to end the channel.
func (s *sender) preemptWriter(k *pcLinkOut) {
	pc := s.pc
	for {
		var end chan error
		select {
		case <-k.ctx.Done():
			return
		case <-pc.reqWake:
		case end = <-k.preEnd:
		}
		if err := s.sendUrgent(pc.takeRequests(), func(b *guest.Block, p int) error {
			pc.markUrgent(s.blockIndex(b), p)
			pc.preBytes.Add(uint64(b.PageSize) + 8)
			return k.pw.PutPage(b.Name, uint64(p)*uint64(b.PageSize), b.Page(p))
		}); err == nil {
			err = k.pw.Flush()
			if end != nil && err == nil {
				err = k.pw.Close()
			}
			if err != nil {
				k.kill(fmt.Errorf("preempt channel: %w", err))
			}
			if end != nil {
				end <- err
				return
			}
		} else {
			k.kill(err)
			if end != nil {
				end <- err
			}
			return
		}
	}
}

func (s *sender) blockIndex(b *guest.Block) int {
	for i, x := range s.blocks {
		if x == b {
			return i
		}
	}
	return -1
}

// sendUrgent sends the pages of reqs with put, in the order asked.
func (s *sender) sendUrgent(reqs []pageReq, put func(b *guest.Block, p int) error) error {
	pc := s.pc
	for _, r := range reqs {
		b := s.blocks[r.block]
		for p := r.page; p < r.page+r.count; p++ {
			if err := put(b, p); err != nil {
				return err
			}
		}
		pc.requests.Add(1)
	}
	return nil
}

// servePostcopy runs one link: urgent pages first, then the background
// stream paced to max-postcopy-bandwidth, then the end of the stream and
// the destination's SHUT(0). It returns nil once the destination confirmed,
// or the link's failure.
func (s *sender) servePostcopy(k *pcLinkOut) error {
	pc := s.pc
	const chunk = 64 << 10
	open := false // a RAM section is open on the main stream
	closeSection := func() error {
		if !open {
			return nil
		}
		open = false
		return s.enc.CloseRAMSection()
	}
	put := func(b *guest.Block, p int) error {
		if !open {
			if err := s.enc.BeginRAMPart(); err != nil {
				return err
			}
			open = true
		}
		return s.enc.PutPage(b.Name, uint64(p)*uint64(b.PageSize), b.Page(p))
	}
	check := func() error {
		if err := context.Cause(k.ctx); err != nil {
			return err
		}
		for {
			select {
			case ev, ok := <-s.rp:
				if _, err := s.onRP(ev, ok); err != nil {
					return err
				}
				if ev.msg.Type == stream.RPShut {
					return errors.New("the destination confirmed before the stream ended")
				}
			default:
				return nil
			}
		}
	}
	urgent := func() error {
		if pc.preempt {
			return nil
		}
		reqs := pc.takeRequests()
		if len(reqs) == 0 {
			return nil
		}
		if err := s.sendUrgent(reqs, func(b *guest.Block, p int) error {
			guest.Bitmap(s.dirty[s.blockIndex(b)]).Clear(p)
			return put(b, p)
		}); err != nil {
			return err
		}
		if err := closeSection(); err != nil {
			return err
		}
		return s.enc.Flush()
	}
	since, sent := time.Now(), 0
	for {
		if err := check(); err != nil {
			return err
		}
		if err := urgent(); err != nil {
			return err
		}
		// max-postcopy-bandwidth holds the background stream only: a wait
		// that a page request ends serves the request (above) and then
		// waits again, never letting a background chunk through early.
		if limit := s.liveUint("max-postcopy-bandwidth"); limit > 0 && sent > 0 {
			if wait := time.Duration(float64(sent)/float64(limit)*float64(time.Second)) - time.Since(since); wait > 0 {
				if err := s.pacePostcopy(k, since, sent); err != nil {
					return err
				}
				continue
			}
		}
		// The next chunk of the background stream.
		n := 0
		for n < chunk && pc.cursor < len(s.blocks) {
			bi := pc.cursor
			b := s.blocks[bi]
			bm := guest.Bitmap(s.dirty[bi])
			p := bm.Next(0)
			if p < 0 {
				pc.cursor++
				continue
			}
			bm.Clear(p)
			s.stats.Remaining -= min(s.stats.Remaining, uint64(b.PageSize))
			if pc.isUrgent(bi, p) {
				continue
			}
			if err := put(b, p); err != nil {
				return err
			}
			n += b.PageSize
		}
		if err := closeSection(); err != nil {
			return err
		}
		if err := s.enc.Flush(); err != nil {
			return err
		}
		s.publish(false)
		if n == 0 {
			break // every page is on its way
		}
		sent += n
		if time.Since(since) > time.Second {
			since, sent = time.Now(), 0
		}
	}
	// The end: urgent pages still queued, the preempt channel's EOS, the
	// main stream's END and EOF; then the destination's SHUT(0).
	if err := urgent(); err != nil {
		return err
	}
	if k.pw != nil {
		done := make(chan error, 1)
		select {
		case k.preEnd <- done:
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
		select {
		case err := <-done:
			if err != nil {
				return err
			}
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
	}
	if err := s.enc.BeginRAMEnd(); err != nil {
		return err
	}
	if err := s.enc.CloseRAMSection(); err != nil {
		return err
	}
	if err := s.enc.Close(); err != nil {
		return err
	}
	_ = s.conn.CloseWrite()
	s.stats.Remaining = 0
	s.publish(true)
	for {
		select {
		case ev, ok := <-s.rp:
			confirmed, err := s.onRP(ev, ok)
			if err != nil {
				return err
			}
			if confirmed {
				return nil
			}
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
	}
}

// pacePostcopy holds the background stream to max-postcopy-bandwidth
// (re-read every 100 ms: it is live), waking at once for page requests,
// return-path messages and the link's end; it sends keepalives while it
// waits.
func (s *sender) pacePostcopy(k *pcLinkOut, since time.Time, sent int) error {
	for {
		if err := s.keepalive(); err != nil {
			return err
		}
		limit := s.liveUint("max-postcopy-bandwidth")
		if limit == 0 {
			return nil
		}
		wait := time.Duration(float64(sent)/float64(limit)*float64(time.Second)) - time.Since(since)
		if wait <= 0 {
			return nil
		}
		t := time.NewTimer(min(wait, 100*time.Millisecond))
		var wake <-chan struct{}
		if !s.pc.preempt {
			wake = s.pc.reqWake
		}
		select {
		case <-t.C:
		case <-wake:
			t.Stop()
			// Serve the request now; the next chunk waits again.
			select {
			case s.pc.reqWake <- struct{}{}:
			default:
			}
			return nil
		case <-k.ctx.Done():
			t.Stop()
			return context.Cause(k.ctx)
		}
	}
}

// completePostcopy ends a migration the destination confirmed.
func (s *sender) completePostcopy(k *pcLinkOut) error {
	m := s.m
	s.closeLink(k, nil)
	s.publish(true)
	if m.opts.Checksum != nil {
		if sum, err := m.opts.Checksum(); err == nil {
			s.stats.Checksum = sum
		}
	}
	s.publish(true)
	out, err := m.c.Fire(context.Background(), spec.Outgoing, machine.TriggerComplete, nil)
	if err != nil {
		return err
	}
	s.final = out.To
	_, _ = m.c.Fire(context.Background(), spec.Guest, machine.TriggerMigrated, nil)
	return nil
}

// closeLink ends a link: its connections are closed, its goroutines and
// return-path reader waited for.
func (s *sender) closeLink(k *pcLinkOut, cause error) {
	pc := s.pc
	pc.mu.Lock()
	if pc.link == k {
		pc.link = nil
	}
	pc.mu.Unlock()
	if cause == nil {
		cause = context.Canceled
	}
	k.kill(cause)
	k.wg.Wait()
	for _, c := range k.conns {
		c.Close()
	}
	if s.rpDone != nil {
		for range s.rp { // the reader ends once the channel is closed
		}
		<-s.rpDone
	}
}

// recoverPostcopy waits, paused, for migrate resume=true and reconnects;
// a failed reconnect or handshake pauses again. Only the process shutting
// down ends the wait (with its cause).
func (s *sender) recoverPostcopy() (*pcLinkOut, error) {
	m := s.m
	for {
		var a transport.Addr
		select {
		case a = <-s.pc.resumeCh:
		case <-m.ioCtx.Done():
			return nil, context.Cause(m.ioCtx)
		}
		k, err := s.reconnect(a)
		if err == nil {
			return k, nil
		}
		if cause := context.Cause(m.ioCtx); cause != nil {
			return nil, cause
		}
		m.log.Warn("postcopy recovery failed; paused again", "err", err)
	}
}

// reconnect dials a (postcopy-recover-setup → postcopy-recover, or back to
// postcopy-paused), asks for the received bitmaps, resumes, and returns
// the new link with POSTCOPY_RUN sent again (the destination ignores it if
// its guest runs).
func (s *sender) reconnect(a transport.Addr) (*pcLinkOut, error) {
	m := s.m
	pc := s.pc
	ctx, cancel := context.WithCancel(m.ioCtx)
	defer cancel()
	if d := s.liveDuration(paramIOTimeout, 30*time.Second); d > 0 {
		var c2 context.CancelFunc
		ctx, c2 = context.WithTimeoutCause(ctx, d, fmt.Errorf("the destination did not take the new channel within x-migctl-io-timeout (%v)", d))
		defer c2()
	}
	conn, err := m.opts.Dial(ctx, a)
	var pre transport.Conn
	if err == nil && pc.preempt {
		if pre, err = m.opts.Dial(ctx, a); err != nil {
			conn.Close()
		}
	}
	if err != nil {
		err = fmt.Errorf("connect to %s: %w", a, err)
		if _, ferr := m.c.Fire(context.Background(), spec.Outgoing, machine.TriggerConnectFailed, &machine.Args{Reason: "postcopy recovery: " + err.Error()}); ferr != nil {
			return nil, errors.Join(err, ferr)
		}
		return nil, err
	}
	if _, err := m.c.Fire(m.ioCtx, spec.Outgoing, machine.TriggerConnect, nil); err != nil {
		conn.Close()
		if pre != nil {
			pre.Close()
		}
		return nil, err
	}
	s.setConn(conn)
	s.enc.Resume(&feedingConn{Conn: conn, s: s})
	hs := &pcLinkOut{conns: []transport.Conn{conn}}
	hs.ctx, hs.cancel = context.WithCancelCause(ctx)
	if pre != nil {
		hs.conns = append(hs.conns, pre)
	}
	pc.mu.Lock()
	pc.link = hs // migrate-pause reaches the handshake
	pc.mu.Unlock()
	stop := context.AfterFunc(hs.ctx, func() { hs.kill(context.Cause(hs.ctx)) })
	var pw *stream.PageWriter
	pw, err = s.resumeHandshake(pre)
	stop()
	pc.mu.Lock()
	pc.link = nil
	pc.mu.Unlock()
	if err == nil {
		err = context.Cause(hs.ctx)
	}
	if err != nil {
		hs.kill(err)
		conn.Close()
		if pre != nil {
			pre.Close()
		}
		if _, ferr := m.c.Fire(context.Background(), spec.Outgoing, machine.TriggerPause, &machine.Args{Reason: "postcopy recovery: " + err.Error()}); ferr != nil {
			return nil, errors.Join(err, ferr)
		}
		return nil, err
	}
	hs.cancel(nil)
	_ = conn.SetDeadline(time.Time{})
	if pre != nil {
		_ = pre.SetDeadline(time.Time{})
	}
	if _, err := m.c.Fire(m.ioCtx, spec.Outgoing, machine.TriggerResumeAck, nil); err != nil {
		conn.Close()
		if pre != nil {
			pre.Close()
		}
		return nil, err
	}
	// The return-path reader and the rest of the link.
	s.rp = make(chan rpEvent, 16)
	s.rpDone = make(chan struct{})
	pc.reqMu.Lock()
	pc.lastBlock = -1
	pc.reqMu.Unlock()
	go s.readRP()
	k := s.newLinkOut(pre, pw)
	if err := s.enc.WriteCommand(stream.CmdPostcopyRun, nil); err != nil {
		return k, nil // the link's next write fails the same way: it pauses
	}
	_ = s.enc.Flush()
	m.log.Info("postcopy resumed", "to", a.String(), "remaining", s.stats.Remaining)
	return k, nil
}

// resumeHandshake asks for every block's received bitmap (what the
// destination lacks becomes dirty again: nothing lost in flight stays
// lost), sends POSTCOPY_RESUME and waits for RESUME_ACK. The reads are
// bounded by the handshake's context (x-migctl-io-timeout, migrate-pause,
// the process shutting down).
func (s *sender) resumeHandshake(pre transport.Conn) (pw *stream.PageWriter, err error) {
	if pre != nil {
		pw = s.newPageWriter(pre)
		if err := pw.Flush(); err != nil { // the magic: the destination tells the channels apart
			return nil, err
		}
	}
	return pw, s.resumeExchange()
}

// resumeExchange is the handshake's exchange on the main channel.
func (s *sender) resumeExchange() error {
	pc := s.pc
	for _, b := range s.blocks {
		if err := s.enc.WriteCommand(stream.CmdRecvBitmap, stream.RecvBitmapCommand(b.Name)); err != nil {
			return err
		}
	}
	if err := s.enc.Flush(); err != nil {
		return err
	}
	got := map[int]bool{}
	for len(got) < len(s.blocks) {
		msg, err := stream.ReadRP(s.conn)
		if err != nil {
			return fmt.Errorf("the recovery handshake: %w", err)
		}
		switch msg.Type {
		case stream.RPRecvBitmap:
		case stream.RPKeepalive, stream.RPPong, stream.RPHello:
			continue
		case stream.RPFailReason:
			return &failure{reason: "destination: " + string(msg.Data)}
		default:
			return fmt.Errorf("the recovery handshake: %v, want RECV_BITMAP", msg.Type)
		}
		name, err := stream.ParseRecvBitmapCommand(msg.Data)
		if err != nil {
			return err
		}
		bi := -1
		for i, b := range s.blocks {
			if b.Name == name {
				bi = i
			}
		}
		if bi < 0 || got[bi] {
			return fmt.Errorf("the recovery handshake: a received bitmap for block %q, unknown or twice", name)
		}
		words, err := stream.ReadRecvBitmap(s.conn, s.blocks[bi].Pages())
		if err != nil {
			return err
		}
		got[bi] = true
		// What the destination lacks is dirty again.
		d := guest.Bitmap(s.dirty[bi])
		pages := s.blocks[bi].Pages()
		for w := range d {
			d[w] = ^words[w]
		}
		if tail := pages % 64; tail != 0 {
			d[len(d)-1] &= 1<<tail - 1
		}
		for w := range pc.urgent[bi] {
			pc.urgent[bi][w].Store(0)
		}
	}
	s.stats.Remaining = s.dirtyBytes()
	pc.cursor = 0
	if err := s.enc.WriteCommand(stream.CmdPostcopyResume, nil); err != nil {
		return err
	}
	if err := s.enc.Flush(); err != nil {
		return err
	}
	for {
		msg, err := stream.ReadRP(s.conn)
		if err != nil {
			return fmt.Errorf("the recovery handshake: %w", err)
		}
		switch msg.Type {
		case stream.RPResumeAck:
			if v, _ := msg.Value(); v != 1 {
				return fmt.Errorf("RESUME_ACK(%d), want 1", v)
			}
			return nil
		case stream.RPKeepalive, stream.RPPong:
		case stream.RPFailReason:
			return &failure{reason: "destination: " + string(msg.Data)}
		default:
			return fmt.Errorf("the recovery handshake: %v, want RESUME_ACK", msg.Type)
		}
	}
}

// setConn makes c the main channel an interrupt reaches.
func (s *sender) setConn(c transport.Conn) {
	s.ioMu.Lock()
	s.conn, s.raw = c, c
	s.ioMu.Unlock()
}

// endPostcopy records the end of a migration that committed to postcopy
// and did not complete: the process shuts down (Abort). The guest stays
// stopped here: it runs on the destination.
func (s *sender) endPostcopy(err error) {
	m := s.m
	s.publish(true)
	st, _ := m.c.Status(spec.Outgoing, 0)
	m.result = Result{State: st.State, Stats: s.stats, Err: fmt.Errorf("postcopy did not complete: %w", err)}
	m.log.Error("postcopy ended before it completed", "state", st.State, "err", err)
}

// StartPostcopy is QMP migrate-start-postcopy: the migration switches to
// postcopy at the next section boundary of its page scanner. As in QEMU,
// a migration that is not in precopy any more ignores it. The caller (vmm)
// has checked that postcopy-ram is on.
func (m *Migration) StartPostcopy() {
	m.pcStart.Store(true)
}

// Pause is QMP migrate-pause on the source: the channel of a postcopy
// migration in postcopy-active (or its recovery handshake) is shut down and
// the migration goes to postcopy-paused.
func (m *Migration) Pause() error {
	m.pcMu.Lock()
	pc := m.pc
	m.pcMu.Unlock()
	if pc == nil {
		return ErrNotPausable
	}
	// As QEMU, only a postcopy that is alive: not before POSTCOPY_RUN.
	if st, err := m.c.Status(spec.Outgoing, 0); err != nil || st.State != machine.StatePostcopyActive && st.State != machine.StatePostcopyRecover {
		return ErrNotPausable
	}
	pc.mu.Lock()
	k := pc.link
	pc.mu.Unlock()
	if k == nil {
		return ErrNotPausable
	}
	k.kill(ErrPausedByUser)
	return nil
}

// Resume is QMP migrate with resume=true: the rules judge uri (resume:
// postcopy-paused → postcopy-recover-setup) and the migration goroutine
// dials it. A refusal (the migration is not paused) is returned at once.
func (m *Migration) Resume(ctx context.Context, uri string, channels []string) error {
	a, err := transport.Parse(uri)
	if err != nil {
		return err
	}
	ep := &guards.Endpoint{Transport: a.Scheme, URI: a.String(), Channels: channels, Props: probeProps(m.opts.Probe, a)}
	if _, err := m.c.Fire(ctx, spec.Outgoing, machine.TriggerResume, &machine.Args{Endpoint: ep}); err != nil {
		return err
	}
	m.pcMu.Lock()
	pc := m.pc
	m.pcMu.Unlock()
	if pc == nil {
		return errors.New("no postcopy migration to resume")
	}
	select {
	case pc.resumeCh <- a:
		return nil
	case <-m.done:
		return errors.New("the migration ended")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Abort tears the migration down without asking the state machine (the
// process shuts down): what Cancel cannot do once postcopy began.
func (m *Migration) Abort(reason string) { m.cancelIO(errors.New(reason)) }

// pcStats adds postcopy's statistics (called by publish): the requests
// served, the bytes sent since the switch, the preempt channel's too.
func (s *sender) pcStats() {
	pc := s.pc
	if pc == nil {
		return
	}
	s.stats.PostcopyRequests = pc.requests.Load()
	pre := pc.preBytes.Load()
	s.stats.Transferred += pre
	if pc.committed {
		s.stats.PostcopyBytes = s.stats.Transferred - pc.startBytes
		s.stats.PrecopyBytes = pc.startBytes - s.stats.DowntimeBytes
	}
}

// convergence counts the passes in a row whose expected downtime stayed
// above downtime-limit; at x-migctl-convergence-passes (0: never) the
// source reports that the migration does not converge. It recommends
// migrate-start-postcopy when postcopy-ram is on; it never starts it.
func (s *sender) convergence(expected, limit time.Duration) {
	if expected <= limit {
		s.nonConverging = 0
		s.stats.NotConverging = false
		return
	}
	s.nonConverging++
	k := s.liveUint(paramConvergencePasses)
	if k == 0 || s.nonConverging < k || s.stats.NotConverging {
		return
	}
	s.stats.NotConverging = true
	advice := "raise max-bandwidth or downtime-limit, or switch auto-converge on"
	if s.pc != nil {
		advice = "migrate-start-postcopy would end it (postcopy-ram is on)"
	}
	s.m.log.Warn("the migration does not converge", "passes", s.nonConverging, "expected_downtime", expected, "downtime_limit", limit, "advice", advice)
	s.publish(true)
}

// paramConvergencePasses is migctl's x-migctl-convergence-passes.
const paramConvergencePasses = "x-migctl-convergence-passes"
