// Package loaders runs the incoming side of a migration: it listens,
// accepts the source's channel, checks the source's handshake through the
// controller's connect guard, then loads the stream into the guest from its
// own goroutine, outside the controller lock, so the control plane answers
// while gigabytes load.
//
// RAM pages are read from the channel straight into guest memory (one
// copy, no lock). A device whose Load touches state shared with the control
// plane (Device.NeedsLock) is loaded under the controller lock, and only
// that call. While pages arrive, a second goroutine pre-faults the rest of
// guest RAM (MADV_POPULATE_WRITE), since on this kind of machine the first
// write to a fresh page costs ~16 µs and would otherwise cap the receiver
// near 0.25 GB/s.
package loaders

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// Options tune an incoming migration. The zero value is usable.
type Options struct {
	// Logger receives progress lines (default: discard).
	Logger *slog.Logger
	// StatsInterval is how often statistics are published (default 100 ms).
	StatsInterval time.Duration
	// Channels lists the channel types migrate-incoming was given (QMP's
	// channels argument); the rules judge them with the URI.
	Channels []string
	// NoPrefault disables pre-faulting guest RAM. By default the loader
	// pre-faults it (MADV_POPULATE_WRITE) from the moment it listens, in
	// parallel with waiting for the source and with receiving.
	NoPrefault bool
	// Populate pre-faults one block (default guest.Populate).
	Populate func(ctx context.Context, b *guest.Block) error
	// PageSums makes the loader keep a CRC-32C of every page as it lands
	// (guest.PageSum), so a digest is available at the end without reading
	// RAM again (see Result.PageSums).
	PageSums bool
	// BeforeStart runs after the last byte loaded, with the guest still
	// stopped; an error fails the migration.
	BeforeStart func(pageSums [][]uint32) error
	// SwitchoverReady, with capability switchover-ack, is closed when the
	// destination's devices are ready for the source to switch over (in
	// QEMU, a device such as VFIO that needs time holds the ack back);
	// only then does the destination send SWITCHOVER_ACK. Nil means ready
	// at once.
	SwitchoverReady <-chan struct{}
	// Listen opens the listener. By default it is Transport's Listen with
	// the guest's RAM added (transport.Config.RAM), which rdma: registers
	// for the source's one-sided writes.
	Listen func(ctx context.Context, a transport.Addr) (transport.Listener, error)
	// NoCommitProtocol makes the destination behave as one without the
	// switchover commit protocol (it never answers HELLO, and starts the
	// guest as soon as the stream ended): for tests of the fallback with a
	// source that lacks it, and for interop.
	NoCommitProtocol bool
	// Probe resolves the properties of the address's endpoint for the
	// rules (default transport.Probe; serve passes its transport.Config's):
	// an fd: on a regular file is seekable, so mapped-ram may use it.
	Probe func(a transport.Addr) (transport.Props, bool, error)
	// Transport is the configuration the default Listen starts from (nil:
	// the zero Config): migctl serve's resolves fd: addresses from QMP's
	// getfd table and names the RDMA provider.
	Transport *transport.Config
	// Creds holds the objects QMP's object-add made: with the parameter
	// tls-creds set, every accepted channel must open a TLS session with
	// the tls-creds-x509 object it names, tls-authz checking the source's
	// certificate (loaders/tls.go). Nil: a migration with tls-creds set
	// fails.
	Creds *creds.Objects
	// LockedBatch, for measurement only, makes the loader hold the
	// controller lock while it reads and applies batches of this many
	// records — what QEMU's destination did before its loader thread — so
	// a benchmark can show what the lock-free loader buys. 0 (the default)
	// never holds the lock except around a NeedsLock device.
	LockedBatch int
	// PostcopyBatch is how many pages (an aligned block around the
	// faulting page) a postcopy fault asks the source for; 0 means 16
	// (64 KiB). 1 makes every first touch of a missing page a fault of its
	// own, which is what a fault-latency benchmark measures.
	PostcopyBatch int
}

// Result is how an incoming migration ended.
type Result struct {
	// State is the incoming side's final state (the spec's completed, or
	// the terminal state a failure or cancel led to).
	State machine.State
	Stats machine.Stats
	// Err is the failure, nil when the migration completed. It wraps
	// ErrCancelled when the migration was cancelled.
	Err error
	// PageSums holds the per-page CRC-32C when Options.PageSums was set.
	PageSums [][]uint32
	// Wire counts what arrived, by the way it travelled.
	Wire Wire
}

// Wire counts the pages an incoming migration received, by how they
// travelled: as records of the main stream or in multifd packets.
type Wire struct {
	MainPages, MainZeros       uint64 // PAGE and ZERO records on the main stream
	MultifdPages, MultifdZeros uint64 // normal pages and zero entries of multifd packets
	MappedPages, MappedBytes   uint64 // pages read from a mapped-ram file's offsets
}

// Incoming is one incoming migration.
type Incoming struct {
	c    *machine.Controller
	g    guest.Guest
	opts Options
	log  *slog.Logger
	ln   transport.Listener

	ioCtx    context.Context
	cancelIO context.CancelCauseFunc
	pfCancel context.CancelFunc // stops pre-faulting; nil with NoPrefault
	pfDone   chan struct{}      // closed when pre-faulting ends
	done     chan struct{}
	result   Result
	// resolveMu serialises Resolve calls.
	resolveMu sync.Mutex
	// pcMu guards pc: the run's postcopy state once armed (postcopy.go),
	// for Recover and Pause.
	pcMu sync.Mutex
	pc   *pcIn
}

// ErrCancelled is wrapped by the error of an incoming migration that was
// cancelled (Incoming.Cancel).
var ErrCancelled = errors.New("incoming migration cancelled")

// Listen fires incoming on the controller's incoming side (the guards judge
// the URI's transport against the configuration), opens the listener,
// records the bound address (a tcp port 0 becomes the real port), fires
// listen, and starts the loader goroutine, which waits for the source.
// When the listener cannot be opened the side returns to where it was
// (listen-failed) and a later Listen may try again, as QEMU allows.
func Listen(ctx context.Context, c *machine.Controller, g guest.Guest, uri string, opts Options) (*Incoming, error) {
	a, err := transport.Parse(uri)
	if err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.StatsInterval <= 0 {
		opts.StatsInterval = 100 * time.Millisecond
	}
	if opts.Populate == nil {
		opts.Populate = guest.Populate
	}
	ep := &guards.Endpoint{Transport: a.Scheme, URI: a.String(), Channels: opts.Channels, Props: probeProps(opts.Probe, a)}
	if _, err := c.Fire(ctx, spec.Incoming, machine.TriggerIncoming, &machine.Args{Endpoint: ep}); err != nil {
		return nil, err
	}
	if opts.Listen == nil {
		opts.Listen = listenWithRAM(opts.Transport, g)
	}
	ln, err := opts.Listen(ctx, a)
	if err != nil {
		_, _ = c.Fire(context.Background(), spec.Incoming, machine.TriggerListenFailed, &machine.Args{Reason: err.Error()})
		return nil, err
	}
	_ = c.SetEndpoint(spec.Incoming, ln.Addr().String())
	publishListener(c, ln)
	if _, err := c.Fire(ctx, spec.Incoming, machine.TriggerListen, nil); err != nil {
		// Cancelled while the transport was opened (or ctx ended).
		ln.Close()
		if _, ferr := c.Fire(context.Background(), spec.Incoming, machine.TriggerFail, &machine.Args{Reason: err.Error()}); ferr != nil {
			return nil, errors.Join(err, ferr)
		}
		_, _ = c.Fire(context.Background(), spec.Incoming, machine.TriggerCleanup, nil)
		return nil, err
	}
	in := &Incoming{c: c, g: g, opts: opts, log: opts.Logger, ln: ln, done: make(chan struct{})}
	in.ioCtx, in.cancelIO = context.WithCancelCause(context.WithoutCancel(ctx))
	in.startPrefault()
	go in.run()
	return in, nil
}

// Addr returns the address the listener is bound to.
func (in *Incoming) Addr() transport.Addr { return in.ln.Addr() }

// errNoChannel: a reattached run before its recovery has no channel to
// write to.
var errNoChannel = errors.New("no channel to the source yet (a reattached destination waits for migrate-recover)")

// Done is closed when the incoming migration has ended.
func (in *Incoming) Done() <-chan struct{} { return in.done }

// Wait waits for the end of the migration or ctx.
func (in *Incoming) Wait(ctx context.Context) (Result, error) {
	select {
	case <-in.done:
		return in.result, nil
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// Cancel fires cancel on the incoming side (migrate_cancel). In a state
// that accepts it (before the guest runs here) the side goes to cancelling,
// the listener and channel close at once, what was loaded is discarded, and
// the migration ends cancelled; the guest never runs. In a state that
// ignores it (already ended) it does nothing; in one that refuses it
// (postcopy) it returns the refusal.
func (in *Incoming) Cancel(ctx context.Context, reason string) error {
	out, err := in.c.Fire(ctx, spec.Incoming, machine.TriggerCancel, &machine.Args{Reason: reason})
	if err != nil {
		return err
	}
	if out.Moved {
		in.cancelIO(fmt.Errorf("%w: %s", ErrCancelled, reason))
	}
	return nil
}

// Abort tears the incoming migration down without asking the state
// machine (the process is shutting down): the loader fails with reason
// unless the migration already ended.
func (in *Incoming) Abort(reason string) {
	in.cancelIO(errors.New(reason))
}

func (in *Incoming) run() {
	defer close(in.done)
	host.LowerThreadPriority()
	l := &loader{in: in, start: time.Now(), dog: watchdog.New()}
	if p, ok := in.ln.(provider); ok {
		// Every statistics this run publishes keeps naming the RDMA
		// provider publishListener named (a failure at connect publishes
		// before failRAM notes it).
		l.stats.RDMAProvider = p.Provider()
	}
	err := l.load()
	l.finish(err)
}

// loader holds one run's state; it belongs to the loader goroutine.
type loader struct {
	in       *Incoming
	start    time.Time
	conn     transport.Conn
	rp       bool // the source opened the return path
	rpMu     sync.Mutex
	stats    machine.Stats
	blocks   map[string]*guest.Block
	index    map[string]int
	pageSums [][]uint32
	lastPub  time.Time
	loaded   bool // a page or device was written into the guest
	zero     []byte
	zeroSum  uint32                  // guest.PageSum of a zero page, with Options.PageSums
	devs     map[string]guest.Device // by name + "\x00" + instance
	// ackSwitchover: capability switchover-ack is on (read once, from the
	// frozen configuration, so no record handler ever takes the lock).
	ackSwitchover bool
	// final is the state the last Fire led to.
	final machine.State
	recv  received   // pages that arrived, for zero pages
	mf    *multifdIn // multifd channels, when on
	// What the main stream carried (the multifd readers count theirs in
	// mf); atomic: a statistics goroutine reads them while the loader runs.
	mainPages, mainZeros atomic.Uint64
	dec                  atomic.Pointer[stream.Decoder]
	// statsMu serialises publish, which the loader goroutine and, with
	// multifd, a ticker goroutine call; it guards stats, wire and lastPub.
	statsMu sync.Mutex
	wire    Wire
	wg      sync.WaitGroup // goroutines of this run (the delayed switchover ack, keepalives)

	// The commit protocol and liveness (commit.go).
	hs        *stream.Handshake // the source's announcement
	srcStop   host.Stamp        // when the source stopped its guest (its STOPPED frame)
	proto     bool              // the source speaks the commit protocol and opened the return path
	pc        *pcIn             // postcopy, when postcopy-ram is on (postcopy.go)
	waitingGo bool              // loaded fired: only go, abort or the operator end the wait
	dog       *watchdog.Dog
	stopDog   context.CancelFunc
	dogDone   chan struct{}
	// ioMu orders the interrupt of a cancel or stall (a past deadline on
	// the channel) with telling the source why (a fresh deadline):
	// farewell set, the interrupt no longer touches the channel.
	ioMu     sync.Mutex
	farewell bool
	tls      acceptTLS // TLS or plaintext, decided at the first connection (tls.go)
}

func (l *loader) load() error {
	in := l.in
	stopLn := context.AfterFunc(in.ioCtx, func() { in.ln.Close() })
	defer stopLn()
	conn, early, err := l.acceptMain()
	if err != nil {
		in.ln.Close()
		return err
	}
	l.conn = conn
	if r, ok := receiverOf(conn); ok {
		// Named from the start: every statistics the loader publishes,
		// a refusal at connect's included, keeps x-migctl-rdma-provider.
		l.noteProvider(r.Provider())
	}
	stopInterrupt := context.AfterFunc(in.ioCtx, l.interrupt)
	defer stopInterrupt()
	l.startWatch()

	blocks := in.g.Blocks()
	l.recv = newReceived(blocks)
	l.blocks = map[string]*guest.Block{}
	l.index = map[string]int{}
	lim := stream.Limits{Blocks: map[string]uint64{}, RequireHandshake: true}
	for i, b := range blocks {
		l.blocks[b.Name] = b
		l.index[b.Name] = i
		lim.Blocks[b.Name] = uint64(len(b.Mem))
		l.stats.Total += uint64(len(b.Mem))
	}
	if len(blocks) > 0 {
		lim.PageSize = uint64(blocks[0].PageSize)
		l.stats.PageSize = lim.PageSize
	}
	postcopyLimits(in.g, &lim)
	if in.opts.PageSums {
		l.zeroSum = guest.PageSum(make([]byte, lim.PageSize))
		l.pageSums = make([][]uint32, len(blocks))
		for i, b := range blocks {
			l.pageSums[i] = make([]uint32, b.Pages())
			for p := range l.pageSums[i] {
				l.pageSums[i][p] = l.zeroSum
			}
		}
	}
	dec := stream.NewDecoder(conn, lim)

	// Header, configuration and handshake: what only connect can know.
	var hs *stream.Handshake
	for hs == nil {
		rec, err := dec.Next()
		if err != nil {
			return fmt.Errorf("read the stream header: %w", err)
		}
		if rec.Kind == stream.KindHandshake {
			hs = rec.Handshake
		}
	}
	l.hs = hs
	peer := &guards.Peer{Caps: hs.Capabilities, Params: hs.Parameters, Facts: map[string]string{
		"page-size": strconv.FormatUint(hs.PageSize, 10),
		"guest":     hs.GuestID,
	}}
	if hs.UUID != "" { // compared with this side's uuid fact (validate-uuid)
		peer.Facts["uuid"] = hs.UUID
		if _, ok := guest.UUIDOf(in.g); !ok {
			in.log.Warn("UUID is received " + hs.UUID + ", but local uuid isn't set")
		}
	}
	if _, err := in.c.Fire(in.ioCtx, spec.Incoming, machine.TriggerConnect, &machine.Args{Peer: peer}); err != nil {
		closeAll(early)
		return err
	}
	cfg, ok := in.c.Frozen(spec.Incoming)
	if !ok {
		cfg = in.c.Config()
	}
	l.ackSwitchover = cfg.Caps["switchover-ack"]
	if handled, err := l.mappedRAM(cfg, early); handled { // loaders/mapped.go
		return err
	}
	if early, err = l.armPostcopy(cfg, early); err != nil { // postcopy.go
		closeAll(early)
		return err
	}
	// Every channel is there before loading starts, as QEMU's destination
	// waits for main + all multifd channels.
	if cfg.Caps["multifd"] {
		if err := l.startMultifd(cfg, early); err != nil {
			return err
		}
	} else if len(early) > 0 {
		closeAll(early)
		return errors.New("a multifd channel connected, but multifd is off on this destination")
	}
	in.ln.Close()
	if _, err := in.c.Fire(in.ioCtx, spec.Incoming, machine.TriggerLoad, nil); err != nil {
		return err
	}
	if err := l.openRAM(); err != nil {
		return err
	}
	return l.loop(dec)
}

// loop reads records until EOF and applies them.
func (l *loader) loop(dec *stream.Decoder) error {
	l.devs = map[string]guest.Device{}
	for _, d := range l.in.g.Devices() {
		l.devs[d.Name()+"\x00"+strconv.FormatUint(uint64(d.Instance()), 10)] = d
	}
	for {
		var (
			done bool
			err  error
		)
		if n := l.in.opts.LockedBatch; n > 0 {
			// Measurement only: QEMU's behaviour before its loader thread,
			// the lock held while reading the socket.
			l.in.c.Locked(func() { done, err = l.batch(dec, n, true) })
		} else {
			done, err = l.batch(dec, 4096, false)
		}
		if errors.Is(err, errEnterPostcopy) {
			return l.runPostcopy(dec) // postcopy.go
		}
		if err != nil {
			return err
		}
		if done {
			return l.complete(dec)
		}
		if err := context.Cause(l.in.ioCtx); err != nil {
			return err
		}
		l.publish(false, dec)
	}
}

// batch applies up to n records; done reports the EOF marker (the caller
// then completes, outside any lock).
func (l *loader) batch(dec *stream.Decoder, n int, locked bool) (done bool, err error) {
	for range n {
		rec, err := dec.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return false, errors.New("the stream ended before its EOF marker")
			}
			return false, err
		}
		l.dog.Feed()
		if rec.Kind == stream.KindEOF {
			return true, nil
		}
		if err := l.apply(dec, rec, locked); err != nil {
			return false, err
		}
	}
	return false, nil
}

// apply applies one record.
func (l *loader) apply(dec *stream.Decoder, rec stream.Record, locked bool) error {
	if handled, err := l.postcopyRecord(dec, rec); handled { // postcopy.go
		return err
	}
	switch rec.Kind {
	case stream.KindPage:
		dst, err := l.page(rec)
		if err != nil {
			return err
		}
		if err := dec.ReadPage(dst); err != nil {
			return err
		}
		l.recv.mark(l.index[rec.Block], int(rec.Offset/l.stats.PageSize))
		l.loaded = true
		l.mainPages.Add(1)
		if l.pageSums != nil {
			l.pageSums[l.index[rec.Block]][rec.Offset/l.stats.PageSize] = guest.PageSum(dst)
		}
	case stream.KindZero:
		dst, err := l.page(rec)
		if err != nil {
			return err
		}
		// Clear only a page that arrived before: fresh memory is zero
		// already, and touching it would only fault it in.
		if l.recv.mark(l.index[rec.Block], int(rec.Offset/l.stats.PageSize)) {
			clear(dst)
			l.loaded = true
		}
		l.mainZeros.Add(1)
		if l.pageSums != nil {
			l.pageSums[l.index[rec.Block]][rec.Offset/l.stats.PageSize] = l.zeroSum
		}
	case stream.KindDevice:
		key := rec.Section.IDStr + "\x00" + strconv.FormatUint(uint64(rec.Section.Instance), 10)
		d, ok := l.devs[key]
		if !ok {
			return fmt.Errorf("the stream carries device %s (instance %d), which this guest does not have", rec.Section.IDStr, rec.Section.Instance)
		}
		if rec.Section.Version != d.Version() {
			return fmt.Errorf("device %s: stream version %d, this guest speaks %d", d.Name(), rec.Section.Version, d.Version())
		}
		l.loaded = true
		var err error
		if d.NeedsLock() && !locked {
			l.in.c.Locked(func() { err = d.Load(rec.Data) })
		} else {
			err = d.Load(rec.Data)
		}
		if err != nil {
			return fmt.Errorf("load device %s: %w", d.Name(), err)
		}
	case stream.KindFlush:
		// The multifd barrier between passes: every channel applied the
		// pass before the main stream goes on.
		if l.mf == nil {
			return errors.New("the stream carries a MULTIFD_FLUSH record, but multifd is off on this destination")
		}
		if err := l.mf.sync.Wait(l.in.ioCtx); err != nil {
			if ferr := l.mf.failure(); ferr != nil {
				return ferr
			}
			return err
		}
	case stream.KindCommand:
		switch rec.Command {
		case stream.CmdOpenReturnPath:
			l.rp = l.conn.ReturnPath()
			if l.rp && l.hs.Speaks(stream.ExtSwitchoverCommit) && !l.in.opts.NoCommitProtocol {
				if err := l.speakCommit(); err != nil {
					return err
				}
			}
			// switchover-ack: no device of ours needs more time before
			// switchover, so the destination allows it at once, as QEMU does
			// when no device asks to delay it.
			if l.rp && l.ackSwitchover {
				if ready := l.in.opts.SwitchoverReady; ready != nil {
					l.wg.Add(1)
					go func() {
						defer l.wg.Done()
						select {
						case <-ready:
							if err := l.sendRP(stream.NewSwitchoverAck()); err != nil {
								l.in.log.Warn("send SWITCHOVER_ACK", "err", err)
							}
						case <-l.in.ioCtx.Done():
						}
					}()
				} else if err := l.sendRP(stream.NewSwitchoverAck()); err != nil {
					return err
				}
			}
		case stream.CmdPing:
			if l.rp {
				if err := l.sendRP(stream.NewPong(uint32(rec.Value))); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// page returns the guest memory a page record targets. The decoder has
// already checked the block and offset against the limits; this re-check
// makes writing outside guest RAM impossible even if it had not.
func (l *loader) page(rec stream.Record) ([]byte, error) {
	b, ok := l.blocks[rec.Block]
	ps := l.stats.PageSize
	if !ok || rec.Offset%ps != 0 || rec.Offset > uint64(len(b.Mem))-ps {
		return nil, fmt.Errorf("page %s@%#x is outside guest RAM", rec.Block, rec.Offset)
	}
	return b.Mem[rec.Offset : rec.Offset+ps], nil
}

// complete reads the vmdesc (a stream without it is incomplete: a save cut
// short), runs the commit protocol's wait for go when the source speaks
// it, fires complete, then arrive on the guest graph, starts the guest
// when arrive leads to running (not when the operator asked it to stay
// paused), and confirms to the source. The state machine decides first: a
// cancel that won the race leaves complete refused and the guest never
// starts.
func (l *loader) complete(dec *stream.Decoder) error {
	in := l.in
	if l.mf != nil {
		// The source half-closed its channels after the last sync: the
		// readers end on their own.
		select {
		case <-l.mf.done:
		case <-time.After(channelTimeout):
			return errors.New("the multifd channels did not end after the stream did")
		case <-in.ioCtx.Done():
			return context.Cause(in.ioCtx)
		}
		if err := l.mf.failure(); err != nil {
			return err
		}
	}
	rec, err := dec.Next()
	switch {
	case errors.Is(err, io.EOF):
		return errors.New("the stream ends after its EOF marker without the vmdesc: it was cut short (an incomplete save?)")
	case err != nil:
		return fmt.Errorf("read the vmdesc: %w", err)
	case rec.Kind != stream.KindVMDesc:
		return fmt.Errorf("a %v record after the EOF marker, want the vmdesc", rec.Kind)
	}
	resume := l.dog.Pause() // local work: nothing is expected from the source
	l.stopPrefault()
	if err := l.ramLanded(); err != nil {
		return err
	}
	if err := l.fillHoles(); err != nil { // postcopy.go: a Postcopier guest's zero pages
		return err
	}
	if in.opts.BeforeStart != nil {
		if err := in.opts.BeforeStart(l.pageSums); err != nil {
			resume()
			return err
		}
	}
	resume()
	if l.proto {
		if err := l.awaitGo(dec); err != nil {
			return err
		}
	}
	l.stopWatch()
	l.publish(true, nil) // the last statistics, before the side turns terminal
	out, err := in.c.Fire(context.Background(), spec.Incoming, machine.TriggerComplete, nil)
	if err != nil {
		return err
	}
	l.final = out.To
	arrived, err := in.c.Fire(context.Background(), spec.Guest, machine.TriggerArrive, nil)
	if err != nil {
		in.log.Error("the guest graph refused arrive", "err", err)
	}
	if arrived.To == machine.GuestRunning {
		if err := in.g.Start(); err != nil {
			in.log.Error("start the guest", "err", err)
			return fmt.Errorf("start the guest: %w", err)
		}
	}
	// The guest runs (or is ready to, told to stay paused): its true
	// downtime ends now. A source that speaks the commit protocol gets the
	// stamp; one on this boot of this host had sent its own.
	started := host.Now()
	if d, ok := started.Sub(l.srcStop); ok && d >= 0 {
		l.statsMu.Lock()
		l.stats.TrueDowntime, l.stats.TrueDowntimeExact = d, true // published by cleanup
		l.statsMu.Unlock()
	}
	if l.proto {
		if err := l.sendRP(stream.NewStarted(started.Boot, uint64(started.Mono))); err != nil {
			in.log.Warn("tell the source when the guest started", "err", err)
		}
	}
	if l.rp {
		if err := l.sendRP(stream.NewShut(0)); err != nil {
			in.log.Warn("confirm to the source", "err", err)
		}
	}
	return nil
}

// tellSource sends the failure reason and SHUT(1), half-closes, and reads
// and discards what the source still sends until it closes (bounded), so
// closing does not reset the connection before the source has read why.
// Called only once the side failed or was cancelled: SHUT(1) promises the
// source that the guest never runs here.
func (l *loader) tellSource(reason string) {
	l.ioMu.Lock()
	l.farewell = true
	l.ioMu.Unlock()
	_ = l.conn.SetDeadline(time.Now().Add(drainTimeout))
	if len(reason) > stream.MaxFailReason {
		reason = reason[:stream.MaxFailReason]
	}
	if l.sendRP(stream.NewFailReason(reason)) != nil || l.sendRP(stream.NewShut(1)) != nil {
		return
	}
	_ = l.conn.CloseWrite()
	_, _ = io.Copy(io.Discard, l.conn)
}

// interrupt unblocks the loader's I/O on the main channel when the run is
// cancelled, stalls or is yanked: a past deadline ends a blocked read or
// write at once and keeps the channel open to tell the source why; a
// channel without deadlines is closed.
func (l *loader) interrupt() {
	l.ioMu.Lock()
	defer l.ioMu.Unlock()
	if l.farewell || l.conn == nil { // a reattached run has no channel until a recovery
		return
	}
	if err := l.conn.SetDeadline(time.Unix(1, 0)); err != nil {
		l.conn.Close()
	}
}

// drainTimeout bounds how long a failed destination waits for the source
// to read its reason and hang up.
const drainTimeout = time.Second

func (l *loader) sendRP(m stream.RPMessage) error {
	l.rpMu.Lock()
	defer l.rpMu.Unlock()
	if l.conn == nil {
		return errNoChannel
	}
	return stream.WriteRP(l.conn, m)
}

// startPrefault pre-faults guest RAM from the moment the destination
// listens: in production the destination waits for its source, and the
// faulting is done by the time pages arrive; otherwise it runs in parallel
// with receiving. Pages the loader already wrote are simply skipped by the
// kernel (MADV_POPULATE_WRITE only faults in what is missing).
func (in *Incoming) startPrefault() {
	in.pfDone = make(chan struct{})
	if in.opts.NoPrefault {
		close(in.pfDone)
		return
	}
	ctx, cancel := context.WithCancel(in.ioCtx)
	in.pfCancel = cancel
	go func() {
		defer close(in.pfDone)
		host.LowerThreadPriority()
		for _, b := range in.g.Blocks() {
			if err := in.opts.Populate(ctx, b); err != nil {
				return // best effort: pages fault in as they land
			}
		}
	}()
}

// Prefaulted is closed when pre-faulting guest RAM has finished (or was
// stopped).
func (in *Incoming) Prefaulted() <-chan struct{} { return in.pfDone }

func (l *loader) stopPrefault() {
	if l.in.pfCancel != nil {
		l.in.pfCancel()
	}
	<-l.in.pfDone
}

func (l *loader) publish(force bool, dec *stream.Decoder) {
	l.statsMu.Lock()
	defer l.statsMu.Unlock()
	now := time.Now()
	if !force && now.Sub(l.lastPub) < l.in.opts.StatsInterval {
		return
	}
	l.lastPub = now
	if dec != nil {
		l.dec.Store(dec)
	}
	l.stats.Transferred = 0
	if d := l.dec.Load(); d != nil {
		l.stats.Transferred = uint64(d.Offset())
	}
	l.wire.MainPages, l.wire.MainZeros = l.mainPages.Load(), l.mainZeros.Load()
	if l.mf != nil {
		l.wire.MultifdPages, l.wire.MultifdZeros = l.mf.pages.Load(), l.mf.zeros.Load()
		l.stats.MultifdBytes = l.mf.received()
		l.stats.Transferred += l.stats.MultifdBytes
	}
	l.stats.Transferred += l.wire.MappedBytes
	l.stats.Normal = l.wire.MainPages + l.wire.MultifdPages + l.wire.MappedPages
	l.stats.Duplicate = l.wire.MainZeros + l.wire.MultifdZeros
	l.stats.NormalBytes = l.stats.Normal * l.stats.PageSize
	l.pcStats(&l.stats) // postcopy.go
	l.stats.TotalTime = now.Sub(l.start)
	if secs := l.stats.TotalTime.Seconds(); secs > 0 {
		l.stats.Mbps = float64(l.stats.Transferred) * 8 / 1e6 / secs
	}
	_ = l.in.c.PublishStats(spec.Incoming, l.stats)
}

// finish records the outcome. On a failure while the source's go was
// awaited (the channel broke, stalled or carried garbage) the outcome is
// unknown: the side waits in unknown-outcome and the source is told
// nothing. On any other failure the side fails (or ends cancelled) and
// then tells the source why over the return path (when there is one), so
// the source fails too and keeps its guest running.
func (l *loader) finish(err error) {
	in := l.in
	l.stopPrefault()
	if err != nil {
		var stall *StallError
		if cause := context.Cause(in.ioCtx); errors.Is(cause, ErrCancelled) {
			err = cause // what the loader saw is only the consequence
		} else if l.mf != nil && l.mf.failure() != nil {
			err = l.mf.failure() // a channel failed; the main stream was closed under it
		} else if errors.As(cause, &stall) || errors.Is(cause, ErrYanked) {
			err = cause
		}
		l.stopWatch()
		l.publish(true, nil) // the last statistics, before the side turns terminal
		if l.waitingGo && !errors.Is(err, ErrCancelled) && !errors.Is(err, ErrAborted) {
			l.endUnknown(err)
			if st, _ := in.c.Status(spec.Incoming, 0); st.State == l.final && !st.Terminal {
				err = fmt.Errorf("%w: %v", ErrOutcomeUnknown, err)
				l.cleanup(err)
				return
			}
			// A cancel won the race: the side is cancelling; fail it below.
		}
		reason := err.Error()
		l.failRAM(err)
		bg := context.Background()
		var ge *machine.GuardError
		told := false
		if errors.As(err, &ge) && ge.To != "" {
			l.final = ge.To // the connect guard already moved the side
			told = true
		} else {
			// From cancelling the spec ignores fail; cleanup then ends it.
			out, ferr := in.c.Fire(bg, spec.Incoming, machine.TriggerFail, &machine.Args{Reason: reason})
			l.final = out.To
			told = ferr == nil
			if ferr == nil && out.Ignored {
				if out, cerr := in.c.Fire(bg, spec.Incoming, machine.TriggerCleanup, nil); cerr == nil {
					l.final = out.To
				}
			}
		}
		// A source that went silent is not waited for: it would not read.
		if told && l.conn != nil && l.conn.ReturnPath() && !errors.As(err, &stall) {
			l.tellSource(reason)
		}
		in.log.Info("incoming migration ended", "state", l.final, "err", err, "pages_loaded", l.loaded)
	}
	l.cleanup(err)
}

// cleanup releases the run's channels and goroutines and records the
// result.
func (l *loader) cleanup(err error) {
	in := l.in
	l.stopWatch()
	in.cancelIO(err)
	if l.conn != nil {
		l.conn.Close()
	}
	if l.mf != nil {
		l.mf.stop()
	}
	if l.pc != nil {
		_ = l.pc.stopService() // postcopy.go
	}
	in.ln.Close()
	l.wg.Wait()
	l.publish(true, nil)
	l.statsMu.Lock()
	in.result = Result{State: l.final, Stats: l.stats, Err: err, PageSums: l.pageSums, Wire: l.wire}
	l.statsMu.Unlock()
}
