package machine

import (
	"github.com/migctl/migctl/internal/mutant"
	"github.com/migctl/migctl/spec"
)

// State is a state of one of the spec's graphs. Go code names a state only
// through the constants below, each of which is part of the contract
// (Contract): a spec that does not declare it is refused when a
// controller is built, and by `migctl validate`.
type State string

// Trigger is a trigger of one of the spec's graphs. Like State, Go code
// names a trigger only through the constants below.
type Trigger string

// States the Go code names. The spec declares what each means.
const (
	// StatePreSwitchover: the source paused before saving devices
	// (pause-before-switchover); the engine waits there for continue.
	StatePreSwitchover State = "pre-switchover"
	// StatePostcopyActive, StatePostcopyRecover: the states (of either
	// side) in which migrate-pause applies (QEMU's
	// migration_postcopy_is_alive).
	StatePostcopyActive  State = "postcopy-active"
	StatePostcopyRecover State = "postcopy-recover"
	// GuestRunning: the guest graph's state in which the guest runs; the
	// destination's loader starts the guest only when arrive leads there.
	GuestRunning State = "running"
)

// Triggers the Go code fires. The spec's edges say where each goes.
const (
	// Migration sides.
	TriggerMigrate      Trigger = "migrate"       // outgoing: engine.Start
	TriggerStart        Trigger = "start"         // outgoing: the channels are connected
	TriggerSwitchover   Trigger = "switchover"    // outgoing: converged; guest: the source stops its guest
	TriggerContinue     Trigger = "continue"      // outgoing: migrate-continue
	TriggerComplete     Trigger = "complete"      // both sides: the migration is done
	TriggerCancel       Trigger = "cancel"        // both sides: migrate_cancel
	TriggerFail         Trigger = "fail"          // both sides: an error
	TriggerCleanup      Trigger = "cleanup"       // both sides: the data plane finished tearing down
	TriggerIncoming     Trigger = "incoming"      // incoming: loaders.Listen (migrate-incoming)
	TriggerListen       Trigger = "listen"        // incoming: the listener is open
	TriggerListenFailed Trigger = "listen-failed" // incoming: the listener could not be opened
	TriggerConnect      Trigger = "connect"       // incoming: the source connected and announced itself
	TriggerLoad         Trigger = "load"          // incoming: loading starts

	// The switchover commit protocol (docs/stream.md).
	TriggerLoaded Trigger = "loaded" // incoming: everything arrived; LOADED sent, waiting for go
	TriggerCommit Trigger = "commit" // outgoing: LOADED arrived (or a one-way save is durable); go follows
	TriggerLost   Trigger = "lost"   // both sides: the channel broke or stalled after the commit point
	// Postcopy (docs/stream.md, Postcopy).
	TriggerPostcopy      Trigger = "postcopy"       // outgoing: migrate-start-postcopy switched over; incoming: POSTCOPY_LISTEN
	TriggerRun           Trigger = "run"            // outgoing: the commit point, POSTCOPY_RUN goes out; incoming: POSTCOPY_RUN arrived
	TriggerPause         Trigger = "pause"          // both sides: postcopy lost its channel, or migrate-pause
	TriggerResume        Trigger = "resume"         // outgoing: migrate resume=true; incoming: POSTCOPY_RESUME arrived
	TriggerRecover       Trigger = "recover"        // incoming: migrate-recover
	TriggerConnectFailed Trigger = "connect-failed" // outgoing: the recovery channel could not connect
	TriggerResumeAck     Trigger = "resume-ack"     // outgoing: RESUME_ACK arrived
	TriggerReattach      Trigger = "reattach"       // incoming: a new migctl took over a guest process in postcopy
	// An operator's x-migctl-resolve-switchover, per side and answer.
	TriggerResolveRunning Trigger = "resolve-running" // outgoing: the destination runs the guest
	TriggerResolveGone    Trigger = "resolve-gone"    // outgoing: the destination never will; resume here
	TriggerResolveStart   Trigger = "resolve-start"   // incoming: the source is gone; start the guest here
	TriggerResolveDiscard Trigger = "resolve-discard" // incoming: the source runs the guest; discard

	// The guest graph (QEMU's run state).
	TriggerBoot          Trigger = "boot"           // the guest starts (a process without -incoming)
	TriggerAwaitIncoming Trigger = "await-incoming" // the guest waits for an incoming migration (-incoming)
	TriggerStop          Trigger = "stop"           // QMP stop
	TriggerCont          Trigger = "cont"           // QMP cont
	TriggerRestart       Trigger = "restart"        // the source runs its guest again after a failed migration
	TriggerMigrated      Trigger = "migrated"       // the source's guest migrated away
	TriggerArrive        Trigger = "arrive"         // the incoming migration completed: the guest starts, or stays paused
)

// Configuration triggers, fired on both migration sides by SetCapabilities
// and SetParameters (declared by package spec, which reserves them).
const (
	TriggerSetCapabilities Trigger = spec.TriggerSetCapabilities
	TriggerSetParameters   Trigger = spec.TriggerSetParameters
)

// contract lists every (graph, name) the Go code depends on and who
// depends on it. New and Check refuse a spec that lacks one.
var contract = []spec.Need{
	trig(spec.Outgoing, TriggerMigrate, "engine.Start"),
	trig(spec.Outgoing, TriggerStart, "engine: channels connected"),
	trig(spec.Outgoing, TriggerSwitchover, "engine: converged"),
	trig(spec.Outgoing, TriggerContinue, "engine.Migration.Continue"),
	trig(spec.Outgoing, TriggerComplete, "engine: confirmed"),
	trig(spec.Outgoing, TriggerCancel, "engine.Migration.Cancel"),
	trig(spec.Outgoing, TriggerFail, "engine: failure"),
	trig(spec.Outgoing, TriggerCleanup, "engine: torn down"),
	state(spec.Outgoing, StatePreSwitchover, "engine: waits for continue there"),
	state(spec.Outgoing, StatePostcopyActive, "engine: migrate-pause applies there"),
	state(spec.Outgoing, StatePostcopyRecover, "engine: migrate-pause applies there"),
	state(spec.Incoming, StatePostcopyActive, "loaders: migrate-pause applies there"),
	state(spec.Incoming, StatePostcopyRecover, "loaders: migrate-pause applies there"),
	trig(spec.Outgoing, TriggerCommit, "engine: LOADED arrived, or a one-way save is durable"),
	trig(spec.Outgoing, TriggerLost, "engine: the channel broke after the commit"),
	trig(spec.Outgoing, TriggerResolveRunning, "engine.Migration.Resolve"),
	trig(spec.Outgoing, TriggerResolveGone, "engine.Migration.Resolve"),
	trig(spec.Outgoing, TriggerPostcopy, "engine: migrate-start-postcopy switched over"),
	trig(spec.Outgoing, TriggerRun, "engine: the postcopy commit point"),
	trig(spec.Outgoing, TriggerPause, "engine: postcopy lost its channel"),
	trig(spec.Outgoing, TriggerResume, "engine.Migration.Resume"),
	trig(spec.Outgoing, TriggerConnect, "engine: the recovery channel connected"),
	trig(spec.Outgoing, TriggerConnectFailed, "engine: the recovery channel failed"),
	trig(spec.Outgoing, TriggerResumeAck, "engine: RESUME_ACK arrived"),

	trig(spec.Incoming, TriggerIncoming, "loaders.Listen"),
	trig(spec.Incoming, TriggerListen, "loaders: listener open"),
	trig(spec.Incoming, TriggerListenFailed, "loaders: listener failed"),
	trig(spec.Incoming, TriggerConnect, "loaders: source announced"),
	trig(spec.Incoming, TriggerLoad, "loaders: loading starts"),
	trig(spec.Incoming, TriggerComplete, "loaders: stream ended"),
	trig(spec.Incoming, TriggerCancel, "loaders.Incoming.Cancel"),
	trig(spec.Incoming, TriggerFail, "loaders: failure"),
	trig(spec.Incoming, TriggerCleanup, "loaders: torn down"),
	trig(spec.Incoming, TriggerLoaded, "loaders: LOADED sent"),
	trig(spec.Incoming, TriggerLost, "loaders: the channel broke before go"),
	trig(spec.Incoming, TriggerResolveStart, "loaders.Incoming.Resolve"),
	trig(spec.Incoming, TriggerResolveDiscard, "loaders.Incoming.Resolve"),
	trig(spec.Incoming, TriggerPostcopy, "loaders: POSTCOPY_LISTEN"),
	trig(spec.Incoming, TriggerRun, "loaders: POSTCOPY_RUN"),
	trig(spec.Incoming, TriggerPause, "loaders: postcopy lost its channel"),
	trig(spec.Incoming, TriggerRecover, "loaders.Incoming.Recover"),
	trig(spec.Incoming, TriggerResume, "loaders: POSTCOPY_RESUME"),
	trig(spec.Incoming, TriggerReattach, "loaders.Reattach"),

	trig(spec.Guest, TriggerBoot, "machine.New without Options.Incoming"),
	trig(spec.Guest, TriggerAwaitIncoming, "machine.New with Options.Incoming"),
	trig(spec.Guest, TriggerStop, "vmm: QMP stop"),
	trig(spec.Guest, TriggerCont, "vmm: QMP cont"),
	trig(spec.Guest, TriggerSwitchover, "engine: stops the source guest"),
	trig(spec.Guest, TriggerRestart, "engine: restarts the source guest"),
	trig(spec.Guest, TriggerMigrated, "engine: the guest migrated away"),
	trig(spec.Guest, TriggerArrive, "loaders: the guest arrived"),
	state(spec.Guest, GuestRunning, "loaders: start the guest when it arrives there"),
}

func trig(graph string, t Trigger, by string) spec.Need {
	return spec.Need{Graph: graph, Kind: spec.NeedTrigger, Name: string(t), By: by}
}

func state(graph string, s State, by string) spec.Need {
	return spec.Need{Graph: graph, Kind: spec.NeedState, Name: string(s), By: by}
}

// Contract returns every state and trigger the Go code names, per graph:
// what a spec must declare for migctl to run it.
func Contract() []spec.Need { return append([]spec.Need(nil), contract...) }

// Check reports, as *spec.Errors with file:line:col, every name of the
// contract the spec lacks. New runs it; `migctl validate` too.
func Check(s *spec.Spec) error {
	if mutant.NoContract {
		return nil
	}
	return s.Check(contract)
}
