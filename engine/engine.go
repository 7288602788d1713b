// Package engine runs the outgoing side of a migration: it connects to the
// destination, sends the guest's RAM in precopy passes driven by the
// guest's dirty log, switches over when the remaining pages fit the
// downtime limit at the measured bandwidth, sends device state, and waits
// for the destination to confirm that its guest runs.
//
// The engine's goroutine never holds the controller lock while it does
// I/O: it takes it (through machine.Controller) only to fire a trigger or
// publish statistics. Configuration comes from the snapshot the controller
// took when the outgoing side froze, except the live parameters
// (max-bandwidth, downtime-limit), which are re-read every section.
//
// Nothing is lost on failure: until the destination confirms it runs the
// guest, a failure or a cancel restarts the source guest with its memory
// untouched (the engine only reads guest memory).
package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/multifd"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// Options tune a migration. The zero value is usable.
type Options struct {
	// Logger receives progress lines (default: discard).
	Logger *slog.Logger
	// StatsInterval is how often statistics are published (default 100 ms).
	StatsInterval time.Duration
	// SectionBytes bounds one RAM section part; between parts the engine
	// checks for cancellation, applies the bandwidth limit and publishes
	// statistics (default 8 MiB).
	SectionBytes int
	// Dial opens the channel; tests inject faults. By default it is
	// Transport's Dial with the guest's RAM and rdma-pin-all added
	// (transport.Config.RAM, PinRAM), which rdma: needs.
	Dial func(ctx context.Context, a transport.Addr) (transport.Conn, error)
	// Transport is the configuration the default Dial starts from (nil:
	// the zero Config): migctl serve's resolves fd: addresses from QMP's
	// getfd table and names the RDMA provider.
	Transport *transport.Config
	// Checksum, when set, is called with the source guest stopped after the
	// destination confirmed, once the statistics (the total time among
	// them) are final: it is outside every measured time. Its result is in
	// the Result's Stats.Checksum.
	Checksum func() (uint64, error)
	// ConfirmTimeout, when positive, bounds the wait for the destination's
	// confirmation after the stream ends, or, without a return path, for
	// the stream to become durable (transport.Committer: a file's fsync and
	// rename, an exec: command's exit). By default x-migctl-io-timeout
	// bounds them: a destination that keeps proving it is alive may take
	// as long as its loading needs.
	ConfirmTimeout time.Duration
	// NoDrain skips the drain before the stop (a PING and its PONG, so the
	// destination has absorbed what was queued before the guest stops):
	// for measurements of what it buys.
	NoDrain bool
	// NoCommitProtocol makes the source behave as one without the
	// switchover commit protocol (it does not announce it): for tests of
	// the fallback with a destination that lacks it, and for interop.
	NoCommitProtocol bool
	// Channels lists the channel types the migration was given (QMP's
	// channels argument); the rules judge them with the URI.
	Channels []string
	// MultifdHook, for tests, runs on a multifd channel's goroutine before
	// each packet it writes (a test blocks one channel with it to show the
	// others keep moving pages). Nil in production.
	MultifdHook func(channel int)
	// Probe resolves the properties of the address's endpoint for the
	// rules (default transport.Probe; serve passes its transport.Config's,
	// which looks through the getfd table): an fd: on a regular file is
	// seekable, so mapped-ram may use it.
	Probe func(a transport.Addr) (transport.Props, bool, error)
	// Creds holds the objects QMP's object-add made: with the parameter
	// tls-creds set, every channel Dial opens is wrapped in TLS with the
	// tls-creds-x509 object it names (engine/tls.go). Nil: a migration
	// with tls-creds set fails.
	Creds *creds.Objects
}

// Result is how a migration ended.
type Result struct {
	// State is the outgoing side's final state (the spec's completed, or
	// the terminal state a failure or cancel led to).
	State machine.State
	Stats machine.Stats
	// Err is the failure, nil when the migration completed. It wraps
	// ErrCancelled when the migration was cancelled.
	Err error
}

// Migration is one outgoing migration in progress.
type Migration struct {
	c    *machine.Controller
	g    guest.Guest
	addr transport.Addr
	opts Options
	log  *slog.Logger

	ioCtx    context.Context
	cancelIO context.CancelCauseFunc
	cont     chan struct{} // closed by Continue
	contOnce sync.Once
	done     chan struct{}
	result   Result // written by run before done is closed
	stopped  bool   // the run stopped a running guest (written by run before done is closed)
	// resolveMu serialises Resolve calls (each fires on the controller).
	resolveMu sync.Mutex
	// Postcopy (postcopy.go): pcStart is migrate-start-postcopy's flag;
	// pcMu guards pc, the run's postcopy state, for Pause and Resume.
	pcStart atomic.Bool
	pcMu    sync.Mutex
	pc      *pcOut
}

// ErrCancelled is the cause recorded when a migration is cancelled.
var ErrCancelled = errors.New("migration cancelled")

// Start fires migrate on the controller's outgoing side (the guards judge
// the URI's transport against the configuration) and starts the migration
// goroutine. A refusal is returned at once and nothing is started.
func Start(ctx context.Context, c *machine.Controller, g guest.Guest, uri string, opts Options) (*Migration, error) {
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
	if opts.SectionBytes <= 0 {
		opts.SectionBytes = 8 << 20
	}
	if opts.Dial == nil {
		opts.Dial = dialWithRAM(c, g, opts.Transport)
	}
	opts.Dial = (&tlsDialer{c: c, objs: opts.Creds, dial: opts.Dial}).Dial // TLS when tls-creds is set (tls.go)
	ep := &guards.Endpoint{Transport: a.Scheme, URI: a.String(), Channels: opts.Channels, Props: probeProps(opts.Probe, a)}
	if _, err := c.Fire(ctx, spec.Outgoing, machine.TriggerMigrate, &machine.Args{Endpoint: ep}); err != nil {
		return nil, err
	}
	m := &Migration{c: c, g: g, addr: a, opts: opts, log: opts.Logger, cont: make(chan struct{}), done: make(chan struct{})}
	m.ioCtx, m.cancelIO = context.WithCancelCause(context.WithoutCancel(ctx))
	go m.run()
	return m, nil
}

// Cancel fires cancel on the outgoing side and aborts the migration's I/O.
// The migration ends in cancelled with the source guest running. Cancel in
// a state that ignores it (already ending) is harmless.
func (m *Migration) Cancel(ctx context.Context) error {
	out, err := m.c.Fire(ctx, spec.Outgoing, machine.TriggerCancel, nil)
	if err != nil {
		return err
	}
	if out.Moved {
		m.cancelIO(ErrCancelled)
	}
	return nil
}

// Continue releases a migration paused in pre-switchover (capability
// pause-before-switchover) by firing continue.
func (m *Migration) Continue(ctx context.Context) error {
	out, err := m.c.Fire(ctx, spec.Outgoing, machine.TriggerContinue, nil)
	if err != nil {
		return err
	}
	if out.Moved {
		m.contOnce.Do(func() { close(m.cont) })
	}
	return nil
}

// Done is closed when the migration has ended and its goroutines exited.
func (m *Migration) Done() <-chan struct{} { return m.done }

// Wait waits for the end of the migration or ctx.
func (m *Migration) Wait(ctx context.Context) (Result, error) {
	select {
	case <-m.done:
		return m.result, nil
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// run is the migration goroutine.
func (m *Migration) run() {
	defer close(m.done)
	defer m.cancelIO(nil)
	s := &sender{m: m, start: time.Now(), dog: watchdog.New(), protoKnown: make(chan struct{}), pingSeq: 1, pings: newPingLog()}
	err := s.migrate()
	s.finish(err)
	m.stopped = s.stopped
}

// sender holds one run's state; it belongs to the migration goroutine.
type sender struct {
	m       *Migration
	start   time.Time
	cfg     guards.Config  // the frozen configuration of this run
	conn    transport.Conn // the main channel, as Dial returned it
	raw     transport.Conn // the same (its optional interfaces: transport.Committer, the RDMA and mapped-ram sinks')
	enc     *stream.Encoder
	rp      chan rpEvent // messages from the destination
	rpDone  chan struct{}
	stopped bool // the engine stopped the guest (it was running)
	// committed: the source fired commit (the destination loaded
	// everything, or a one-way save is durable); from here on it never
	// restarts its own guest on its own.
	committed bool
	// The commit protocol and liveness (commit.go).
	dog        *watchdog.Dog
	stopDog    context.CancelFunc
	dogDone    chan struct{}
	proto      atomic.Int32  // peerUnknown, peerSpeaks, peerLacks; written by readRP
	protoOnce  sync.Once     // guards closing protoKnown
	protoKnown chan struct{} // closed when proto is known
	eofSent    bool          // the EOF marker and vmdesc are on the wire
	pingSeq    uint32        // the last PING value sent (1: the first, which detects the protocol)
	stopStamp  host.Stamp    // when the guest stopped here
	startStamp host.Stamp    // when the destination's guest started (its STARTED), if it said
	pings      *pingLog      // PINGs sent, PONGs read: what the destination absorbed (drain.go)
	lastPing   time.Time
	// ioMu orders the interrupt of a cancel or stall (a past deadline on
	// the channel) with the farewell ABORT (a fresh deadline): farewell
	// set, the interrupt no longer touches the channel.
	ioMu     sync.Mutex
	farewell bool
	final    machine.State // the state complete led to
	stats    machine.Stats
	dirty    [][]uint64
	blocks   []*guest.Block
	lastPub  time.Time
	// bandwidth estimate, bytes per second
	bw float64
	// acked: the destination sent SWITCHOVER_ACK (capability switchover-ack)
	acked bool
	// auto-converge (QEMU's migration_trigger_throttle): the current
	// period's dirtied and sent bytes, and how many periods in a row the
	// dirtying outran the threshold.
	period throttlePeriod
	// The page scanner's choices (frozen configuration) and its sink.
	zeroMode multifd.ZeroPageDetection
	multifd  bool
	sink     ramSink
	mapped   *mappedSink // capability mapped-ram (engine/mapped.go)
	// Pages handed to the sink, and those the scanner found zero.
	pagesPut, scanZero uint64
	// Postcopy (postcopy.go): its state when postcopy-ram is on, and the
	// preempt channel until postcopy starts using it.
	pc      *pcOut
	preConn transport.Conn
	prePW   *stream.PageWriter
	// nonConverging counts the passes in a row whose expected downtime
	// stayed above downtime-limit (x-migctl-convergence-passes).
	nonConverging uint64
}

type rpEvent struct {
	msg stream.RPMessage
	err error
}

// failure is an error that carries the destination's own reason. aborted
// marks the destination's failure report (its reason or SHUT non-zero):
// it promises the destination will never run the guest.
type failure struct {
	reason  string
	aborted bool
}

func (f *failure) Error() string { return f.reason }

func (s *sender) migrate() error {
	m := s.m
	dialed, err := m.opts.Dial(m.ioCtx, m.addr)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", m.addr, err)
	}
	conn := dialed
	s.conn, s.raw = conn, dialed
	stopInterrupt := context.AfterFunc(m.ioCtx, s.interrupt)
	defer stopInterrupt()
	s.startWatch()
	if _, err := m.c.Fire(m.ioCtx, spec.Outgoing, machine.TriggerStart, nil); err != nil {
		return err
	}
	s.stats.SetupTime = time.Since(s.start)
	cfg, ok := m.c.Frozen(spec.Outgoing)
	if !ok {
		cfg = m.c.Config()
	}
	s.cfg = cfg
	s.blocks = m.g.Blocks()
	if len(s.blocks) == 0 {
		return errors.New("the guest has no RAM blocks")
	}
	pageSize := uint64(s.blocks[0].PageSize)
	s.stats.PageSize = pageSize
	for _, b := range s.blocks {
		s.stats.Total += uint64(len(b.Mem))
	}
	if cfg.Caps["postcopy-ram"] {
		s.newPostcopy(cfg) // postcopy.go
	}

	if cfg.Caps["mapped-ram"] { // before the stream's first byte: it notes where that is
		if s.mapped, err = prepareMapped(m.ioCtx, s.raw, cfg, pageSize); err != nil {
			return err
		}
		defer s.mapped.close()
	}
	// The encoder writes through feedingConn, so that a write's progress
	// feeds the watchdog where it is the only sign of life (commit.go).
	s.enc = stream.NewEncoder(&feedingConn{Conn: conn, s: s})
	if err := s.enc.WriteHeader(m.g.ID()); err != nil {
		return err
	}
	hs := handshake(m.c.Spec(), cfg, m.g, pageSize)
	if conn.ReturnPath() && !m.opts.NoCommitProtocol {
		hs.Extensions = []string{stream.ExtSwitchoverCommit}
	}
	if err := s.enc.WriteHandshake(hs); err != nil {
		return err
	}
	if conn.ReturnPath() {
		if err := s.enc.OpenReturnPath(); err != nil {
			return err
		}
		// PING(1): a destination that speaks the commit protocol answers
		// HELLO before its PONG.
		if err := s.enc.Ping(1); err != nil {
			return err
		}
		s.lastPing = time.Now()
		s.pings.sentPing(1, s.enc.Stats().Bytes)
		s.rp = make(chan rpEvent, 16)
		s.rpDone = make(chan struct{})
		go s.readRP()
	}
	if s.pc != nil {
		if err := s.advisePostcopy(pageSize); err != nil { // postcopy.go
			return err
		}
	}
	sb := make([]stream.Block, len(s.blocks))
	for i, b := range s.blocks {
		sb[i] = stream.Block{Name: b.Name, Size: uint64(len(b.Mem))}
	}
	if s.mapped != nil {
		err = s.mapped.startRAM(s.enc, pageSize, sb)
	} else {
		err = s.enc.StartRAM(pageSize, sb)
	}
	if err != nil {
		return err
	}
	if s.zeroMode, err = multifd.ParseZeroPageDetection(cfg.Params["zero-page-detection"]); err != nil {
		return err
	}
	s.multifd = cfg.Caps["multifd"]
	// The destination reads the header and handshake before it accepts
	// any other channel: they must be on the wire now.
	if err := s.enc.Flush(); err != nil {
		return err
	}
	if s.pc != nil {
		if err := s.openPreempt(); err != nil { // postcopy.go
			return err
		}
	}
	if s.mapped != nil {
		s.sink = s.mapped // with multifd too: its channels write the file, no connections
	} else if s.multifd {
		k, err := s.openMultifd(cfg, pageSize)
		if err != nil {
			return err
		}
		s.sink = k
	} else if k := s.openRDMA(); k != nil {
		s.sink = k
	} else {
		s.sink = &streamSink{enc: s.enc}
	}

	// The first pass sends everything; later passes what the log reports.
	m.g.StartDirtyLog()
	defer m.g.StopDirtyLog()
	s.dirty = guest.NewBitmaps(s.blocks)
	for i, b := range s.blocks {
		bm := guest.Bitmap(s.dirty[i])
		for p := range b.Pages() {
			bm.Set(p)
		}
	}
	s.stats.Remaining = s.dirtyBytes()
	s.period.start = time.Now()
	for pass := uint64(1); ; pass++ {
		_ = m.c.PublishPass(spec.Outgoing, pass)
		s.stats.DirtySyncCount = pass
		t0, b0 := time.Now(), s.moved()
		if err := s.sendDirty(false); err != nil {
			if errors.Is(err, errStartPostcopy) {
				return s.startPostcopy(cfg) // postcopy.go
			}
			return err
		}
		elapsed := time.Since(t0)
		sent := s.moved() - b0
		if elapsed > 0 && sent > 0 {
			s.bw = float64(sent) / elapsed.Seconds()
		}
		m.g.SyncDirty(s.dirty)
		remaining := s.dirtyBytes()
		s.stats.Remaining = remaining
		if elapsed > 0 {
			s.stats.DirtyPagesRate = uint64(float64(remaining/pageSize) / elapsed.Seconds())
		}
		limit := s.liveDuration("downtime-limit", 300*time.Millisecond)
		bw, expected := expectedDowntime(remaining, s.bw, s.pings.absorbed(), float64(s.liveUint("avail-switchover-bandwidth")))
		s.stats.ExpectedDowntime = expected
		if cfg.Caps["auto-converge"] {
			s.autoConverge(sent, remaining)
		}
		s.publish(true)
		m.log.Info("pass", "pass", pass, "remaining", remaining, "bandwidth", bw, "expected_downtime", expected, "throttle", s.stats.ThrottlePercent)
		if err := s.checkRP(); err != nil {
			return err
		}
		if err := s.keepalive(); err != nil {
			return err
		}
		if s.postcopyRequested() {
			return s.startPostcopy(cfg) // postcopy.go
		}
		s.convergence(expected, limit) // postcopy.go
		if expected <= limit {
			if !cfg.Caps["switchover-ack"] || s.acked || mutant.SkipSwitchoverAckWait {
				break
			}
			// Converged, but the destination has not allowed switchover yet.
			if err := s.awaitAck(50 * time.Millisecond); err != nil {
				return err
			}
			if s.acked {
				break
			}
		}
	}
	return s.switchover(cfg)
}

// switchover stops the guest, sends the rest and the devices, and runs
// the commit protocol (commit.go) with the destination.
func (s *sender) switchover(cfg guards.Config) error {
	m := s.m
	if s.rp != nil {
		// Know whether the destination speaks the commit protocol before
		// the guest stops (the answer came with its first records).
		if err := s.awaitProto(); err != nil {
			return err
		}
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
	// With the guest still running, let the destination absorb what is
	// queued: the stop-copy phase then moves only what is dirty.
	if err := s.drain(); err != nil {
		return err
	}
	tStop, err := s.stopForSwitchover()
	if err != nil {
		return err
	}
	if s.rp != nil {
		s.stats.BacklogAtStop = s.pings.backlog(s.moved())
	}
	m.g.SyncDirty(s.dirty)
	s.stats.Remaining = s.dirtyBytes()
	b0 := s.moved()
	if err := s.sendDirty(true); err != nil {
		return err
	}
	for _, d := range m.g.Devices() {
		state, err := d.Save()
		if err != nil {
			return fmt.Errorf("save device %s: %w", d.Name(), err)
		}
		if err := s.enc.WriteDevice(d.Name(), d.Instance(), d.Version(), state); err != nil {
			return err
		}
	}
	if err := s.enc.Close(); err != nil {
		return fmt.Errorf("finish the stream: %w", err)
	}
	if s.mapped != nil { // the completion marker, last
		if err := s.mapped.complete(); err != nil {
			return err
		}
	}
	s.eofSent = true
	tSent := time.Now()
	s.stats.DowntimeBytes = s.moved() - b0
	s.stats.Remaining = 0
	switch {
	case s.rp == nil:
		// No back channel (file, exec, a pipe): the source commits when
		// its last byte is durable.
		err := s.commitOneWay()
		s.stats.Downtime = time.Since(tStop)
		if err != nil {
			return fmt.Errorf("finish %s: %w", m.addr, err)
		}
		if err := s.commit(); err != nil {
			return err
		}
		s.stats.TrueDowntime = s.stats.Downtime
	case s.proto.Load() == peerSpeaks:
		// LOADED, commit, go, SHUT(0). QEMU's downtime ends with the last
		// byte written, or with its return-path capability on with the
		// destination's confirmation.
		s.stats.Downtime = tSent.Sub(tStop)
		if err := s.awaitLoaded(); err != nil {
			return err
		}
		if err := s.commit(); err != nil {
			return err
		}
		// When the guest stopped here, then go: one write.
		if err := s.enc.WriteStopped(s.stopStamp.Boot, uint64(s.stopStamp.Mono)); err != nil {
			return fmt.Errorf("send go: %w", err)
		}
		if err := s.enc.WriteTrailer(stream.TrailerGo); err != nil {
			return fmt.Errorf("send go: %w", err)
		}
		_ = s.conn.CloseWrite()
		if err := s.awaitConfirm(tStop); err != nil {
			return err
		}
	default:
		// A destination without the protocol: it runs the guest as soon
		// as the stream ended. The source cannot know whether it does
		// until SHUT(0) (the split brain the protocol closes is possible
		// here, as with QEMU).
		s.stats.Downtime = tSent.Sub(tStop)
		_ = s.conn.CloseWrite()
		if err := s.awaitConfirm(tStop); err != nil {
			return err
		}
	}
	if s.rp != nil && cfg.Caps["return-path"] {
		s.stats.Downtime = s.stats.TrueDowntime
	}
	m.log.Info("switchover", "final_bytes", s.stats.DowntimeBytes, "sent_after", tSent.Sub(tStop), "downtime", s.stats.Downtime, "true_downtime", s.stats.TrueDowntime, "commit_protocol", s.proto.Load() == peerSpeaks)
	// The last statistics go out before the side turns terminal: from
	// then on a new migration may start, and nothing of this run may
	// overwrite its statistics.
	s.stopWatch()
	s.publish(true)
	// The checksum (a demo's, a test's) is taken after the total time was
	// measured, with the guest still stopped: it is no part of it.
	if m.opts.Checksum != nil {
		if sum, err := m.opts.Checksum(); err == nil {
			s.stats.Checksum = sum
		}
	}
	out, err = m.c.Fire(context.Background(), spec.Outgoing, machine.TriggerComplete, nil)
	if err != nil {
		return err
	}
	s.final = out.To
	_, _ = m.c.Fire(context.Background(), spec.Guest, machine.TriggerMigrated, nil)
	return nil
}

// awaitContinue waits in pre-switchover for migrate-continue, sending
// keepalives meanwhile.
func (s *sender) awaitContinue() error {
	m := s.m
	t := time.NewTicker(min(max(s.liveDuration(paramKeepalive, time.Second)/2, 5*time.Millisecond), 500*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-m.cont:
			return nil
		case <-t.C:
			if err := s.keepalive(); err != nil {
				return err
			}
		case ev, ok := <-s.rp:
			if err := s.beforeSwitchover(ev, ok); err != nil {
				return err
			}
		case <-m.ioCtx.Done():
			return context.Cause(m.ioCtx)
		}
	}
}

// awaitConfirm waits for SHUT from the destination: status 0 means its
// guest runs (the downtime ends here).
func (s *sender) awaitConfirm(tStop time.Time) error {
	var deadline <-chan time.Time
	if d := s.m.opts.ConfirmTimeout; d > 0 {
		timer := time.NewTimer(d)
		defer timer.Stop()
		deadline = timer.C
	}
	for {
		select {
		case ev, ok := <-s.rp:
			confirmed, err := s.onRP(ev, ok)
			if err != nil {
				return err
			}
			if confirmed {
				// The guest's true downtime: exact from the destination's
				// stamp (STARTED, before SHUT) on the same boot of the
				// same host; otherwise an upper bound, by the SHUT's half
				// round trip.
				s.stats.TrueDowntime = time.Since(tStop)
				if d, ok := s.startStamp.Sub(s.stopStamp); ok && d >= 0 {
					s.stats.TrueDowntime, s.stats.TrueDowntimeExact = d, true
				}
				return nil
			}
		case <-s.m.ioCtx.Done():
			return context.Cause(s.m.ioCtx)
		case <-deadline:
			return fmt.Errorf("the destination did not confirm within %s", s.m.opts.ConfirmTimeout)
		}
	}
}

// awaitAck waits up to d for return-path messages, for SWITCHOVER_ACK.
func (s *sender) awaitAck(d time.Duration) error {
	if s.rp == nil {
		return errors.New("capability switchover-ack needs a return path, and this transport has none")
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for !s.acked {
		select {
		case <-t.C:
			return nil
		case <-s.m.ioCtx.Done():
			return context.Cause(s.m.ioCtx)
		case ev, ok := <-s.rp:
			if err := s.beforeSwitchover(ev, ok); err != nil {
				return err
			}
		}
	}
	return nil
}

// onRP interprets one return-path event (ok false: the reader ended):
// confirmed reports SHUT(0); a failure reported by the destination, a
// non-zero SHUT or a broken return path is an error; SWITCHOVER_ACK is
// recorded.
func (s *sender) onRP(ev rpEvent, ok bool) (confirmed bool, err error) {
	if !ok {
		return false, errors.New("the destination closed the connection")
	}
	if ev.err != nil {
		return false, ev.err
	}
	switch ev.msg.Type {
	case stream.RPFailReason:
		return false, &failure{reason: "destination: " + string(ev.msg.Data), aborted: true}
	case stream.RPShut:
		if v, _ := ev.msg.Value(); v != 0 {
			return false, &failure{reason: fmt.Sprintf("the destination failed (status %d)", v), aborted: true}
		}
		return true, nil
	case stream.RPSwitchoverAck:
		s.acked = true
	case stream.RPStarted:
		if boot, mono, ok := ev.msg.Started(); ok {
			s.startStamp = host.Stamp{Boot: boot, Mono: time.Duration(mono)}
		}
	}
	return false, nil
}

// beforeSwitchover is onRP for messages that arrive while pages are still
// being sent, when even SHUT(0) means the destination gave up.
func (s *sender) beforeSwitchover(ev rpEvent, ok bool) error {
	confirmed, err := s.onRP(ev, ok)
	if err == nil && confirmed {
		err = &failure{reason: "the destination ended the migration early"}
	}
	return err
}

// readRP reads return-path messages until the connection ends. Every
// message feeds the watchdog; the commit protocol's HELLO and the first
// PONG tell what the destination speaks; keepalives and PONGs go no
// further. A failure reason followed by SHUT is reported as one failure.
func (s *sender) readRP() {
	defer close(s.rpDone)
	defer close(s.rp)
	var reason string
	for {
		msg, err := stream.ReadRP(s.conn)
		if err == nil && s.pc != nil { // postcopy.go: page requests, the package-loaded PONG
			var handled bool
			if handled, err = s.pc.intercept(msg); handled && err == nil {
				s.dog.Feed()
				continue
			}
		}
		if err != nil {
			if reason != "" {
				err = &failure{reason: "destination: " + reason, aborted: true}
			} else if s.m.ioCtx.Err() == nil {
				err = fmt.Errorf("return path: %w", err)
			}
			select {
			case s.rp <- rpEvent{err: err}:
			case <-s.m.ioCtx.Done():
			}
			return
		}
		s.dog.Feed()
		switch msg.Type {
		case stream.RPFailReason:
			reason = string(msg.Data)
			continue
		case stream.RPHello:
			if slices.Contains(msg.Extensions(), stream.ExtSwitchoverCommit) && !s.m.opts.NoCommitProtocol {
				s.setProto(peerSpeaks)
			} else {
				s.setProto(peerLacks)
			}
			continue
		case stream.RPPong:
			v, _ := msg.Value()
			if v == 1 {
				s.setProto(peerLacks) // no HELLO came first
			}
			s.pings.pong(v, time.Now())
			continue
		case stream.RPKeepalive:
			continue
		}
		if msg.Type == stream.RPShut && reason != "" {
			msg = stream.NewFailReason(reason)
		}
		select {
		case s.rp <- rpEvent{msg: msg}:
		case <-s.m.ioCtx.Done():
			return
		}
	}
}

// destinationReason replaces a local I/O error by the destination's own
// reason when the return path brings one shortly: a destination that
// refuses the stream says why before it hangs up, and that is what the
// user needs to read.
func (s *sender) destinationReason(err error) error {
	var f *failure
	if errors.As(err, &f) || errors.Is(err, ErrCancelled) {
		return err
	}
	timer := time.NewTimer(2 * time.Second)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-s.rp:
			if !ok {
				return err
			}
			if errors.As(ev.err, &f) {
				return f
			}
			if ev.msg.Type == stream.RPFailReason {
				return &failure{reason: "destination: " + string(ev.msg.Data), aborted: true}
			}
			if ev.err != nil {
				if tlsRefusal(ev.err) { // the destination refused our TLS credentials (tls.go)
					return ev.err
				}
				return err
			}
		case <-timer.C:
			return err
		}
	}
}

// checkRP looks at pending return-path messages without blocking; a
// failure reported by the destination ends the migration.
func (s *sender) checkRP() error {
	for s.rp != nil {
		select {
		case ev, ok := <-s.rp:
			if err := s.beforeSwitchover(ev, ok); err != nil {
				return err
			}
		default:
			return nil
		}
	}
	return nil
}

// sendDirty is the page scanner: it hands every page set in s.dirty
// (clearing the bits) to the sink, one pass. Where the main channel
// detects zero pages (multifd.Classify: legacy, or any mode but none
// without multifd) it tests each page and tells the sink; between chunks
// of SectionBytes it paces, checks for cancellation and the destination's
// complaints, and publishes statistics.
func (s *sender) sendDirty(final bool) error {
	m := s.m
	k := s.sink
	if err := k.begin(final); err != nil {
		return err
	}
	inChunk := 0
	chunkStart := time.Now()
	for bi, b := range s.blocks {
		bm := guest.Bitmap(s.dirty[bi])
		ps := uint64(b.PageSize)
		for p := bm.Next(0); p >= 0; p = bm.Next(p + 1) {
			bm.Clear(p)
			s.stats.Remaining -= min(s.stats.Remaining, ps)
			page := b.Page(p)
			zero := multifd.Classify(s.zeroMode, s.multifd, func() bool { return multifd.IsZero(page) }) == multifd.RouteMainZero
			n, err := k.put(b, p, zero)
			if err != nil {
				return fmt.Errorf("sending page %s@%#x to the destination: %w", b.Name, uint64(p)*ps, err)
			}
			s.pagesPut++
			if zero {
				s.scanZero++
			}
			inChunk += n
			if !final && inChunk >= m.opts.SectionBytes {
				if err := k.boundary(); err != nil {
					return err
				}
				if err := s.between(inChunk, chunkStart); err != nil {
					return err
				}
				inChunk, chunkStart = 0, time.Now()
				if err := k.begin(false); err != nil {
					return err
				}
			}
		}
	}
	return k.end(final)
}

// between runs between two section parts: cancellation, the destination's
// complaints, the bandwidth limit, statistics.
func (s *sender) between(sent int, since time.Time) error {
	m := s.m
	if err := context.Cause(m.ioCtx); err != nil {
		return err
	}
	if s.postcopyRequested() {
		return errStartPostcopy // migrate-start-postcopy: switch at this boundary
	}
	if err := s.checkRP(); err != nil {
		return err
	}
	if err := s.keepalive(); err != nil {
		return err
	}
	// Pace to max-bandwidth, re-reading it at least every 100 ms so a
	// change applies at once (it is a live parameter).
	for {
		limit := s.liveUint("max-bandwidth")
		if limit == 0 {
			break
		}
		want := time.Duration(float64(sent) / float64(limit) * float64(time.Second))
		wait := want - time.Since(since)
		if wait <= 0 {
			break
		}
		if err := s.keepalive(); err != nil {
			return err
		}
		if err := s.enc.Flush(); err != nil {
			return err
		}
		t := time.NewTimer(min(wait, 100*time.Millisecond))
		select {
		case <-t.C:
		case <-m.ioCtx.Done():
			t.Stop()
			return context.Cause(m.ioCtx)
		}
	}
	s.publish(false)
	return nil
}

func (s *sender) dirtyBytes() uint64 {
	var n uint64
	for i, b := range s.blocks {
		n += uint64(guest.Bitmap(s.dirty[i]).Count()) * uint64(b.PageSize)
	}
	return n
}

func (s *sender) liveUint(name string) uint64 {
	v, _ := strconv.ParseUint(s.m.c.Param(name), 10, 64)
	return v
}

func (s *sender) liveDuration(name string, def time.Duration) time.Duration {
	if s.m.c.Param(name) == "" {
		return def
	}
	return time.Duration(s.liveUint(name)) * time.Millisecond
}

// autoConverge accounts one pass (bytes sent, bytes found dirty) and, once
// a period of at least throttlePeriodLength has passed, applies QEMU's
// auto-converge decision (decide.go) to the guest's throttle.
func (s *sender) autoConverge(sent, dirtied uint64) {
	t, ok := s.m.g.(guest.Throttler)
	if !ok {
		return
	}
	s.period.sent += sent
	s.period.dirtied += dirtied
	if time.Since(s.period.start) < throttlePeriodLength {
		return
	}
	p := throttleParams{
		Threshold: s.liveUint("throttle-trigger-threshold"),
		Initial:   s.liveUint("cpu-throttle-initial"),
		Increment: s.liveUint("cpu-throttle-increment"),
		Max:       s.liveUint("max-cpu-throttle"),
		Tailslow:  s.m.c.Param("cpu-throttle-tailslow") == "true",
	}
	next, high := throttleStep(p, uint64(s.stats.ThrottlePercent), s.period.high, s.period.dirtied, s.period.sent)
	s.period = throttlePeriod{start: time.Now(), high: high}
	if int(next) != s.stats.ThrottlePercent {
		s.stats.ThrottlePercent = int(next)
		t.Throttle(int(next))
	}
}

// publish sends statistics to the controller at most every StatsInterval
// (always when force).
func (s *sender) publish(force bool) {
	now := time.Now()
	if !force && now.Sub(s.lastPub) < s.m.opts.StatsInterval {
		return
	}
	s.lastPub = now
	if s.enc != nil {
		s.stats.Transferred = s.enc.Stats().Bytes
		if s.sink != nil {
			s.stats.Transferred += s.sink.sent()
			if s.multifd {
				s.stats.MultifdBytes = s.sink.sent()
			}
			s.stats.Duplicate = s.scanZero + s.sink.zeros()
		} else {
			s.stats.Duplicate = s.scanZero
		}
		s.stats.Normal = s.pagesPut - s.stats.Duplicate
		s.stats.NormalBytes = s.stats.Normal * s.stats.PageSize
		s.stats.PrecopyBytes = s.stats.Transferred - s.stats.DowntimeBytes
		s.pcStats() // postcopy.go
	}
	s.stats.TotalTime = now.Sub(s.start)
	if secs := s.stats.TotalTime.Seconds(); secs > 0 {
		s.stats.Mbps = float64(s.stats.Transferred) * 8 / 1e6 / secs
		s.stats.PagesPerSecond = uint64(float64(s.stats.Normal+s.stats.Duplicate) / secs)
	}
	_ = s.m.c.PublishStats(spec.Outgoing, s.stats)
}

// finish ends the run: on success the side is completed. On a failure
// before the commit (or one the destination reported after it) the guest
// runs here again and the side goes to failed or cancelled; on any other
// failure after the commit the side goes to unknown-outcome with the guest
// stopped here.
func (s *sender) finish(err error) {
	m := s.m
	if err != nil {
		// A stall or a yank explains the I/O error it provoked.
		var stall *StallError
		if cause := context.Cause(m.ioCtx); errors.As(cause, &stall) || errors.Is(cause, ErrYanked) {
			err = cause
		}
		if s.rp != nil {
			err = s.destinationReason(err)
		}
		s.sendAbort()
	}
	m.cancelIO(err)
	s.stopWatch()
	if s.conn != nil {
		s.conn.Close()
	}
	if s.rpDone != nil {
		<-s.rpDone
	}
	if s.sink != nil {
		_ = s.sink.close()
	}
	if err == nil {
		m.result = Result{State: s.final, Stats: s.stats}
		m.log.Info("migration completed", "downtime", s.stats.Downtime, "total", s.stats.TotalTime)
		return
	}
	ctx := context.Background()
	if s.stats.ThrottlePercent > 0 {
		if t, ok := m.g.(guest.Throttler); ok {
			t.Throttle(0) // QEMU stops throttling when the migration ends
		}
	}
	if s.pc != nil && s.pc.committed {
		s.endPostcopy(err) // postcopy.go: the guest runs on the destination
		return
	}
	if s.committed && !destinationAborted(err) {
		// The destination may run the guest: never run it here as well.
		s.endUnknown(err)
		return
	}
	if s.stopped {
		if rerr := m.g.Start(); rerr != nil {
			m.log.Error("restart the source guest", "err", rerr)
		}
		_, _ = m.c.Fire(ctx, spec.Guest, machine.TriggerRestart, nil)
	}
	cancelled := errors.Is(context.Cause(m.ioCtx), ErrCancelled)
	s.publish(true) // before the side turns terminal (see switchover)
	// From cancelling the spec ignores fail; otherwise fail leads to
	// failing (from committed too: the destination aborted). Either way
	// cleanup ends the run.
	if _, ferr := m.c.Fire(ctx, spec.Outgoing, machine.TriggerFail, &machine.Args{Reason: err.Error()}); ferr != nil {
		m.log.Error("fire fail", "err", ferr)
	}
	out, cerr := m.c.Fire(ctx, spec.Outgoing, machine.TriggerCleanup, nil)
	if cerr != nil {
		m.log.Error("fire cleanup", "err", cerr)
	}
	if cancelled && !errors.Is(err, ErrCancelled) {
		err = fmt.Errorf("%w: %v", ErrCancelled, err)
	}
	m.result = Result{State: out.To, Stats: s.stats, Err: err}
	m.log.Info("migration ended", "state", out.To, "err", err)
}

// handshake builds what the source announces: every must-match capability
// and parameter, the page size, the guest's identity and RAM layout.
func handshake(s *spec.Spec, cfg guards.Config, g guest.Guest, pageSize uint64) *stream.Handshake {
	h := &stream.Handshake{
		Protocol:     stream.HandshakeProtocol,
		Side:         stream.SideSource,
		Capabilities: map[string]bool{},
		Parameters:   map[string]string{},
		PageSize:     pageSize,
		GuestID:      g.ID(),
		RAMBlocks:    map[string]uint64{},
	}
	for _, c := range s.Capabilities {
		if c.MustMatchPeer {
			h.Capabilities[c.Name] = cfg.Caps[c.Name]
		}
	}
	for _, p := range s.Parameters {
		if p.MustMatchPeer {
			h.Parameters[p.Name] = cfg.Params[p.Name]
		}
	}
	for _, b := range g.Blocks() {
		h.RAMBlocks[b.Name] = uint64(len(b.Mem))
	}
	// validate-uuid is the source's: it decides whether the guest's UUID
	// (when it has one) is sent; the destination compares what arrives.
	if u, ok := guest.UUIDOf(g); ok && cfg.Caps["validate-uuid"] {
		h.UUID = u.String()
	}
	return h
}

// moved returns the bytes sent so far on every channel.
func (s *sender) moved() uint64 {
	n := s.enc.Stats().Bytes
	if s.sink != nil {
		n += s.sink.sent()
	}
	return n
}

// stopForSwitchover stops the source's guest for the switchover (precopy's
// stop-and-copy or the switch to postcopy) and returns when it stopped.
// The guest graph goes running → finish-migrate when the guest runs; a
// guest the operator paused stays paused (and is not restarted on
// failure). Stop is idempotent, so it is called either way.
func (s *sender) stopForSwitchover() (time.Time, error) {
	m := s.m
	gout, _ := m.c.Fire(m.ioCtx, spec.Guest, machine.TriggerSwitchover, nil)
	s.stopped = gout.Moved
	if err := m.g.Stop(); err != nil {
		return time.Time{}, fmt.Errorf("stop the guest: %w", err)
	}
	tStop := time.Now()
	s.stopStamp = host.Now()
	return tStop, nil
}
