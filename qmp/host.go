package qmp

import "context"

// Host carries out the commands that act on the guest and its migrations.
// The server checks a request's arguments first and calls a Host method
// only for a well-formed one; whether it may happen now is the
// controller's decision (the spec's edges and rules), which the Host
// fires. Package vmm's VMM is the Host migctl serve uses. Methods are
// called from several client goroutines at once and must be safe for that.
type Host interface {
	// Migrate starts an outgoing migration to uri (QMP migrate); channels
	// lists the channel types given with it (empty for a plain uri). It
	// returns once the migration is started or refused.
	Migrate(ctx context.Context, uri string, channels []string) error
	// Incoming starts listening for an incoming migration on uri (QMP
	// migrate-incoming). With exitOnError, a failed incoming migration
	// ends the process, as QEMU's exit-on-error does.
	Incoming(ctx context.Context, uri string, channels []string, exitOnError bool) error
	// Cancel is QMP migrate_cancel.
	Cancel(ctx context.Context) error
	// Continue is QMP migrate-continue: the outgoing side must show QMP
	// status status and be paused there.
	Continue(ctx context.Context, status string) error
	// Stop and Cont are QMP stop and cont.
	Stop(ctx context.Context) error
	Cont(ctx context.Context) error
	// Resolve is x-migctl-resolve-switchover on side (spec.Outgoing or
	// spec.Incoming): peerGone says the other side will never run the
	// guest.
	Resolve(ctx context.Context, side string, peerGone bool) error
	// Yank is QMP yank of the migration instance: the running
	// migration's channels are aborted at once.
	Yank(ctx context.Context) error
	// StartPostcopy is QMP migrate-start-postcopy: the running migration
	// switches to postcopy at its next section boundary.
	StartPostcopy(ctx context.Context) error
	// Pause is QMP migrate-pause: the channel of a postcopy migration
	// (outgoing first, as QEMU, then incoming) is shut down, and the side
	// goes to postcopy-paused.
	Pause(ctx context.Context) error
	// Recover is QMP migrate-recover: a destination whose postcopy is
	// paused listens on uri for the source's new channel.
	Recover(ctx context.Context, uri string) error
	// Resume is QMP migrate with resume=true: a source whose postcopy is
	// paused reconnects to uri (channels as for Migrate).
	Resume(ctx context.Context, uri string, channels []string) error
}
