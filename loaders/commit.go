package loaders

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
)

// The switchover commit protocol, destination side (docs/stream.md,
// "Switchover commit"; the source's half is in package engine).
//
// With a source that announced the protocol and opened the return path,
// the destination answers HELLO, sends a keepalive every
// x-migctl-keepalive, and after the EOF marker and vmdesc fires loaded,
// sends LOADED and waits for the source's word: GO lets the guest run here
// (complete, then arrive); ABORT, a cancel, or any failure it reports
// (reason and SHUT(1)) means it never will; a cut, a corrupt frame or a
// silence longer than x-migctl-io-timeout leaves the outcome unknown (the
// source may have committed): the side waits in unknown-outcome, the guest
// not started, until an operator resolves it (Incoming.Resolve).

// ErrOutcomeUnknown is wrapped by the error of an incoming migration that
// ended in the unknown-outcome state: the channel broke after LOADED and
// before the source's go. The guest has not started; Incoming.Resolve
// decides.
var ErrOutcomeUnknown = errors.New("the switchover's outcome is unknown")

// ErrAborted is the failure of an incoming migration whose source gave up
// before it committed (it sent ABORT): what was loaded is discarded.
var ErrAborted = errors.New("the source aborted the switchover before it committed; what was loaded is discarded")

// ErrYanked is the cause recorded when the migration's channels are
// yanked (QMP yank).
var ErrYanked = errors.New("the migration channels were yanked")

// StallError is the cause recorded when the source was silent longer than
// x-migctl-io-timeout.
type StallError struct {
	Silent  time.Duration // how long nothing arrived
	Timeout time.Duration // x-migctl-io-timeout
}

func (e *StallError) Error() string {
	return fmt.Sprintf("the source sent nothing for %v (x-migctl-io-timeout is %v): it is stalled or gone",
		e.Silent.Round(time.Millisecond), e.Timeout)
}

// lostError is a failure while the destination waits for go: whether the
// source committed is unknown.
type lostError struct{ err error }

func (e *lostError) Error() string { return "waiting for the source's go: " + e.err.Error() }
func (e *lostError) Unwrap() error { return e.err }

// Live parameters of the liveness protocol (spec: migctl's extensions).
const (
	paramKeepalive = "x-migctl-keepalive"
	paramIOTimeout = "x-migctl-io-timeout"
)

func (l *loader) liveDuration(name string, def time.Duration) time.Duration {
	v := l.in.c.Param(name)
	if v == "" {
		return def
	}
	var ms uint64
	if _, err := fmt.Sscan(v, &ms); err != nil {
		return def
	}
	return time.Duration(ms) * time.Millisecond
}

// startWatch starts the watchdog goroutine: the source must keep the
// stream moving (every record, multifd packet and keepalive feeds it).
func (l *loader) startWatch() {
	in := l.in
	ctx, cancel := context.WithCancel(in.ioCtx)
	l.stopDog = cancel
	l.dogDone = make(chan struct{})
	go func() {
		defer close(l.dogDone)
		l.dog.Run(ctx, watchdog.Watch{
			Limits: func() watchdog.Limits {
				return watchdog.Limits{
					Keepalive: l.liveDuration(paramKeepalive, time.Second),
					Timeout:   l.liveDuration(paramIOTimeout, 30*time.Second),
				}
			},
			Stalled: func(since time.Time) { _ = in.c.PublishStalled(spec.Incoming, since) },
			Timeout: func(silent time.Duration) {
				in.cancelIO(&StallError{Silent: silent, Timeout: l.liveDuration(paramIOTimeout, 30*time.Second)})
			},
		})
	}()
}

func (l *loader) stopWatch() {
	if l.stopDog != nil {
		l.stopDog()
		<-l.dogDone
		_ = l.in.c.PublishStalled(spec.Incoming, time.Time{})
	}
}

// speakCommit answers a source that announced the commit protocol and
// opened the return path: HELLO, then a keepalive every interval until the
// run ends.
func (l *loader) speakCommit() error {
	if err := l.sendRP(stream.NewHello(stream.ExtSwitchoverCommit)); err != nil {
		return err
	}
	l.proto = true
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			t := time.NewTimer(l.liveDuration(paramKeepalive, time.Second))
			select {
			case <-t.C:
			case <-l.in.ioCtx.Done():
				t.Stop()
				return
			}
			if err := l.sendRP(stream.RPMessage{Type: stream.RPKeepalive}); err != nil {
				return // the run's own I/O reports the broken channel
			}
		}
	}()
	return nil
}

// awaitGo fires loaded, reports LOADED and waits for the source's frame
// after the vmdesc: nil for GO, ErrAborted for ABORT, a *lostError when
// the channel broke, a frame was corrupt or the source went silent.
func (l *loader) awaitGo(dec *stream.Decoder) error {
	in := l.in
	if _, err := in.c.Fire(in.ioCtx, spec.Incoming, machine.TriggerLoaded, nil); err != nil {
		return err
	}
	l.waitingGo = true
	if err := l.sendRP(stream.RPMessage{Type: stream.RPLoaded}); err != nil {
		return &lostError{err}
	}
	for {
		t, err := dec.NextTrailer()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("the source closed the channel without a word")
			}
			return &lostError{err}
		}
		l.dog.Feed()
		switch t {
		case stream.TrailerGo:
			l.waitingGo = false
			return nil
		case stream.TrailerAbort:
			return ErrAborted
		}
	}
}

// endUnknown moves the side to unknown-outcome: nothing is said to the
// source (a failure report would promise the guest never runs here, which
// only the operator may decide now).
func (l *loader) endUnknown(err error) {
	in := l.in
	reason := fmt.Sprintf("%v: %v; the guest has not started here. If the source will never run it, resolve with "+
		"x-migctl-resolve-switchover source-gone=true (it starts here); if the source runs it, with source-gone=false (what was loaded is discarded)",
		ErrOutcomeUnknown, err)
	out, ferr := in.c.Fire(context.Background(), spec.Incoming, machine.TriggerLost, &machine.Args{Reason: reason})
	if ferr != nil {
		in.log.Error("fire lost", "err", ferr)
	}
	l.final = out.To
	in.log.Error("switchover outcome unknown", "err", err)
}

// Resolve ends an incoming migration whose outcome is unknown with the
// operator's word (QMP x-migctl-resolve-switchover): sourceGone true says
// the source will never run the guest, so the migration completes here
// and the guest starts (unless it was told to stay paused); false says the
// source runs it, so what was loaded is discarded and the migration
// fails. It waits for the loader goroutine to end (bounded by ctx) and
// returns the controller's refusal when the side is not in the
// unknown-outcome state.
func (in *Incoming) Resolve(ctx context.Context, sourceGone bool) error {
	select {
	case <-in.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	in.resolveMu.Lock()
	defer in.resolveMu.Unlock()
	if !sourceGone {
		_, err := in.c.Fire(ctx, spec.Incoming, machine.TriggerResolveDiscard, &machine.Args{Reason: "resolved: the source runs the guest; what was loaded here is discarded"})
		return err
	}
	if _, err := in.c.Fire(ctx, spec.Incoming, machine.TriggerResolveStart, &machine.Args{Reason: "resolved: the source will never run the guest; it starts here"}); err != nil {
		return err
	}
	arrived, err := in.c.Fire(context.Background(), spec.Guest, machine.TriggerArrive, nil)
	if err != nil {
		in.log.Error("the guest graph refused arrive", "err", err)
	}
	if arrived.To == machine.GuestRunning {
		if err := in.g.Start(); err != nil {
			return fmt.Errorf("start the guest: %w", err)
		}
	}
	return nil
}

// Yank aborts the migration's channels at once, as QEMU's yank does for
// its migration instance.
func (in *Incoming) Yank() { in.cancelIO(ErrYanked) }
