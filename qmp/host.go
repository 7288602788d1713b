package qmp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// Host owns the guest and runs the migrations the server's commands ask
// for. The server validates arguments first and calls a Host method only
// for a well-formed request; the Host (through the controller's guards)
// decides whether it may happen now. Methods are called from several
// client goroutines at once and must be safe for that.
type Host interface {
	// Migrate starts an outgoing migration to uri (QMP migrate). It
	// returns once the migration is started or refused.
	Migrate(ctx context.Context, uri string) error
	// Incoming starts listening for an incoming migration on uri (QMP
	// migrate-incoming). With exitOnError, a failed incoming migration
	// ends the process, as QEMU's exit-on-error does.
	Incoming(ctx context.Context, uri string, exitOnError bool) error
	// Cancel is QMP migrate_cancel: it cancels the outgoing migration (or
	// a destination still waiting for its source), is harmless when
	// nothing runs, and refuses during postcopy.
	Cancel(ctx context.Context) error
	// Continue is QMP migrate-continue: the outgoing migration must be in
	// state (QEMU's MigrationStatus name) and paused there.
	Continue(ctx context.Context, state string) error
	// RunState reports the guest's run state (QMP query-status).
	RunState() RunState
}

// RunState is query-status's result.
type RunState struct {
	// Status is running, paused, finish-migrate (stopped for the
	// switchover), postmigrate (the guest migrated away) or inmigrate
	// (waiting for an incoming migration), as QEMU's RunState names them.
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

// HostOptions tune a GuestHost. The zero value is usable.
type HostOptions struct {
	// Destination: the guest is empty and waits for an incoming migration
	// (QEMU's -incoming defer). migrate is refused until one completed;
	// without it, migrate-incoming is refused.
	Destination bool
	// Engine and Loader are handed to engine.Start and loaders.Listen.
	Engine engine.Options
	Loader loaders.Options
	// Exit is called (once, from a goroutine of the host) when an
	// incoming migration started with exit-on-error fails; migctl serve
	// exits with status 1. Nil ignores exit-on-error.
	Exit func(error)
	// Logger receives one line per migration outcome (default: discard).
	Logger *slog.Logger
}

// GuestHost is the Host migctl serve uses: one guest, migrated out with
// package engine or in with package loaders, one migration at a time per
// direction (the controller's guards enforce it).
type GuestHost struct {
	c    *machine.Controller
	g    guest.Guest
	opts HostOptions
	log  *slog.Logger

	// mu guards the fields below. It is never held while calling into the
	// controller in a way that waits for I/O (engine.Start and
	// loaders.Listen only fire triggers and open a listener).
	mu       sync.Mutex
	out      *engine.Migration
	in       *loaders.Incoming
	closed   bool
	exitOnce sync.Once
	wg       sync.WaitGroup // watcher goroutines
}

var _ Host = (*GuestHost)(nil)

// NewGuestHost returns a host for g driven through c. The caller keeps
// ownership of c and g and closes them after the host's Close.
func NewGuestHost(c *machine.Controller, g guest.Guest, opts HostOptions) *GuestHost {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &GuestHost{c: c, g: g, opts: opts, log: opts.Logger}
}

// ErrHostClosed is returned by a GuestHost after Close.
var ErrHostClosed = errors.New("migctl is shutting down")

// Migrate implements Host.
func (h *GuestHost) Migrate(ctx context.Context, uri string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return ErrHostClosed
	}
	if h.opts.Destination {
		if st, _ := h.c.State(spec.Incoming); st != "completed" {
			return fmt.Errorf("Guest is waiting for an incoming migration (this migctl is a destination; its incoming side is in state %s): it can migrate out once an incoming migration completed", st)
		}
	}
	if prev := h.out; prev != nil {
		// A new migration may start only from a terminal state; wait for
		// the previous run to finish its cleanup so that its last
		// statistics cannot overwrite the new run's.
		if st, _ := h.c.Status(spec.Outgoing, 0); st.Terminal {
			select {
			case <-prev.Done():
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	m, err := engine.Start(ctx, h.c, h.g, uri, h.opts.Engine)
	if err != nil {
		return err
	}
	h.out = m
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		r, _ := m.Wait(context.Background())
		h.log.Info("outgoing migration ended", "uri", uri, "state", r.State, "err", r.Err)
	}()
	return nil
}

// Incoming implements Host.
func (h *GuestHost) Incoming(ctx context.Context, uri string, exitOnError bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return ErrHostClosed
	}
	if !h.opts.Destination {
		return errors.New("'-incoming' was not specified on the command line: this migctl serves a running source guest; start `migctl serve --destination` to receive a migration")
	}
	if h.in != nil {
		st, _ := h.c.State(spec.Incoming)
		return fmt.Errorf("The incoming migration has already been started (the incoming side is in state %s; one migrate-incoming per process, as in QEMU)", st)
	}
	in, err := loaders.Listen(ctx, h.c, h.g, uri, h.opts.Loader)
	if err != nil {
		return err
	}
	h.in = in
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		r, _ := in.Wait(context.Background())
		h.log.Info("incoming migration ended", "uri", uri, "state", r.State, "err", r.Err)
		if r.State == "failed" && exitOnError && h.opts.Exit != nil {
			h.exitOnce.Do(func() { h.opts.Exit(fmt.Errorf("incoming migration failed: %w", r.Err)) })
		}
	}()
	return nil
}

// Cancel implements Host.
func (h *GuestHost) Cancel(ctx context.Context) error {
	out, _ := h.c.State(spec.Outgoing)
	if strings.HasPrefix(out, "postcopy-") {
		return errors.New("Postcopy migration in progress, cannot cancel.")
	}
	h.mu.Lock()
	m, in := h.out, h.in
	h.mu.Unlock()
	if m != nil {
		if err := m.Cancel(ctx); err != nil {
			return err
		}
	}
	if in != nil {
		// Only a destination still waiting for its source can be
		// cancelled (the spec's listening --cancel--> cancelled); once the
		// source connected, the source's cancel fails the destination.
		if st, _ := h.c.State(spec.Incoming); st == "listening" {
			in.Cancel("cancelled by migrate_cancel before the source connected")
		}
	}
	return nil
}

// Continue implements Host.
func (h *GuestHost) Continue(ctx context.Context, state string) error {
	cur, err := h.c.State(spec.Outgoing)
	if err != nil {
		return err
	}
	if s := MigrationStatus(spec.Outgoing, cur); s != state {
		return fmt.Errorf("Migration not in expected state: %s", s)
	}
	h.mu.Lock()
	m := h.out
	h.mu.Unlock()
	if m == nil {
		return fmt.Errorf("Migration not in expected state: %s", cur)
	}
	return m.Continue(ctx)
}

// RunState implements Host.
func (h *GuestHost) RunState() RunState {
	running := h.g.Running()
	if running {
		return RunState{Status: "running", Running: true}
	}
	if h.opts.Destination {
		if st, _ := h.c.State(spec.Incoming); st != "completed" {
			return RunState{Status: "inmigrate"}
		}
	}
	switch st, _ := h.c.State(spec.Outgoing); st {
	case "completed":
		return RunState{Status: "postmigrate"}
	case "device":
		return RunState{Status: "finish-migrate"}
	}
	return RunState{Status: "paused"}
}

// Close cancels any migration still running (the source guest keeps
// running; a destination still loading fails) and waits for their
// goroutines. Later calls to Migrate and Incoming fail with ErrHostClosed.
func (h *GuestHost) Close() error {
	h.mu.Lock()
	h.closed = true
	m, in := h.out, h.in
	h.mu.Unlock()
	if m != nil {
		select {
		case <-m.Done():
		default:
			_ = m.Cancel(context.Background())
		}
	}
	if in != nil {
		in.Cancel("migctl is shutting down")
	}
	h.wg.Wait()
	return nil
}
