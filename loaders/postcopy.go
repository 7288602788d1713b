package loaders

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/postcopy"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
	"github.com/migctl/migctl/uffd"
)

// Postcopy, destination side (docs/stream.md "Postcopy"; the source's half
// is in package engine).
//
// With postcopy-ram on and a guest.Postcopier guest (its vCPUs in another
// process, its RAM registered for MISSING faults), precopy pages go into
// guest RAM through migctl's own mapping and are marked in the guest's
// received bitmap (shared memory the guest process keeps). POSTCOPY_LISTEN,
// first in the package the source sends when it switches over, moves the
// side to postcopy-device: the pre-faulter stops, a hole is punched for
// every page not received (a pre-faulted page never received would be a
// zero page the guest reads without faulting), pages known to be zero are
// installed, and the fault service starts: it turns every fault on a
// missing page into a page request on the return path. The package's
// devices load, its PING(0x42) is answered: from then on the source may
// commit, so a failure pauses instead of failing. POSTCOPY_RUN starts the
// guest (postcopy-active); every later page is installed only with
// UFFDIO_COPY. The main stream's EOF, the preempt channel's EOS and every
// page received complete the migration.
//
// A link that breaks, stalls or carries garbage (or migrate-pause) pauses
// the side (postcopy-paused): the fault service keeps running and queues
// requests; migrate-recover (Incoming.Recover) listens on a new address;
// the source's new channel moves it to postcopy-recover; the source's
// RECV_BITMAP commands are answered with the received bitmaps, its
// POSTCOPY_RESUME with RESUME_ACK (postcopy-active), after which every
// pending request is sent again. A failure during the handshake or the
// reconnect pauses again: the side never fails on a fault after the source
// may have committed.

// ErrPausedByUser is the cause of a pause asked for with migrate-pause.
var ErrPausedByUser = errors.New("Postcopy migration is paused by the user")

// pcIn is the destination's postcopy state. The loader goroutine owns it,
// except where a field says otherwise.
type pcIn struct {
	l         *loader
	svc       *postcopy.Service
	ufd       *uffd.FD
	blocks    []*guest.Block
	pageSize  int
	preempt   bool // capability postcopy-preempt
	blocktime bool // capability postcopy-blocktime: report QEMU's blocktime
	early     transport.Conn

	listened bool        // LISTEN processed: pages go in with UFFDIO_COPY
	ponged   atomic.Bool // PONG(0x42) sent: the source may commit from now on
	started  bool        // the guest started here (RUN)
	zeroPage []byte
	scratch  []byte

	svcCancel context.CancelFunc
	svcDone   chan error

	// The fault thread's requests, for the requester goroutine.
	reqMu     sync.Mutex
	reqs      []postcopy.Request
	reqWake   chan struct{}
	linkGen   atomic.Uint64 // a new link: the requester names the block again
	linkReady atomic.Bool   // the current link carries requests
	reqDone   chan struct{}
	requests  atomic.Uint64

	// Operator commands. mu guards link, recoverLn and waiting.
	mu        sync.Mutex
	link      *pcLink
	recoverLn transport.Listener
	lnCh      chan transport.Listener // Recover hands the listener to the loader goroutine
}

// pcLink is one connection of the postcopy phase (main, and preempt when
// the source uses it) and the goroutines that serve it.
type pcLink struct {
	main   transport.Conn
	ctx    context.Context
	cancel context.CancelCauseFunc
	dog    *watchdog.Dog
	wg     sync.WaitGroup

	mu      sync.Mutex // guards pre, preDone
	pre     transport.Conn
	preDone chan error // the preempt reader's end: nil at its EOS
	preSeen chan struct{}
}

// kill ends the link with cause: blocked reads and writes return at once.
func (k *pcLink) kill(cause error) {
	k.cancel(cause)
	_ = k.main.SetDeadline(time.Unix(1, 0))
	k.mu.Lock()
	if k.pre != nil {
		_ = k.pre.SetDeadline(time.Unix(1, 0))
	}
	k.mu.Unlock()
}

// close kills the link, closes its connections and waits for its
// goroutines.
func (k *pcLink) close(cause error) {
	k.kill(cause)
	k.wg.Wait()
	k.main.Close()
	k.mu.Lock()
	if k.pre != nil {
		k.pre.Close()
	}
	k.mu.Unlock()
}

// postcopyLimits lets the decoder read packages when the guest can take
// postcopy.
func postcopyLimits(g guest.Guest, lim *stream.Limits) {
	if _, ok := g.(guest.Postcopier); ok {
		lim.MaxPackage = stream.DefaultMaxPackage
	}
}

// armPostcopy prepares postcopy once the configuration is frozen (after
// connect): the fault service over the guest's registration (not running
// yet) and, with postcopy-preempt, the preempt channel (among early, or
// accepted now). It returns the early channels that are not the preempt
// one.
func (l *loader) armPostcopy(cfg guards.Config, early []transport.Conn) ([]transport.Conn, error) {
	var pre transport.Conn
	rest := early[:0:0]
	for _, c := range early {
		if pc, ok := c.(*peekedConn); ok && pc.role == rolePreempt && pre == nil {
			pre = c
			continue
		}
		rest = append(rest, c)
	}
	if !cfg.Caps["postcopy-ram"] {
		if pre != nil {
			pre.Close()
			return rest, errors.New("a postcopy preempt channel connected, but postcopy-ram is off on this destination")
		}
		return rest, nil
	}
	fail := func(err error) ([]transport.Conn, error) {
		if pre != nil {
			pre.Close()
		}
		return rest, err
	}
	g, ok := l.in.g.(guest.Postcopier)
	if !ok {
		return fail(errors.New("capability postcopy-ram needs a guest whose vCPUs run in a process of their own (guest.Postcopier; migctl serve --guest …,postcopy=on)"))
	}
	if !l.proto {
		// HELLO is answered when the source opens the return path, before
		// any page: by now the source announced the extensions or not.
		if !l.hs.Speaks(stream.ExtSwitchoverCommit) || l.in.opts.NoCommitProtocol {
			return fail(errors.New("postcopy needs a source that speaks migctl's extensions (switchover-commit/1): this one does not; switch postcopy-ram off"))
		}
	}
	pc := &pcIn{l: l, preempt: cfg.Caps["postcopy-preempt"], blocktime: cfg.Caps["postcopy-blocktime"], blocks: l.in.g.Blocks(), reqWake: make(chan struct{}, 1), lnCh: make(chan transport.Listener)}
	pc.pageSize = int(l.stats.PageSize)
	pc.zeroPage = make([]byte, pc.pageSize)
	pc.scratch = make([]byte, pc.pageSize)
	svc, fd, err := postcopy.FromGuest(g, postcopy.Options{Request: pc.request, Batch: l.in.opts.PostcopyBatch})
	if err != nil {
		return fail(err)
	}
	pc.svc, pc.ufd = svc, fd
	l.pc = pc
	l.in.pcMu.Lock()
	l.in.pc = pc
	l.in.pcMu.Unlock()
	if pc.preempt && pre == nil {
		c, err := l.acceptPreempt()
		if err != nil {
			return rest, err
		}
		pre = c
	}
	pc.early = pre
	return rest, nil
}

// acceptPreempt accepts the preempt channel on the initial listener
// (bounded by channelTimeout).
func (l *loader) acceptPreempt() (transport.Conn, error) {
	ctx, cancel := context.WithTimeout(l.in.ioCtx, channelTimeout)
	defer cancel()
	c, err := l.in.ln.Accept(ctx)
	if err != nil {
		return nil, fmt.Errorf("waiting for the postcopy preempt channel: %w", err)
	}
	r, pc, err := l.classify(c)
	if err == nil && r != rolePreempt {
		err = fmt.Errorf("a %v channel connected where the postcopy preempt channel was expected", r)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return pc, nil
}

// request is the fault service's callback (on its locked thread): queue
// and return.
func (pc *pcIn) request(r postcopy.Request) {
	pc.reqMu.Lock()
	pc.reqs = append(pc.reqs, r)
	pc.reqMu.Unlock()
	select {
	case pc.reqWake <- struct{}{}:
	default:
	}
}

// requester sends the queued page requests on the current link's return
// path: REQ_PAGES_ID when the block changes (or a new link starts), else
// REQ_PAGES. While no link is ready the requests wait; urgent ones lost on
// a broken link are sent again after recovery (Service.Pending).
func (pc *pcIn) requester(ctx context.Context) {
	defer close(pc.reqDone)
	lastGen, lastBlock := uint64(0), -1
	for {
		select {
		case <-ctx.Done():
			return
		case <-pc.reqWake:
		}
		if !pc.linkReady.Load() {
			continue
		}
		pc.reqMu.Lock()
		q := pc.reqs
		pc.reqs = nil
		pc.reqMu.Unlock()
		if gen := pc.linkGen.Load(); gen != lastGen {
			lastGen, lastBlock = gen, -1
		}
		for _, r := range q {
			start := uint64(r.Page) * uint64(pc.pageSize)
			n := uint32(r.Count * pc.pageSize)
			m := stream.NewReqPages(start, n)
			if r.Region != lastBlock {
				m = stream.NewReqPagesID(pc.blocks[r.Region].Name, start, n)
			}
			if err := pc.l.sendRP(m); err != nil {
				lastBlock = -1
				break // the link is gone: recovery sends the urgent ones again
			}
			lastBlock = r.Region
			if r.Urgent {
				pc.requests.Add(1)
			}
		}
	}
}

// postcopyRecord handles the records postcopy changes: pages and zero
// pages (received bitmap; after LISTEN, UFFDIO_COPY), ADVISE, DISCARD,
// PACKAGED, RUN. handled is false for the records the precopy loader
// handles as before.
func (l *loader) postcopyRecord(dec *stream.Decoder, rec stream.Record) (handled bool, err error) {
	pc := l.pc
	if pc == nil {
		if rec.Kind == stream.KindCommand && (rec.Command == stream.CmdPackaged || rec.Command == stream.CmdPostcopyListen || rec.Command == stream.CmdPostcopyRun) {
			return true, fmt.Errorf("the source switched to postcopy (%v), but postcopy-ram is off on this destination", rec.Command)
		}
		return false, nil
	}
	switch rec.Kind {
	case stream.KindPage, stream.KindZero:
		return true, pc.page(dec, rec)
	case stream.KindCommand:
		switch rec.Command {
		case stream.CmdPostcopyAdvise:
			if host, target, ok := stream.ParseAdvise(rec.Data); ok && (target != uint64(pc.pageSize) || host&^uint64(pc.pageSize) != 0) {
				return true, fmt.Errorf("POSTCOPY_ADVISE: the source's pages are %d bytes (host pages %#x), this destination's %d", target, host, pc.pageSize)
			}
			return true, nil
		case stream.CmdPostcopyDiscard:
			return true, pc.discard(rec.Data)
		case stream.CmdPackaged:
			return true, pc.packaged(dec, rec.Data)
		case stream.CmdPostcopyListen:
			return true, errors.New("POSTCOPY_LISTEN outside the package")
		case stream.CmdPostcopyRun:
			return true, pc.run()
		}
	}
	return false, nil
}

// page applies a page or zero record of the main stream.
func (pc *pcIn) page(dec *stream.Decoder, rec stream.Record) error {
	l := pc.l
	bi, ok := l.index[rec.Block]
	if !ok {
		return fmt.Errorf("page in unknown block %q", rec.Block)
	}
	p := int(rec.Offset / uint64(pc.pageSize))
	if rec.Kind == stream.KindZero {
		l.mainZeros.Add(1)
	} else {
		l.mainPages.Add(1)
	}
	l.loaded = true
	if pc.listened {
		data := pc.zeroPage
		if rec.Kind == stream.KindPage {
			if err := dec.ReadPage(pc.scratch); err != nil {
				return err
			}
			data = pc.scratch
		}
		return pc.svc.Place(bi, p, data)
	}
	// Precopy: the guest does not run; write through migctl's mapping.
	dst, err := l.page(rec)
	if err != nil {
		return err
	}
	if rec.Kind == stream.KindPage {
		if err := dec.ReadPage(dst); err != nil {
			return err
		}
		pc.svc.MarkReceived(bi, p)
		return nil
	}
	if pc.svc.Received(bi, p) {
		clear(dst) // it held data: zero it (it stays present)
		return nil
	}
	pc.svc.MarkZero(bi, p) // a hole stays a hole; LISTEN installs it
	return nil
}

// discard drops the ranges of POSTCOPY_RAM_DISCARD (valid only between
// ADVISE and LISTEN): those pages are sent again.
func (pc *pcIn) discard(data []byte) error {
	if pc.listened {
		return errors.New("POSTCOPY_RAM_DISCARD after POSTCOPY_LISTEN")
	}
	block, ranges, err := stream.ParseDiscard(data)
	if err != nil {
		return err
	}
	bi, ok := pc.l.index[block]
	if !ok {
		return fmt.Errorf("POSTCOPY_RAM_DISCARD of unknown block %q", block)
	}
	ps := uint64(pc.pageSize)
	size := uint64(len(pc.blocks[bi].Mem))
	for _, r := range ranges {
		if r.Start%ps != 0 || r.Length%ps != 0 || r.Start > size || r.Length > size-r.Start {
			return fmt.Errorf("POSTCOPY_RAM_DISCARD of %s: range %#x+%#x outside the block or not page aligned", block, r.Start, r.Length)
		}
		if err := pc.svc.Discard(bi, int(r.Start/ps), int(r.Length/ps)); err != nil {
			return err
		}
	}
	return nil
}

// packaged loads the package: LISTEN first, then devices and the
// PING(0x42) the loader answers.
func (pc *pcIn) packaged(dec *stream.Decoder, blob []byte) error {
	l := pc.l
	pd := dec.Package(blob)
	first := true
	for {
		rec, err := pd.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("the postcopy package: %w", err)
		}
		if first && rec.Kind == stream.KindCommand && rec.Command == stream.CmdPostcopyListen {
			if err := pc.listen(); err != nil {
				return err
			}
			first = false
			continue
		}
		if !pc.listened {
			return fmt.Errorf("the postcopy package starts with %v, want POSTCOPY_LISTEN", rec.Kind)
		}
		switch {
		case rec.Kind == stream.KindCommand && rec.Command == stream.CmdPing && rec.Value == stream.PingPackageLoaded:
			if err := l.sendRP(stream.NewPong(stream.PingPackageLoaded)); err != nil {
				return err
			}
			pc.ponged.Store(true)
		case rec.Kind == stream.KindCommand && (rec.Command == stream.CmdPackaged || rec.Command == stream.CmdPostcopyListen || rec.Command == stream.CmdPostcopyDiscard):
			return fmt.Errorf("%v inside the postcopy package", rec.Command)
		case rec.Kind == stream.KindPage:
			return errors.New("a RAM page inside the postcopy package")
		default:
			if err := l.apply(pd, rec, false); err != nil {
				return err
			}
		}
	}
	if !pc.ponged.Load() {
		return errors.New("the postcopy package ends without the package-loaded ping")
	}
	return errEnterPostcopy
}

// errEnterPostcopy tells the loader's loop that the package loaded: the
// rest of the migration runs in runPostcopy.
var errEnterPostcopy = errors.New("postcopy: the package loaded")

// listen is POSTCOPY_LISTEN: postcopy-device; holes for every page not
// received; known zero pages installed; the fault service starts.
func (pc *pcIn) listen() error {
	l := pc.l
	if pc.listened {
		return errors.New("a second POSTCOPY_LISTEN")
	}
	if _, err := l.in.c.Fire(l.in.ioCtx, spec.Incoming, machine.TriggerPostcopy, nil); err != nil {
		return err
	}
	l.stopPrefault() // nothing may fault a hole in after the punch
	punched, err := pc.svc.PunchHoles()
	if err != nil {
		return err
	}
	zeros, err := pc.svc.PlaceZeros()
	if err != nil {
		return err
	}
	pc.listened = true
	ctx, cancel := context.WithCancel(l.in.ioCtx)
	pc.svcCancel = cancel
	pc.svcDone = make(chan error, 1)
	go func() { pc.svcDone <- pc.svc.Run(ctx) }()
	pc.reqDone = make(chan struct{})
	go pc.requester(ctx)
	l.in.log.Info("postcopy listens", "punched", punched, "zero_pages", zeros)
	return nil
}

// stopService stops the fault service and the requester and closes
// migctl's copy of the userfaultfd (the guest keeps its own).
func (pc *pcIn) stopService() error {
	if pc.svcCancel == nil {
		if pc.ufd != nil {
			pc.ufd.Close()
		}
		return nil
	}
	pc.svcCancel()
	err := <-pc.svcDone
	<-pc.reqDone
	pc.svcCancel = nil
	pc.ufd.Close()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// run is POSTCOPY_RUN: the guest starts here (once; after a recovery the
// source sends it again, in case the first was lost with the link).
func (pc *pcIn) run() error {
	l := pc.l
	if !pc.listened {
		return errors.New("POSTCOPY_RUN before POSTCOPY_LISTEN")
	}
	if pc.started {
		return nil
	}
	if _, err := l.in.c.Fire(context.Background(), spec.Incoming, machine.TriggerRun, nil); err != nil {
		var np *machine.NotPermittedError
		if !errors.As(err, &np) { // after a recovery the side is postcopy-active already
			return err
		}
	}
	pc.started = true
	arrived, err := l.in.c.Fire(context.Background(), spec.Guest, machine.TriggerArrive, nil)
	if err != nil {
		l.in.log.Error("the guest graph refused arrive", "err", err)
	}
	if arrived.To == machine.GuestRunning {
		if err := l.in.g.Start(); err != nil {
			return fmt.Errorf("start the guest: %w", err)
		}
	}
	return nil
}

// runPostcopy runs the postcopy phase after the package loaded, on the
// main channel dec reads and the preempt channel accepted with it, until
// every page arrived (nil) or the process shuts down (Abort). Link
// failures pause and wait for a recovery.
func (l *loader) runPostcopy(dec *stream.Decoder) error {
	pc := l.pc
	l.stopWatch() // the precopy watchdog ends the migration; in postcopy a stall pauses
	link := pc.newLink(l.conn, pc.early)
	pc.early = nil
	pc.linkReady.Store(true)
	pc.wakeRequester()
	return l.postcopyLoop(dec, link)
}

// postcopyLoop serves link until every page arrived (nil) or the process
// shuts down; a link that fails pauses the side and waits for a recovery.
// A nil link (a reattached migctl: loaders/reattach.go) starts paused.
func (l *loader) postcopyLoop(dec *stream.Decoder, link *pcLink) error {
	pc := l.pc
	if link == nil {
		var err error
		if link, err = pc.recover(dec); err != nil {
			return err
		}
	}
	for {
		err := pc.serve(dec, link)
		if err == nil {
			return pc.complete()
		}
		pc.linkReady.Store(false)
		pc.setLink(nil)
		link.close(err)
		if cause := context.Cause(l.in.ioCtx); cause != nil {
			return cause
		}
		if !pc.ponged.Load() {
			return err // the source cannot have committed: fail and tell it
		}
		l.in.log.Warn("postcopy paused", "err", err)
		if _, ferr := l.in.c.Fire(context.Background(), spec.Incoming, machine.TriggerPause, &machine.Args{Reason: "postcopy paused: " + err.Error()}); ferr != nil {
			return errors.Join(err, ferr)
		}
		l.publish(true, nil)
		if link, err = pc.recover(dec); err != nil {
			return err
		}
	}
}

func (pc *pcIn) wakeRequester() {
	select {
	case pc.reqWake <- struct{}{}:
	default:
	}
}

func (pc *pcIn) setLink(k *pcLink) {
	pc.mu.Lock()
	pc.link = k
	pc.mu.Unlock()
}

// newLink starts serving a link: its watchdog, keepalives on the return
// path and, when there is one, the preempt reader.
func (pc *pcIn) newLink(main, pre transport.Conn) *pcLink {
	l := pc.l
	k := &pcLink{main: main, dog: watchdog.New(), preSeen: make(chan struct{})}
	k.ctx, k.cancel = context.WithCancelCause(l.in.ioCtx)
	pc.linkGen.Add(1)
	pc.setLink(k)
	stop := context.AfterFunc(k.ctx, func() { k.kill(context.Cause(k.ctx)) })
	k.wg.Add(2)
	go func() {
		defer k.wg.Done()
		k.dog.Run(k.ctx, watchdog.Watch{
			Limits: func() watchdog.Limits {
				return watchdog.Limits{Keepalive: l.liveDuration(paramKeepalive, time.Second), Timeout: l.liveDuration(paramIOTimeout, 30*time.Second)}
			},
			Stalled: func(since time.Time) { _ = l.in.c.PublishStalled(spec.Incoming, since) },
			Timeout: func(silent time.Duration) {
				k.kill(&StallError{Silent: silent, Timeout: l.liveDuration(paramIOTimeout, 30*time.Second)})
			},
		})
		stop()
		_ = l.in.c.PublishStalled(spec.Incoming, time.Time{})
	}()
	go func() {
		defer k.wg.Done()
		for {
			t := time.NewTimer(l.liveDuration(paramKeepalive, time.Second))
			select {
			case <-t.C:
			case <-k.ctx.Done():
				t.Stop()
				return
			}
			if err := l.sendRP(stream.RPMessage{Type: stream.RPKeepalive}); err != nil {
				k.kill(fmt.Errorf("return path: %w", err))
				return
			}
		}
	}()
	if pre != nil {
		pc.attachPreempt(k, pre)
	}
	return k
}

// attachPreempt starts reading the link's preempt channel.
func (pc *pcIn) attachPreempt(k *pcLink, pre transport.Conn) {
	k.mu.Lock()
	if k.pre != nil {
		k.mu.Unlock()
		pre.Close()
		return
	}
	k.pre = pre
	k.preDone = make(chan error, 1)
	k.mu.Unlock()
	close(k.preSeen)
	if k.ctx.Err() != nil {
		_ = pre.SetDeadline(time.Unix(1, 0))
	}
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		k.preDone <- pc.readPreempt(k, pre)
	}()
}

// readPreempt installs the pages of the preempt channel until its EOS.
func (pc *pcIn) readPreempt(k *pcLink, c transport.Conn) error {
	lim := map[string]uint64{}
	for _, b := range pc.blocks {
		lim[b.Name] = uint64(len(b.Mem))
	}
	r := stream.NewPageReader(c, uint64(pc.pageSize), lim)
	buf := make([]byte, pc.pageSize)
	for {
		rec, err := r.Next()
		if err != nil {
			err = fmt.Errorf("preempt channel: %w", err)
			k.kill(err)
			return err
		}
		k.dog.Feed()
		data := pc.zeroPage
		switch rec.Kind {
		case stream.KindEOS:
			return nil
		case stream.KindPage:
			if err := r.ReadPage(buf); err != nil {
				k.kill(err)
				return err
			}
			data = buf
		}
		bi := pc.l.index[rec.Block]
		if err := pc.svc.Place(bi, int(rec.Offset/uint64(pc.pageSize)), data); err != nil {
			k.kill(err)
			return err
		}
	}
}

// serve reads the main channel of a link until the stream ends with every
// page received (nil) or the link fails.
func (pc *pcIn) serve(dec *stream.Decoder, k *pcLink) error {
	l := pc.l
	for i := 0; ; i++ {
		rec, err := dec.Next()
		if err != nil {
			if cause := context.Cause(k.ctx); cause != nil {
				return cause
			}
			if errors.Is(err, io.EOF) {
				return errors.New("the source closed the channel before the end of the stream")
			}
			return err
		}
		k.dog.Feed()
		if rec.Kind == stream.KindEOF {
			return pc.awaitEnd(k)
		}
		if err := l.apply(dec, rec, false); err != nil {
			return err
		}
		if i%256 == 0 {
			l.publish(false, dec)
		}
	}
}

// awaitEnd waits, after the main stream's EOF, for the preempt channel's
// EOS (when the source uses it), and checks every page arrived: a page
// missing then is a page lost with a broken link, which a recovery sends
// again.
func (pc *pcIn) awaitEnd(k *pcLink) error {
	if !pc.svc.Complete() || pc.preempt {
		t := time.NewTimer(channelTimeout)
		defer t.Stop()
		select {
		case <-k.preSeen:
		case <-t.C:
			return fmt.Errorf("the main stream ended with %d pages missing and no preempt channel", pc.missing())
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
		k.mu.Lock()
		done := k.preDone
		k.mu.Unlock()
		select {
		case err := <-done:
			if err != nil {
				return err
			}
		case <-t.C:
			return errors.New("the preempt channel did not end after the main stream did")
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
	}
	if !pc.svc.Complete() {
		return fmt.Errorf("the stream ended with %d pages missing", pc.missing())
	}
	return nil
}

func (pc *pcIn) missing() int {
	n := 0
	for i, b := range pc.blocks {
		n += b.Pages() - pc.svc.ReceivedCount(i)
	}
	return n
}

// complete ends the migration: every page is here, the fault service
// stops, the side completes and the source learns it (SHUT(0)).
func (pc *pcIn) complete() error {
	l := pc.l
	pc.linkReady.Store(false)
	if err := pc.stopService(); err != nil {
		return err
	}
	pc.mu.Lock()
	k := pc.link
	pc.link = nil
	pc.mu.Unlock()
	l.publish(true, nil) // the last statistics, before the side turns terminal
	out, err := l.in.c.Fire(context.Background(), spec.Incoming, machine.TriggerComplete, nil)
	if err != nil {
		return err
	}
	l.final = out.To
	if err := l.sendRP(stream.NewShut(0)); err != nil {
		l.in.log.Warn("confirm to the source", "err", err)
	}
	if k != nil {
		k.close(nil)
	}
	return nil
}

// recover waits, paused, for migrate-recover and the source's new channel,
// runs the recovery handshake and returns the new link. A failure on the
// way pauses again; only the process shutting down ends the wait (with its
// cause).
func (pc *pcIn) recover(dec *stream.Decoder) (*pcLink, error) {
	l := pc.l
	for {
		var ln transport.Listener
		select {
		case ln = <-pc.lnCh:
		case <-l.in.ioCtx.Done():
			return nil, context.Cause(l.in.ioCtx)
		}
		k, err := pc.reconnect(dec, ln)
		if err == nil {
			return k, nil
		}
		if cause := context.Cause(l.in.ioCtx); cause != nil {
			return nil, cause
		}
		l.in.log.Warn("postcopy recovery failed; paused again", "err", err)
		if _, ferr := l.in.c.Fire(context.Background(), spec.Incoming, machine.TriggerPause, &machine.Args{Reason: "postcopy recovery failed: " + err.Error()}); ferr != nil {
			return nil, errors.Join(err, ferr)
		}
	}
}

// reconnect accepts the source's new main channel on ln (within
// x-migctl-io-timeout), moves the side to postcopy-recover, answers the
// RECV_BITMAP commands and POSTCOPY_RESUME, and returns the link serving
// the new channel. A preempt channel may connect on ln while the link
// lives.
func (pc *pcIn) reconnect(dec *stream.Decoder, ln transport.Listener) (*pcLink, error) {
	l := pc.l
	defer func() {
		pc.mu.Lock()
		pc.recoverLn = nil
		pc.mu.Unlock()
	}()
	ctx, cancel := context.WithCancel(l.in.ioCtx)
	defer cancel()
	if d := l.liveDuration(paramIOTimeout, 30*time.Second); d > 0 {
		var c2 context.CancelFunc
		ctx, c2 = context.WithTimeoutCause(ctx, d, fmt.Errorf("no source connected to %s within x-migctl-io-timeout (%v)", ln.Addr(), d))
		defer c2()
	}
	stopLn := context.AfterFunc(ctx, func() { ln.Close() })
	main, pre, err := acceptRecovery(ctx, ln)
	stopLn()
	if err != nil {
		ln.Close()
		if cause := context.Cause(ctx); cause != nil {
			err = cause
		}
		return nil, err
	}
	if _, err := l.in.c.Fire(l.in.ioCtx, spec.Incoming, machine.TriggerConnect, nil); err != nil {
		ln.Close()
		main.Close()
		if pre != nil {
			pre.Close()
		}
		return nil, err
	}
	l.setConn(main)
	k := pc.newLink(main, pre)
	// The listener stays open while the link lives: a preempt channel the
	// source opens after the main one attaches to it.
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		defer ln.Close()
		stop := context.AfterFunc(k.ctx, func() { ln.Close() })
		defer stop()
		for {
			c, err := ln.Accept(k.ctx)
			if err != nil {
				return
			}
			r, cc, err := pc.l.classify(c)
			if err != nil || r != rolePreempt {
				c.Close()
				continue
			}
			pc.attachPreempt(k, cc)
		}
	}()
	if err := pc.handshake(dec, k); err != nil {
		pc.setLink(nil)
		k.close(err)
		return nil, err
	}
	return k, nil
}

// acceptRecovery accepts on ln until the main channel arrives (a preempt
// channel may come first). Channels are told apart by their first bytes:
// the preempt channel's magic, or anything else (the resumed main stream
// starts with a command).
func acceptRecovery(ctx context.Context, ln transport.Listener) (main, pre transport.Conn, err error) {
	for {
		c, err := ln.Accept(ctx)
		if err != nil {
			if pre != nil {
				pre.Close()
			}
			return nil, nil, fmt.Errorf("waiting for the source's new channel on %s: %w", ln.Addr(), err)
		}
		stop := context.AfterFunc(ctx, func() { c.Close() })
		r, cc, err := classifyRecovery(c)
		stop()
		if err != nil {
			c.Close()
			continue // not the source: keep waiting
		}
		if r == rolePreempt {
			if pre != nil {
				pre.Close()
			}
			pre = cc
			continue
		}
		return cc, pre, nil
	}
}

// handshake answers the source's RECV_BITMAP commands with the received
// bitmaps and POSTCOPY_RESUME with RESUME_ACK (postcopy-recover →
// postcopy-active), then sends every pending request again.
func (pc *pcIn) handshake(dec *stream.Decoder, k *pcLink) error {
	l := pc.l
	dec.Resume(k.main)
	for {
		rec, err := dec.Next()
		if err != nil {
			if cause := context.Cause(k.ctx); cause != nil {
				return cause
			}
			return fmt.Errorf("the recovery handshake: %w", err)
		}
		k.dog.Feed()
		if rec.Kind != stream.KindCommand {
			return fmt.Errorf("the recovery handshake: a %v record, want RECV_BITMAP or POSTCOPY_RESUME", rec.Kind)
		}
		switch rec.Command {
		case stream.CmdRecvBitmap:
			block, err := stream.ParseRecvBitmapCommand(rec.Data)
			if err != nil {
				return err
			}
			bi, ok := l.index[block]
			if !ok {
				return fmt.Errorf("RECV_BITMAP of unknown block %q", block)
			}
			l.rpMu.Lock()
			err = stream.WriteRecvBitmap(l.conn, block, pc.svc.ReceivedWords(bi))
			l.rpMu.Unlock()
			if err != nil {
				return err
			}
		case stream.CmdPing:
			if err := l.sendRP(stream.NewPong(uint32(rec.Value))); err != nil {
				return err
			}
		case stream.CmdPostcopyResume:
			if _, err := l.in.c.Fire(l.in.ioCtx, spec.Incoming, machine.TriggerResume, nil); err != nil {
				return err
			}
			if err := l.sendRP(stream.NewResumeAck()); err != nil {
				return err
			}
			pc.reqMu.Lock()
			pc.reqs = append(pc.svc.Pending(), pc.reqs...)
			pc.reqMu.Unlock()
			pc.linkReady.Store(true)
			pc.wakeRequester()
			return nil
		default:
			return fmt.Errorf("the recovery handshake: %v, want RECV_BITMAP or POSTCOPY_RESUME", rec.Command)
		}
	}
}

// setConn makes c the channel the return path writes to and an interrupt
// reaches.
func (l *loader) setConn(c transport.Conn) {
	l.ioMu.Lock()
	l.rpMu.Lock()
	l.conn = c
	l.rpMu.Unlock()
	l.ioMu.Unlock()
}

// Recover is QMP migrate-recover on a destination whose postcopy is
// paused: the rules judge uri (recover), the destination listens there for
// the source's new channel (postcopy-recover-listening) and the loader
// takes it from there. A listener that cannot be opened pauses again.
func (in *Incoming) Recover(ctx context.Context, uri string) error {
	a, err := transport.Parse(uri)
	if err != nil {
		return err
	}
	ep := &guards.Endpoint{Transport: a.Scheme, URI: a.String(), Props: probeProps(in.opts.Probe, a)}
	if _, err := in.c.Fire(ctx, spec.Incoming, machine.TriggerRecover, &machine.Args{Endpoint: ep}); err != nil {
		return err
	}
	ln, err := in.opts.Listen(ctx, a)
	if err != nil {
		_, _ = in.c.Fire(context.Background(), spec.Incoming, machine.TriggerPause, &machine.Args{Reason: "migrate-recover: " + err.Error()})
		return err
	}
	_ = in.c.SetEndpoint(spec.Incoming, ln.Addr().String())
	pc := in.pcOf()
	if pc == nil {
		ln.Close()
		return errors.New("no postcopy migration to recover in this process")
	}
	pc.mu.Lock()
	pc.recoverLn = ln
	pc.mu.Unlock()
	select {
	case pc.lnCh <- ln:
		return nil
	case <-in.done:
		ln.Close()
		return errors.New("the incoming migration ended")
	case <-ctx.Done():
		ln.Close()
		return ctx.Err()
	}
}

// Pause is QMP migrate-pause on the destination: the link of a postcopy
// migration (or the listener of a recovery) is shut down, and the side
// goes to postcopy-paused.
func (in *Incoming) Pause(ctx context.Context) error {
	// QEMU pauses a destination whose postcopy is alive (postcopy-active
	// or postcopy-recover): here, one with a link.
	if st, err := in.c.Status(spec.Incoming, 0); err != nil || st.State != machine.StatePostcopyActive && st.State != machine.StatePostcopyRecover {
		return ErrNotPausable
	}
	var k *pcLink
	if pc := in.pcOf(); pc != nil {
		pc.mu.Lock()
		k = pc.link
		pc.mu.Unlock()
	}
	if k == nil {
		return ErrNotPausable
	}
	k.kill(ErrPausedByUser)
	return nil
}

// ErrNotPausable is migrate-pause's refusal outside postcopy-active and
// postcopy-recover, in QEMU's words.
var ErrNotPausable = errors.New("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")

// pcOf returns the postcopy state of the run, or nil.
func (in *Incoming) pcOf() *pcIn {
	in.pcMu.Lock()
	defer in.pcMu.Unlock()
	return in.pc
}

// fillHoles makes every page of a Postcopier guest present before it runs
// after a precopy migration (postcopy never started): a zero page the
// stream never wrote is still a hole registered for MISSING faults, and a
// vCPU touching it would wait for a fault service that does not run.
func (l *loader) fillHoles() error {
	g, ok := l.in.g.(guest.Postcopier)
	if !ok || l.pc != nil && l.pc.listened {
		return nil
	}
	if l.pc != nil {
		n, err := l.pc.svc.FillHoles()
		l.in.log.Info("zero pages installed", "pages", n)
		return errors.Join(err, l.pc.stopService())
	}
	svc, fd, err := postcopy.FromGuest(g, postcopy.Options{Request: func(postcopy.Request) {}})
	if err != nil {
		return err
	}
	defer fd.Close()
	n, err := svc.FillHoles()
	l.in.log.Info("zero pages installed", "pages", n)
	return err
}

// pcStats adds postcopy's statistics to st (called by publish, under
// statsMu): the requests the fault service sent and QEMU's blocktime.
func (l *loader) pcStats(st *machine.Stats) {
	pc := l.pc
	if pc == nil {
		return
	}
	st.PostcopyRequests = pc.requests.Load()
	if !pc.blocktime { // QEMU reports blocktime only with the capability on
		return
	}
	ss := pc.svc.Stats()
	st.PostcopyBlocktime = ss.BlockTime
	st.PostcopyLatency = ss.Latency()
	st.PostcopyVCPUBlocktime = nil
	for _, v := range ss.VCPU {
		st.PostcopyVCPUBlocktime = append(st.PostcopyVCPUBlocktime, v.BlockTime)
	}
}
