package reliability

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/spec"
)

// The matrix's tables. Everything here is written by hand from what the
// switchover commit protocol (issue 9) promises, except the list of states,
// which is the spec's.

// transportKind is a transport of the matrix.
type transportKind struct {
	name    string
	twoWay  bool   // a back channel (the commit protocol runs on it)
	proxied bool   // its bytes cross the fault proxy
	hasDest bool   // a destination process runs during the migration
	pending string // why its cells do not run yet ("" when they do)
}

var transports = []transportKind{
	{name: "tcp", twoWay: true, proxied: true, hasDest: true},
	{name: "unix", twoWay: true, proxied: true, hasDest: true},
	{name: "fd", twoWay: true, proxied: true, hasDest: true},
	{name: "exec", proxied: true, hasDest: true},
	{name: "file"},
	{name: "rdma", twoWay: true, pending: "not in the matrix yet: rdma: (serve --rdma-provider soft) carries RAM outside the byte stream this proxy breaks; its faults (a dropped completion, a failed registration, a cut mid-WRITE, a write outside a registered region) are rdma/ and engine tests (TestRDMAFaults)"},
}

func transportByName(name string) transportKind {
	for _, t := range transports {
		if t.name == name {
			return t
		}
	}
	panic("unknown transport " + name)
}

// Faults.
const (
	fCut         = "cut"          // the proxy closes both ways (TCP: reset) and refuses new connections
	fStall       = "stall"        // the proxy stops forwarding both ways, sockets open
	fCorruptFwd  = "corrupt-fwd"  // one byte of the next chunk towards the destination flipped
	fCorruptBack = "corrupt-back" // one byte of the next chunk towards the source flipped
	fTrickle     = "trickle"      // one byte per 200 ms both ways
	fResetFwd    = "reset-fwd"    // the direction towards the destination ends (EOF), the other flows
	fResetBack   = "reset-back"   // the direction towards the source ends, the other flows
	fKillSrc     = "kill-src"     // kill -9 of the source process
	fKillDst     = "kill-dst"     // kill -9 of the destination process
	fStopSrc     = "stop-src"     // SIGSTOP of the source until the destination settled
	fStopDst     = "stop-dst"     // SIGSTOP of the destination until the source settled
	fWriteFails  = "write-fails"  // file: the source's writes fail (RLIMIT_FSIZE: EFBIG)
)

var faults = []string{fCut, fStall, fCorruptFwd, fCorruptBack, fTrickle, fResetFwd, fResetBack,
	fKillSrc, fKillDst, fStopSrc, fStopDst, fWriteFails}

func isLinkFault(f string) bool {
	switch f {
	case fCut, fStall, fCorruptFwd, fCorruptBack, fTrickle, fResetFwd, fResetBack:
		return true
	}
	return false
}

// cell is one (transport, side:state, fault) of the matrix.
type cell struct {
	Transport string
	Side      string // spec.Incoming or spec.Outgoing: where the hold is
	State     string
	Fault     string
	// Skip says why the cell does not run: the transport or capability
	// set cannot reach the state, the fault cannot apply there, or the
	// feature is pending. "" for a cell that runs.
	Skip string
}

// ID names the cell, e.g. tcp/outgoing:active/cut.
func (c cell) ID() string { return c.Transport + "/" + c.Side + ":" + c.State + "/" + c.Fault }

// point is the cell's hold point, SIDE:STATE.
func (c cell) point() string { return c.Side + ":" + c.State }

// pending reports a cell whose feature is not there yet.
func (c cell) pending() bool { return strings.HasPrefix(c.Skip, "pending ") }

// prelude is how a cell reaches a state that a plain migration does not:
// hold first at side:state, do what, release, then hold at the cell's
// state.
type prelude struct {
	side, state string
	what        string // "cancel" on side, or a fault (fCut, fWriteFails)
}

// preludes, by side:state (hand-written from the spec's edges into them).
func preludeOf(c cell) *prelude {
	cut := fCut
	if c.Transport == "file" {
		cut = fWriteFails
	}
	switch c.point() {
	case "outgoing:cancelling", "outgoing:cancelled":
		return &prelude{spec.Outgoing, "active", "cancel"}
	case "outgoing:failing", "outgoing:failed":
		return &prelude{spec.Outgoing, "active", cut}
	case "outgoing:unknown-outcome":
		return &prelude{spec.Outgoing, "committed", cut}
	case "incoming:cancelling", "incoming:cancelled":
		return &prelude{spec.Incoming, "active", "cancel"}
	case "incoming:failed":
		return &prelude{spec.Incoming, "active", cut}
	case "incoming:unknown-outcome":
		return &prelude{spec.Incoming, "loaded", cut}
	}
	return nil
}

// capsOf returns the capabilities a cell turns on (on both sides).
func capsOf(c cell) []string {
	if c.point() == "outgoing:pre-switchover" {
		return []string{"pause-before-switchover"}
	}
	return nil
}

// stateClass is what the hand-written outcome table keys on.
func stateClass(side, state string) string {
	switch side + ":" + state {
	case "outgoing:setup", "outgoing:active", "incoming:setup", "incoming:listening":
		// The source has not sent a byte yet: it enters active once
		// connected, before its header.
		return "unsent"
	case "outgoing:pre-switchover", "outgoing:device", "incoming:connected", "incoming:active":
		return "before"
	case "outgoing:committed":
		return "committed"
	case "incoming:loaded":
		return "loaded"
	case "outgoing:unknown-outcome", "incoming:unknown-outcome":
		return "unknown"
	case "incoming:completed":
		return "confirming"
	case "outgoing:completed":
		return "done"
	case "outgoing:cancelling", "outgoing:cancelled":
		return "cancel-src"
	case "incoming:cancelling", "incoming:cancelled":
		return "cancel-dst"
	case "outgoing:failing", "outgoing:failed", "incoming:failed":
		return "failed"
	}
	return ""
}

// skipReason says why (transport, side:state, fault) does not run, or "".
// Written by hand; the states come from the spec.
func skipReason(t transportKind, side, state, fault string, st *spec.State) string {
	if t.pending != "" {
		return t.pending
	}
	if strings.HasPrefix(state, "postcopy-") {
		return "pending postcopy (issue 11): the matrix does not drive postcopy yet (it needs a guest-process destination); postcopy's cut, pause and recovery are engine tests (TestPostcopyCutAtPackage, TestPostcopyCutAtRun, TestPostcopyCutAtFirstRequest, TestPostcopyRecoverAfterCut)"
	}
	switch {
	case fault == fWriteFails && t.name != "file":
		return "n/a: a failing write is the file transport's fault"
	case isLinkFault(fault) && !t.proxied:
		return "n/a: file has no link to break (its fault is a failing write)"
	case (fault == fCorruptBack || fault == fResetBack) && !t.twoWay:
		return "n/a: " + t.name + " is one-way (no backward direction)"
	case (fault == fKillDst || fault == fStopDst) && !t.hasDest:
		return "n/a: no destination process runs during a save to file (the restore comes after it)"
	}
	if state == "none" {
		return "unreachable: the initial state is never entered"
	}
	if t.name == "file" && side == spec.Incoming {
		return "n/a: file's destination restores after the save ended; a restore's faults are the durability tests' (docs/reliability.md, one-way saves)"
	}
	if !t.twoWay {
		switch side + ":" + state {
		case "incoming:loaded", "incoming:unknown-outcome":
			return "unreachable: a one-way transport's destination cannot say LOADED; it completes at the end of the stream"
		case "outgoing:unknown-outcome":
			return "unreachable: a one-way transport commits when its last byte is durable and completes in the same step"
		}
	}
	if isLinkFault(fault) {
		switch stateClass(side, state) {
		case "unknown", "failed", "cancel-src", "cancel-dst":
			return "n/a: the channel is already gone (cut or cancelled): a link fault changes nothing"
		case "done":
			return "n/a: after the source completed nothing more crosses the channel"
		}
		if stateClass(side, state) == "unsent" && side+":"+state != "outgoing:active" && (fault == fResetFwd || fault == fResetBack) {
			return "n/a: no link exists yet (a one-way reset acts on open links)"
		}
	}
	if stateClass(side, state) == "" {
		return fmt.Sprintf("no outcome class for %s:%s: add it to stateClass", side, state)
	}
	return ""
}

// allCells enumerates the full matrix: every transport × every state of
// both migration sides in the spec × every fault.
func allCells() ([]cell, error) {
	s, err := spec.Load("transitions.yaml", migctl.DefaultSpec, guards.Default().Names())
	if err != nil {
		return nil, err
	}
	var out []cell
	for _, t := range transports {
		for _, side := range []string{spec.Outgoing, spec.Incoming} {
			for i := range s.Side(side).States {
				st := &s.Side(side).States[i]
				for _, f := range faults {
					out = append(out, cell{Transport: t.name, Side: side, State: st.Name, Fault: f,
						Skip: skipReason(t, side, st.Name, f, st)})
				}
			}
		}
	}
	return out, nil
}

// pairwise picks, from the runnable cells, a subset in which every pair
// (state × fault, fault × transport, state × transport) that some
// runnable cell has appears at least once: greedily, the cell covering
// the most uncovered pairs first (ties: the order of allCells).
func pairwise(cells []cell) []cell {
	pairs := func(c cell) [3]string {
		return [3]string{"sf " + c.point() + " " + c.Fault, "ft " + c.Fault + " " + c.Transport, "st " + c.point() + " " + c.Transport}
	}
	uncovered := map[string]bool{}
	var run []cell
	for _, c := range cells {
		if c.Skip == "" {
			run = append(run, c)
			for _, p := range pairs(c) {
				uncovered[p] = true
			}
		}
	}
	var out []cell
	used := make([]bool, len(run))
	for len(uncovered) > 0 {
		best, bestN := -1, 0
		for i, c := range run {
			if used[i] {
				continue
			}
			n := 0
			for _, p := range pairs(c) {
				if uncovered[p] {
					n++
				}
			}
			if n > bestN {
				best, bestN = i, n
			}
		}
		used[best] = true
		out = append(out, run[best])
		for _, p := range pairs(run[best]) {
			delete(uncovered, p)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return cellLess(out[i], out[j]) })
	return out
}

// cellLess orders cells as allCells does: transport, side, state, fault.
func cellLess(a, b cell) bool {
	ia := slices.IndexFunc(transports, func(t transportKind) bool { return t.name == a.Transport })
	ib := slices.IndexFunc(transports, func(t transportKind) bool { return t.name == b.Transport })
	if ia != ib {
		return ia < ib
	}
	if a.Side != b.Side {
		return a.Side == spec.Outgoing
	}
	if a.State != b.State {
		return a.State < b.State
	}
	return slices.Index(faults, a.Fault) < slices.Index(faults, b.Fault)
}

// Final states a surviving side may end in (the table's words).
const (
	sCompleted = "completed"
	sFailed    = "failed"
	sCancelled = "cancelled"
	sUnknown   = "unknown-outcome"
	sListening = "listening"
)

// waitStates are the declared operator-wait states: a side may stay there
// after a fault until an operator acts. Everything else a side ends in
// must be terminal.
var waitStates = map[string]string{
	"outgoing:" + sUnknown:   "the switchover's outcome is unknown: x-migctl-resolve-switchover",
	"incoming:" + sUnknown:   "the switchover's outcome is unknown: x-migctl-resolve-switchover",
	"incoming:" + sListening: "the destination waits for a source, as QEMU's -incoming does; migrate_cancel ends it",
}

// outcome is one row of the hand-written table: for a held state class
// and a set of faults, the final states each side may end in (a side the
// fault killed is not asked).
type outcome struct {
	class  string
	oneWay bool // the row is for one-way transports (exec, file)
	faults []string
	src    []string
	dst    []string
	why    string
}

var (
	breaking    = []string{fCut, fStall, fResetFwd, fResetBack, fTrickle}
	corrupting  = []string{fCorruptFwd, fCorruptBack}
	processes   = []string{fKillSrc, fKillDst, fStopSrc, fStopDst}
	anyFault    = faults
	allFinal    = []string{sCompleted, sFailed, sUnknown}
	afterCommit = []string{sUnknown, sCompleted}
)

// outcomes is the table. The first row whose class, kind and faults match
// a cell decides. Written from the protocol's promises (issue 9), not
// from the spec.
var outcomes = []outcome{
	// Two-way transports.
	{class: "unsent", faults: []string{fStopSrc, fStopDst, fKillSrc}, src: []string{sFailed, sCompleted}, dst: []string{sFailed, sListening, sCompleted},
		why: "nothing sent yet: a stopped process may just resume the migration late, or its peer times out; a killed source never comes"},
	{class: "unsent", faults: anyFault, src: []string{sFailed}, dst: []string{sFailed, sListening},
		why: "nothing sent yet: the source fails and runs its guest; the destination fails, or still waits for a source (a connection that brings no byte is not one)"},
	{class: "before", faults: corrupting, src: allFinal, dst: allFinal,
		why: "a flipped byte may break the stream (both fail, the source runs its guest), land in a page (both complete), or break LOADED, go or the confirmation later (an unknown outcome)"},
	{class: "before", faults: anyFault, src: []string{sFailed}, dst: []string{sFailed},
		why: "before the commit every failure fails both sides and the source runs its guest"},
	{class: "committed", faults: corrupting, src: afterCommit, dst: []string{sUnknown, sCompleted, sFailed},
		why: "the source committed: it never runs the guest on its own; a destination that cannot read go discards what it loaded or waits"},
	{class: "committed", faults: anyFault, src: afterCommit, dst: afterCommit,
		why: "the source committed and sends go: a lost go leaves both sides' outcome unknown"},
	{class: "loaded", faults: anyFault, src: allFinal, dst: []string{sUnknown, sCompleted, sFailed},
		why: "the destination said LOADED: the source fails if it never heard it, or committed; the destination runs only on go"},
	{class: "unknown", faults: anyFault, src: []string{sUnknown, sFailed}, dst: []string{sUnknown},
		why: "an unknown outcome ends only by the operator's word; a source that never committed had failed already"},
	{class: "confirming", faults: anyFault, src: afterCommit, dst: []string{sCompleted},
		why: "the destination received go and runs the guest; the source learns it, or does not and waits for the operator"},
	{class: "done", faults: anyFault, src: []string{sCompleted}, dst: []string{sCompleted},
		why: "the migration completed; a later fault changes neither side"},
	{class: "cancel-src", faults: anyFault, src: []string{sCancelled}, dst: []string{sFailed, sListening},
		why: "the source was cancelled before the commit (from active, before its first byte): it runs its guest; the destination fails, or still waits for a source"},
	{class: "cancel-dst", faults: anyFault, src: []string{sFailed}, dst: []string{sCancelled},
		why: "the destination was cancelled before the guest ran there: the source fails and runs its guest"},
	{class: "failed", faults: anyFault, src: []string{sFailed}, dst: []string{sFailed, sListening},
		why: "the migration failed before the commit (cut in the source's active, before its first byte, or in the destination's): both sides stay failed, or the destination still waits for a source"},

	// One-way transports (exec, file): the source commits when its last
	// byte is durable, whatever the destination makes of it.
	{class: "unsent", oneWay: true, faults: []string{fStopSrc, fStopDst, fKillSrc}, src: []string{sFailed, sCompleted}, dst: []string{sFailed, sListening, sCompleted},
		why: "nothing sent yet: a stopped process may just resume the migration late, or its peer times out; a killed source never comes"},
	{class: "unsent", oneWay: true, faults: []string{fResetFwd}, src: []string{sCompleted, sFailed}, dst: []string{sFailed, sListening},
		why: "the link towards the destination ends before the first byte: the source's command still takes every byte (the proxy drops them) and exits 0, so the source completes (a one-way transport cannot know), or fails first; the destination's command sees EOF and it fails, or is still listening when judged (a stream that brought no byte is not a source); the guest runs nowhere until the operator's cont"},
	{class: "unsent", oneWay: true, faults: anyFault, src: []string{sFailed}, dst: []string{sFailed, sListening},
		why: "the source's command cannot deliver: it fails and runs its guest"},
	{class: "before", oneWay: true, faults: []string{fResetFwd}, src: []string{sCompleted, sFailed}, dst: []string{sFailed},
		why: "the bytes vanish after the source's command took them: it exits 0 and the source completes (a one-way transport cannot know), or fails first; the destination fails on the cut stream, and the guest runs nowhere until the operator's cont"},
	{class: "before", oneWay: true, faults: []string{fCorruptFwd}, src: []string{sCompleted, sFailed}, dst: []string{sFailed, sCompleted},
		why: "one-way: the source completes once its command exited 0; a flipped byte fails the destination or lands in a page"},
	{class: "before", oneWay: true, faults: []string{fStopSrc}, src: []string{sFailed, sCompleted}, dst: []string{sFailed},
		why: "a stopped source's destination times out; a file save just resumes (no peer to time out)"},
	{class: "before", oneWay: true, faults: anyFault, src: []string{sFailed}, dst: []string{sFailed},
		why: "before the last byte is durable every failure fails the source, which runs its guest"},
	{class: "committed", oneWay: true, faults: anyFault, src: []string{sCompleted}, dst: []string{sCompleted, sFailed},
		why: "one-way: committed once the last byte is durable; the source completes, whatever the destination makes of the stream"},
	{class: "confirming", oneWay: true, faults: anyFault, src: []string{sCompleted}, dst: []string{sCompleted},
		why: "one-way: the destination has the whole stream and runs the guest; the source's command had exited 0"},
	{class: "done", oneWay: true, faults: anyFault, src: []string{sCompleted}, dst: []string{sCompleted},
		why: "the migration completed; a later fault changes neither side"},
	{class: "cancel-src", oneWay: true, faults: anyFault, src: []string{sCancelled}, dst: []string{sFailed, sListening},
		why: "the source was cancelled: it runs its guest; the destination fails"},
	{class: "cancel-dst", oneWay: true, faults: anyFault, src: []string{sFailed, sCompleted}, dst: []string{sCancelled},
		why: "one-way: the source does not hear the cancel; it fails, or completes if its command had taken everything"},
	{class: "failed", oneWay: true, faults: anyFault, src: []string{sFailed}, dst: []string{sFailed, sListening},
		why: "the migration failed before the commit: both sides stay failed, or the destination still waits for a source"},
}

// allowed returns the table's row for a cell.
func allowed(c cell) (outcome, error) {
	t := transportByName(c.Transport)
	class := stateClass(c.Side, c.State)
	for _, o := range outcomes {
		if o.class == class && o.oneWay == !t.twoWay && slices.Contains(o.faults, c.Fault) {
			return o, nil
		}
	}
	return outcome{}, fmt.Errorf("no outcome row for class %s (one-way %v) and fault %s: add one", class, !t.twoWay, c.Fault)
}
