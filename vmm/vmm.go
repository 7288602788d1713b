// Package vmm hosts one guest behind a migration controller, as a VMM
// process (QEMU) does: it starts outgoing migrations with package engine
// and incoming ones with package loaders, watches them, and stops and
// resumes the guest for the operator.
//
// vmm decides nothing itself. Whether a migration may start, whether one
// can be cancelled, whether the guest may run now: each is a trigger fired
// on the controller, judged by the spec's edges and rules ("Guest is
// waiting for an incoming migration", "Postcopy migration in progress,
// cannot cancel." and the like are rules and edges of transitions.yaml).
// vmm carries out what the controller allowed.
//
// The QMP server (package qmp) drives a VMM through its small Host
// interface; an embedder can drive one directly.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// Options tune a VMM. The zero value is usable.
type Options struct {
	// Engine and Loader are handed to engine.Start and loaders.Listen
	// (their Channels are set per migration).
	Engine engine.Options
	Loader loaders.Options
	// Exit is called (once, from a goroutine of the VMM) when an incoming
	// migration started with exit-on-error fails; migctl serve exits with
	// status 1. Nil ignores exit-on-error.
	Exit func(error)
	// Logger receives one line per migration outcome (default: discard).
	Logger *slog.Logger
}

// VMM runs the migrations of one guest. Its methods are safe to call from
// several goroutines at once (the QMP server calls them from one goroutine
// per client).
type VMM struct {
	c    *machine.Controller
	g    guest.Guest
	opts Options
	log  *slog.Logger

	// mu guards the fields below. It is held only to read or swap them,
	// never while waiting for a migration.
	mu       sync.Mutex
	out      *engine.Migration // the latest outgoing run
	in       *loaders.Incoming // the latest incoming run
	closed   bool
	exitOnce sync.Once
	wg       sync.WaitGroup // watcher goroutines
}

// New returns a VMM for g driven through c. The caller keeps ownership of
// c and g and closes them after the VMM's Close. Build c with
// machine.Options.Incoming for a process that waits for an incoming
// migration (QEMU's -incoming), and start g first otherwise.
func New(c *machine.Controller, g guest.Guest, opts Options) *VMM {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &VMM{c: c, g: g, opts: opts, log: opts.Logger}
}

// ErrClosed is returned by a VMM after Close.
var ErrClosed = errors.New("migctl is shutting down")

// Controller returns the controller the VMM drives.
func (v *VMM) Controller() *machine.Controller { return v.c }

// Migrate starts an outgoing migration to uri (QMP migrate); channels lists
// the channel types given with it (QMP's channels argument; empty for a
// plain uri). It returns once the migration is started or refused; the
// refusal is the controller's. A new run may start as soon as the previous
// one reached a terminal state: a run publishes nothing after that.
func (v *VMM) Migrate(ctx context.Context, uri string, channels []string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return ErrClosed
	}
	opts := v.opts.Engine
	opts.Channels = channels
	m, err := engine.Start(ctx, v.c, v.g, uri, opts)
	if err != nil {
		return err
	}
	v.out = m
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		<-m.Done()
		r, _ := m.Wait(context.Background())
		v.log.Info("outgoing migration ended", "uri", uri, "state", r.State, "err", r.Err)
	}()
	return nil
}

// Incoming starts listening for an incoming migration on uri (QMP
// migrate-incoming; channels as for Migrate). With exitOnError, a failed
// incoming migration ends the process (Options.Exit), as QEMU's
// exit-on-error does; a cancelled one does not.
func (v *VMM) Incoming(ctx context.Context, uri string, channels []string, exitOnError bool) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return ErrClosed
	}
	opts := v.opts.Loader
	opts.Channels = channels
	in, err := loaders.Listen(ctx, v.c, v.g, uri, opts)
	if err != nil {
		return err
	}
	v.in = in
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		<-in.Done()
		r, _ := in.Wait(context.Background())
		v.log.Info("incoming migration ended", "uri", uri, "state", r.State, "err", r.Err)
		// A cancelled migration does not end the process, nor one whose
		// outcome is unknown: the loaded guest waits for the operator.
		if r.Err != nil && !errors.Is(r.Err, loaders.ErrCancelled) && !errors.Is(r.Err, loaders.ErrOutcomeUnknown) && exitOnError && v.opts.Exit != nil {
			v.exitOnce.Do(func() { v.opts.Exit(fmt.Errorf("incoming migration failed: %w", r.Err)) })
		}
	}()
	return nil
}

// Reattach makes this process take over the postcopy migration of a
// guest process whose migctl died (`migctl serve --destination --reattach`;
// loaders.Reattach): the incoming side goes from none to postcopy-paused,
// and QMP migrate-recover plus the source's migrate resume=true finish the
// migration as after a cut link. A failure of the run ends the process
// (Options.Exit), as exit-on-error does.
func (v *VMM) Reattach(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return ErrClosed
	}
	in, err := loaders.Reattach(ctx, v.c, v.g, v.opts.Loader)
	if err != nil {
		return err
	}
	v.in = in
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		<-in.Done()
		r, _ := in.Wait(context.Background())
		v.log.Info("reattached incoming migration ended", "state", r.State, "err", r.Err)
		if r.Err != nil && v.opts.Exit != nil {
			v.exitOnce.Do(func() { v.opts.Exit(fmt.Errorf("reattached incoming migration failed: %w", r.Err)) })
		}
	}()
	return nil
}

// Cancel is QMP migrate_cancel: it fires cancel on the outgoing side and,
// as a migctl extension, on the incoming side; each side's edges decide
// (harmless where nothing runs, refused in postcopy, and on the incoming
// side accepted until its guest runs).
func (v *VMM) Cancel(ctx context.Context) error {
	v.mu.Lock()
	m, in := v.out, v.in
	v.mu.Unlock()
	var err error
	if m != nil {
		err = m.Cancel(ctx)
	} else {
		_, err = v.c.Fire(ctx, spec.Outgoing, machine.TriggerCancel, nil)
	}
	if err != nil {
		return err
	}
	if in != nil {
		return in.Cancel(ctx, "cancelled by migrate_cancel")
	}
	return nil
}

// Continue is QMP migrate-continue: status is the QMP status the client
// expects the outgoing side to be in (e.g. pre-switchover).
func (v *VMM) Continue(ctx context.Context, status string) error {
	st, err := v.c.Status(spec.Outgoing, 0)
	if err != nil {
		return err
	}
	if st.QMPStatus != status {
		return fmt.Errorf("Migration not in expected state: %s", st.QMPStatus)
	}
	v.mu.Lock()
	m := v.out
	v.mu.Unlock()
	if m == nil {
		return fmt.Errorf("Migration not in expected state: %s", st.QMPStatus)
	}
	return m.Continue(ctx)
}

// Stop is QMP stop: the guest graph decides (running → paused; waiting for
// an incoming migration → stay paused when it arrives) and the guest stops
// when it was running.
func (v *VMM) Stop(ctx context.Context) error {
	out, err := v.c.Fire(ctx, spec.Guest, machine.TriggerStop, nil)
	if err != nil {
		return err
	}
	if out.Moved && out.From == machine.GuestRunning {
		return v.g.Stop()
	}
	return nil
}

// Cont is QMP cont: the guest graph decides (paused, postmigrate or never
// started → running; waiting for an incoming migration → start when it
// arrives; refused during a switchover) and the guest starts when the
// graph says it runs.
func (v *VMM) Cont(ctx context.Context) error {
	out, err := v.c.Fire(ctx, spec.Guest, machine.TriggerCont, nil)
	if err != nil {
		return err
	}
	if out.Moved && out.To == machine.GuestRunning {
		return v.g.Start()
	}
	return nil
}

// VerifyGuest checks every page of the stopped guest against what it
// must hold (QMP x-migctl-verify-guest), for guests that can (the
// built-in guest's Verify); it fails for a running guest.
func (v *VMM) VerifyGuest(ctx context.Context) error {
	vg, ok := v.g.(interface{ Verify() error })
	if !ok {
		return errors.New("this guest cannot verify its memory")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return vg.Verify()
}

// Resolve is x-migctl-resolve-switchover: side is spec.Outgoing (peerGone:
// the destination will never run the guest) or spec.Incoming (peerGone:
// the source will never run it). The side must be in its unknown-outcome
// state; otherwise the controller's refusal is returned.
func (v *VMM) Resolve(ctx context.Context, side string, peerGone bool) error {
	st, err := v.c.Status(side, 0)
	if err != nil {
		return err
	}
	if sd := v.c.Spec().Side(side); sd == nil || sd.State(string(st.State)) == nil || sd.State(string(st.State)).Outcome != spec.OutcomeUnknown {
		return fmt.Errorf("there is no switchover to resolve: the %s migration is %s, and only one whose outcome is unknown (x-migctl-unknown-outcome) can be resolved", side, st.QMPStatus)
	}
	v.mu.Lock()
	m, in := v.out, v.in
	v.mu.Unlock()
	switch {
	case side == spec.Outgoing && m != nil:
		return m.Resolve(ctx, peerGone)
	case side == spec.Incoming && in != nil:
		return in.Resolve(ctx, peerGone)
	}
	return fmt.Errorf("there is no switchover to resolve: no %s migration ran in this process", side)
}

// Yank aborts the channels of the migrations running on either side (QMP
// yank of the migration instance).
func (v *VMM) Yank(context.Context) error {
	v.mu.Lock()
	m, in := v.out, v.in
	v.mu.Unlock()
	if m != nil {
		m.Yank()
	}
	if in != nil {
		in.Yank()
	}
	return nil
}

// Close cancels any migration still running (a source guest keeps
// running; a destination still loading fails) and waits for their
// goroutines. Later calls to Migrate and Incoming fail with ErrClosed.
func (v *VMM) Close() error {
	v.mu.Lock()
	v.closed = true
	m, in := v.out, v.in
	v.mu.Unlock()
	if m != nil {
		select {
		case <-m.Done():
		default:
			if err := m.Cancel(context.Background()); err != nil {
				// Postcopy refuses a cancel: the guest runs on the
				// destination; end this process's part of it.
				m.Abort("migctl is shutting down")
			}
		}
	}
	if in != nil {
		in.Abort("migctl is shutting down")
	}
	v.wg.Wait()
	return nil
}

// StartPostcopy is QMP migrate-start-postcopy, with QEMU's checks: the
// capability postcopy-ram must be on, and a migration must have started.
// As in QEMU, a migration that has moved on from precopy ignores it.
func (v *VMM) StartPostcopy(context.Context) error {
	cfg, ok := v.c.Frozen(spec.Outgoing)
	if !ok {
		cfg = v.c.Config()
	}
	if !cfg.Caps["postcopy-ram"] {
		return errors.New("Enable postcopy with migrate_set_capability before the start of migration")
	}
	v.mu.Lock()
	m := v.out
	v.mu.Unlock()
	st, err := v.c.Status(spec.Outgoing, 0)
	if err != nil {
		return err
	}
	if m == nil || st.Initial {
		return errors.New("Postcopy must be started after migration has been started")
	}
	m.StartPostcopy()
	return nil
}

// Pause is QMP migrate-pause: as QEMU's qmp_migrate_pause, the outgoing
// migration's channel if its postcopy is alive, else the incoming one's.
func (v *VMM) Pause(context.Context) error {
	v.mu.Lock()
	m, in := v.out, v.in
	v.mu.Unlock()
	if m != nil && m.Pause() == nil {
		return nil
	}
	if in != nil && in.Pause(context.Background()) == nil {
		return nil
	}
	return engine.ErrNotPausable
}

// Recover is QMP migrate-recover: the destination whose postcopy is
// paused listens on uri for the source's new channel.
func (v *VMM) Recover(ctx context.Context, uri string) error {
	v.mu.Lock()
	in := v.in
	v.mu.Unlock()
	if in == nil {
		return errNotRecoverable
	}
	err := in.Recover(ctx, uri)
	var np *machine.NotPermittedError
	if errors.As(err, &np) {
		return errNotRecoverable
	}
	return err
}

// errNotRecoverable is migrate-recover's refusal, in QEMU's words.
var errNotRecoverable = errors.New("Migrate recover can only be run when postcopy is paused.")

// Resume is QMP migrate with resume=true: the source whose postcopy is
// paused reconnects to uri.
func (v *VMM) Resume(ctx context.Context, uri string, channels []string) error {
	v.mu.Lock()
	m := v.out
	v.mu.Unlock()
	if m == nil {
		return errNoPaused
	}
	err := m.Resume(ctx, uri, channels)
	var np *machine.NotPermittedError
	if errors.As(err, &np) {
		return errNoPaused
	}
	return err
}

// errNoPaused is migrate resume=true's refusal, in QEMU's words.
var errNoPaused = errors.New("Cannot resume if there is no paused migration")
