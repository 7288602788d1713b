package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// The switchover commit protocol, source side (docs/stream.md,
// "Switchover commit"; the destination's half is in package loaders).
//
// Before the commit point the source may always restart its own guest: a
// failure, a cancel, a stall or a cut ends the migration failed (or
// cancelled) with the guest running here, and the destination never runs
// it (it has not received go, and is told ABORT when it can be reached).
// The commit point is the outgoing side's commit trigger: fired when the
// destination reported LOADED (or, on a one-way transport, when the last
// byte is durable), before go is sent. From there the source never
// restarts its guest on its own: the destination's SHUT(0) completes the
// migration; its failure report (SHUT non-zero: it will never run the
// guest) fails it and the guest runs here again; anything else — a cut, a
// stall, a yank — leaves the outcome unknown (state unknown-outcome, the
// guest stopped here) until an operator resolves it.

// What the source knows of its destination's protocol (sender.proto).
const (
	peerUnknown int32 = iota // neither HELLO nor PONG(1) arrived yet
	peerSpeaks               // HELLO listed the commit protocol
	peerLacks                // PONG(1) came first: a destination without it
)

// ErrOutcomeUnknown is wrapped by the error of a migration that ended in
// the unknown-outcome state: the channel broke after the source committed
// and before the destination confirmed. The guest stays stopped here until
// Migration.Resolve.
var ErrOutcomeUnknown = errors.New("the switchover's outcome is unknown")

// ErrYanked is the cause recorded when the migration's channels are
// yanked (QMP yank): the migration fails, or its outcome becomes unknown
// after the commit.
var ErrYanked = errors.New("the migration channels were yanked")

// StallError is the cause recorded when the peer was silent longer than
// x-migctl-io-timeout.
type StallError struct {
	Silent  time.Duration // how long nothing arrived
	Timeout time.Duration // x-migctl-io-timeout
	OneWay  bool          // a one-way transport: nothing could be written
}

func (e *StallError) Error() string {
	if e.OneWay {
		return fmt.Sprintf("the channel accepted nothing for %v (x-migctl-io-timeout is %v): the reader is stalled or gone",
			e.Silent.Round(time.Millisecond), e.Timeout)
	}
	return fmt.Sprintf("the destination sent nothing for %v (x-migctl-io-timeout is %v): it is stalled or gone",
		e.Silent.Round(time.Millisecond), e.Timeout)
}

// feedingConn feeds the watchdog whenever a write makes progress, for
// peers whose liveness shows only that way: a one-way transport, or a
// destination without the commit protocol's keepalives.
type feedingConn struct {
	transport.Conn
	s *sender
}

func (c *feedingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 && c.s.proto.Load() != peerSpeaks {
		c.s.dog.Feed()
	}
	return n, err
}

// startWatch starts the watchdog goroutine for this run.
func (s *sender) startWatch() {
	m := s.m
	ctx, cancel := context.WithCancel(m.ioCtx)
	s.stopDog = cancel
	s.dogDone = make(chan struct{})
	go func() {
		defer close(s.dogDone)
		s.dog.Run(ctx, watchdog.Watch{
			Limits: func() watchdog.Limits {
				return watchdog.Limits{
					Keepalive: s.liveDuration(paramKeepalive, time.Second),
					Timeout:   s.liveDuration(paramIOTimeout, 30*time.Second),
				}
			},
			Stalled: func(since time.Time) { _ = m.c.PublishStalled(spec.Outgoing, since) },
			Timeout: func(silent time.Duration) {
				m.cancelIO(&StallError{Silent: silent, Timeout: s.liveDuration(paramIOTimeout, 30*time.Second), OneWay: s.rp == nil})
			},
		})
	}()
}

// stopWatch ends the watchdog goroutine and waits for it, so that nothing
// of this run reports a stall once the side is terminal.
func (s *sender) stopWatch() {
	if s.stopDog != nil {
		s.stopDog()
		<-s.dogDone
		_ = s.m.c.PublishStalled(spec.Outgoing, time.Time{})
	}
}

// Live parameters of the liveness protocol (spec: migctl's extensions).
const (
	paramKeepalive = "x-migctl-keepalive"
	paramIOTimeout = "x-migctl-io-timeout"
)

// keepalive sends a PING on the main stream when a keepalive interval has
// passed since the last one; the destination answers PONG. Called between
// sections and while the source waits for migrate-continue or the
// switchover ack.
func (s *sender) keepalive() error {
	if s.rp == nil {
		return nil
	}
	if time.Since(s.lastPing) < s.liveDuration(paramKeepalive, time.Second) {
		return nil
	}
	s.lastPing = time.Now()
	s.pingSeq++
	if err := s.enc.Ping(s.pingSeq); err != nil {
		return err
	}
	return s.enc.Flush()
}

// setProto records what the destination speaks; the first answer wins
// (HELLO precedes the PONG of the first PING from a destination that
// speaks the protocol).
func (s *sender) setProto(v int32) {
	s.protoOnce.Do(func() {
		s.proto.Store(v)
		close(s.protoKnown)
	})
}

// awaitProto waits until the source knows whether the destination speaks
// the commit protocol (long known in practice: the answer follows the
// destination's first records).
func (s *sender) awaitProto() error {
	for {
		select {
		case <-s.protoKnown:
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

// awaitLoaded waits for LOADED, sending a keepalive frame every keepalive
// interval. A failure reported by the destination, a broken channel or a
// stall is an error: the source has not committed.
func (s *sender) awaitLoaded() error {
	t := time.NewTicker(s.liveDuration(paramKeepalive, time.Second))
	defer t.Stop()
	for {
		select {
		case ev, ok := <-s.rp:
			if !ok {
				return errors.New("the destination closed the connection before it loaded everything")
			}
			if ev.err != nil {
				return ev.err
			}
			switch ev.msg.Type {
			case stream.RPLoaded:
				return nil
			case stream.RPShut:
				if v, _ := ev.msg.Value(); v == 0 {
					return &failure{reason: "the destination broke the commit protocol: it confirmed before it was told to run the guest"}
				}
			}
			if _, err := s.onRP(ev, true); err != nil {
				return err
			}
		case <-t.C:
			if err := s.enc.WriteTrailer(stream.TrailerKeepalive); err != nil {
				return err
			}
		case <-s.m.ioCtx.Done():
			return context.Cause(s.m.ioCtx)
		}
	}
}

// commit fires the commit trigger: from its success on, the source never
// restarts its guest on its own. A refusal (a cancel won the race) leaves
// the source uncommitted.
func (s *sender) commit() error {
	if _, err := s.m.c.Fire(s.m.ioCtx, spec.Outgoing, machine.TriggerCommit, nil); err != nil {
		if s.rp == nil {
			// A cancel won the race with the durable end of a one-way
			// save: the file holds a complete save, and the guest runs
			// here again, as after cont from postmigrate.
			return fmt.Errorf("the save to %s became durable, but the migration was cancelled before it committed: "+
				"the file holds a complete save and the guest runs here again: %w", s.m.addr, err)
		}
		return fmt.Errorf("commit the switchover: %w", err)
	}
	s.committed = true
	return nil
}

// commitOneWay finishes a one-way channel durably (transport.Committer:
// file: fsync and rename, exec: the command exited 0) or, for a channel
// without that notion, closes it and reports the close's error.
//
// The wait is bounded by Options.ConfirmTimeout when set, else by
// x-migctl-io-timeout (a file whose fsync takes longer, a command that
// closed its input but does not exit, is a stalled peer). A cancel during
// the wait aborts the stream (the temporary file is removed, the command
// killed) and the guest runs here again.
func (s *sender) commitOneWay() error {
	c, ok := s.raw.(transport.Committer)
	if !ok {
		return s.conn.Close()
	}
	resume := s.dog.Pause() // the bound below replaces the watchdog
	defer resume()
	ctx := s.m.ioCtx
	limit, what := s.m.opts.ConfirmTimeout, "engine.Options.ConfirmTimeout"
	if limit <= 0 {
		limit, what = s.liveDuration(paramIOTimeout, 30*time.Second), paramIOTimeout
	}
	if limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, limit, fmt.Errorf("the stream was not durable within %v (%s)", limit, what))
		defer cancel()
	}
	return c.Commit(ctx)
}

// abortGrace bounds the best-effort ABORT frame of a failing source.
const abortGrace = time.Second

// sendAbort tells a destination that may be waiting for go that it never
// will get it, so it discards what it loaded at once rather than wait for
// an operator. Best effort: the channel may be gone.
func (s *sender) sendAbort() {
	if s.committed || !s.eofSent || s.proto.Load() != peerSpeaks {
		return
	}
	s.ioMu.Lock()
	s.farewell = true
	s.ioMu.Unlock()
	_ = s.conn.SetDeadline(time.Now().Add(abortGrace))
	_, _ = s.conn.Write(stream.AppendTrailer(nil, stream.TrailerAbort))
}

// interrupt unblocks the run's I/O on the main channel when the migration
// is cancelled, stalls or is yanked: a past deadline ends a blocked read or
// write at once and keeps the channel open for ABORT; a channel that has
// no deadlines is closed.
func (s *sender) interrupt() {
	s.ioMu.Lock()
	defer s.ioMu.Unlock()
	if s.farewell {
		return
	}
	if err := s.conn.SetDeadline(time.Unix(1, 0)); err != nil {
		s.conn.Close()
	}
}

// destinationAborted decides what a failure after the commit means: the
// destination's own failure report (it will never run the guest) lets the
// source resume; anything else leaves the outcome unknown.
func destinationAborted(err error) bool {
	var f *failure
	return mutant.ResumeAfterCommit || errors.As(err, &f) && f.aborted
}

// endUnknown moves the side to unknown-outcome and records the result.
// The guest stays stopped until Resolve.
func (s *sender) endUnknown(err error) {
	m := s.m
	reason := fmt.Sprintf("%v: %v; the guest is stopped here. If the destination runs it, resolve with "+
		"x-migctl-resolve-switchover destination-gone=false; if it never will, with destination-gone=true (the guest resumes here)",
		ErrOutcomeUnknown, err)
	s.publish(true)
	out, ferr := m.c.Fire(context.Background(), spec.Outgoing, machine.TriggerLost, &machine.Args{Reason: reason})
	if ferr != nil {
		m.log.Error("fire lost", "err", ferr)
	}
	m.result = Result{State: out.To, Stats: s.stats, Err: fmt.Errorf("%w: %v", ErrOutcomeUnknown, err)}
	m.log.Error("switchover outcome unknown", "err", err)
}

// Resolve ends a migration whose outcome is unknown with the operator's
// word (QMP x-migctl-resolve-switchover): destinationGone true says the
// destination will never run the guest, so it runs here again and the
// migration fails; false says the destination runs it, so the migration
// completed and the guest stays stopped here (postmigrate). It waits for
// the migration goroutine to end (bounded by ctx) and returns the
// controller's refusal when the side is not in the unknown-outcome state.
func (m *Migration) Resolve(ctx context.Context, destinationGone bool) error {
	select {
	case <-m.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	m.resolveMu.Lock()
	defer m.resolveMu.Unlock()
	bg := context.Background()
	if !destinationGone {
		if _, err := m.c.Fire(ctx, spec.Outgoing, machine.TriggerResolveRunning, &machine.Args{Reason: "resolved: the destination runs the guest"}); err != nil {
			return err
		}
		_, _ = m.c.Fire(bg, spec.Guest, machine.TriggerMigrated, nil)
		return nil
	}
	if _, err := m.c.Fire(ctx, spec.Outgoing, machine.TriggerResolveGone, &machine.Args{Reason: "resolved: the destination will never run the guest; it runs here again"}); err != nil {
		return err
	}
	if m.stopped {
		if err := m.g.Start(); err != nil {
			m.log.Error("restart the source guest", "err", err)
		}
		_, _ = m.c.Fire(bg, spec.Guest, machine.TriggerRestart, nil)
	}
	if _, err := m.c.Fire(bg, spec.Outgoing, machine.TriggerCleanup, nil); err != nil {
		m.log.Error("fire cleanup", "err", err)
	}
	return nil
}

// Yank aborts the migration's channels at once, as QEMU's yank does for
// its migration instance: before the commit the migration fails and the
// guest runs here again; after it the outcome is unknown.
func (m *Migration) Yank() { m.cancelIO(ErrYanked) }
