package reliability

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/internal/fault"
	"github.com/migctl/migctl/qmp"
	"github.com/migctl/migctl/spec"
)

// Environment of the matrix.
const (
	// envFull runs every cell rather than the pairwise subset.
	envFull = "MIGCTL_FULL_MATRIX"
	// envOut names a file the matrix appends each cell's result to (JSON
	// lines), from which .ci/fault-matrix regenerates docs/reliability.md.
	envOut = "MIGCTL_MATRIX_OUT"
	// envCells runs only the cells whose ID contains one of these
	// comma-separated strings (for working on a few cells).
	envCells = "MIGCTL_MATRIX_CELLS"
)

// The migctl parameters that bound a stalled side (issue 9, item 3), in
// ms, set short by the matrix when the binary has them.
const (
	paramKeepalive = "x-migctl-keepalive"
	paramIOTimeout = "x-migctl-io-timeout"
	keepaliveMS    = 200
	ioTimeoutMS    = 1000
)

// settleBound is the most a side may take, after the fault and its
// release, to reach a terminal or operator-wait state: a few io-timeouts
// (and room for race-built processes sharing two cores) when migctl has
// the deadlines, a generous hang guard when it does not.
func settleBound(deadlines bool) time.Duration {
	if deadlines {
		return 15 * time.Second
	}
	return 20 * time.Second
}

// trickle is the proxy's trickle: one byte per 200 ms both ways, a
// "slow loris" that must not keep a side waiting beyond its bound.
const (
	trickleBytes = 1
	trickleEvery = 200 * time.Millisecond
)

var (
	specOnce sync.Once
	theSpec  *spec.Spec
)

func loadSpec(t testing.TB) *spec.Spec {
	specOnce.Do(func() {
		s, err := spec.Load("transitions.yaml", migctl.DefaultSpec, guards.Default().Names())
		if err != nil {
			panic(err)
		}
		theSpec = s
	})
	return theSpec
}

// terminal reports whether state is a terminal state of side.
func terminal(side, state string) bool {
	st := theSpec.Side(side).State(state)
	return st != nil && st.Terminal
}

// settled reports whether state is terminal or an operator-wait state on
// side.
func settled(side, state string) bool {
	if _, ok := waitStates[side+":"+state]; ok {
		return true
	}
	st := theSpec.Side(side).State(state)
	return st != nil && st.Terminal
}

// result is one cell's outcome, for docs/reliability.md.
type result struct {
	ID     string `json:"id"`
	Status string `json:"status"` // pass, fail, not-reached
	Src    string `json:"src,omitempty"`
	Dst    string `json:"dst,omitempty"`
	Note   string `json:"note,omitempty"`
}

var outMu sync.Mutex

func record(r result) {
	path := os.Getenv(envOut)
	if path == "" {
		return
	}
	outMu.Lock()
	defer outMu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	b, _ := json.Marshal(r)
	f.Write(append(b, '\n'))
}

// TestMatrix runs the pairwise subset of the fault matrix, or every cell
// with MIGCTL_FULL_MATRIX=1.
func TestMatrix(t *testing.T) {
	loadSpec(t)
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	run := pairwise(cells)
	if os.Getenv(envFull) != "" {
		run = nil
		for _, c := range cells {
			if c.Skip == "" {
				run = append(run, c)
			}
		}
	}
	if only := os.Getenv(envCells); only != "" {
		var some []cell
		for _, c := range cells {
			for _, s := range strings.Split(only, ",") {
				if c.Skip == "" && strings.Contains(c.ID(), s) {
					some = append(some, c)
					break
				}
			}
		}
		run = some
	}
	t.Logf("%d cells of %d (%d skipped or pending)", len(run), len(cells), countSkipped(cells))
	for _, c := range run {
		t.Run(c.ID(), func(t *testing.T) {
			t.Parallel()
			runCell(t, c)
		})
	}
}

func countSkipped(cells []cell) int {
	n := 0
	for _, c := range cells {
		if c.Skip != "" {
			n++
		}
	}
	return n
}

// cellRun is one cell in progress.
type cellRun struct {
	t         *testing.T
	c         cell
	tk        transportKind
	row       outcome
	dir       string
	src, dst  *proc
	newDst    *proc
	link      *link
	deadlines bool
	bound     time.Duration
	res       result
	reached   bool
	// stoppedProc is the process a stop fault stopped (nil otherwise).
	stoppedProc *proc
	// fsizeLowered: write-fails lowered the source's RLIMIT_FSIZE to this
	// from old.
	fsizeOld *unix.Rlimit
}

func runCell(t *testing.T, c cell) {
	r := &cellRun{t: t, c: c, tk: transportByName(c.Transport), res: result{ID: c.ID()}}
	var err error
	if r.row, err = allowed(c); err != nil {
		t.Fatal(err)
	}
	if r.dir, err = os.MkdirTemp("", "rel"); err != nil { // short: unix socket paths
		t.Fatal(err)
	}
	t.Cleanup(func() {
		switch {
		case t.Skipped():
			r.res.Status = "not-reached"
		case t.Failed():
			r.res.Status = "fail"
		default:
			r.res.Status = "pass"
		}
		record(r.res)
		os.RemoveAll(r.dir)
	})
	defer r.teardown()
	r.start()
	r.drive()
	r.settle()
	r.check()
	r.followUp()
}

// errorf fails the cell and keeps the first line of each failure (the
// first few) as the cell's note for docs/reliability.md.
func (r *cellRun) errorf(format string, args ...any) {
	r.t.Helper()
	msg := fmt.Sprintf(format, args...)
	r.t.Error(msg)
	line, _, _ := strings.Cut(msg, "\n")
	if len(line) > 300 {
		line = line[:300] + "…"
	}
	switch n := strings.Count(r.res.Note, "; ") + 1; {
	case r.res.Note == "":
		r.res.Note = line
	case n < 3:
		r.res.Note += "; " + line
	}
}

// procFor returns the process of side.
func (r *cellRun) procFor(side string) *proc {
	if side == spec.Outgoing {
		return r.src
	}
	return r.dst
}

func (r *cellRun) start() {
	t, c := r.t, r.c
	var srcHolds, dstHolds []string
	add := func(side, state string) {
		if side == spec.Outgoing {
			srcHolds = append(srcHolds, side+":"+state)
		} else {
			dstHolds = append(dstHolds, side+":"+state)
		}
	}
	if pre := preludeOf(c); pre != nil {
		add(pre.side, pre.state)
	}
	add(c.Side, c.State)
	r.src = startProc(t, r.dir, "source", false, srcHolds)
	if r.tk.hasDest {
		r.dst = startProc(t, r.dir, "destination", true, dstHolds)
	}
	var params map[string]any
	if err := r.src.query("query-migrate-parameters", nil, &params); err != nil {
		t.Fatal(err)
	}
	_, ka := params[paramKeepalive]
	_, io := params[paramIOTimeout]
	r.deadlines = ka && io
	r.bound = settleBound(r.deadlines)
	for _, p := range []*proc{r.src, r.dst} {
		if p != nil {
			r.configure(p)
		}
	}
	l, err := newLink(r.dir, c.Transport, r.src, r.dst)
	if err != nil {
		t.Fatal(err)
	}
	r.link = l
}

// configure sets the cell's capabilities and, when migctl has them, short
// deadlines.
func (r *cellRun) configure(p *proc) {
	if caps := capsOf(r.c); len(caps) > 0 {
		var list []map[string]any
		for _, name := range caps {
			list = append(list, map[string]any{"capability": name, "state": true})
		}
		if err := p.query("migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
			r.t.Fatal(err)
		}
	}
	if r.deadlines {
		if err := p.query("migrate-set-parameters", map[string]any{paramKeepalive: keepaliveMS, paramIOTimeout: ioTimeoutMS}, nil); err != nil {
			r.t.Fatal(err)
		}
	}
}

// hold is one hold point the cell goes through, and what it does there.
type hold struct {
	side, state string
	act         func()
	// releaseFirst: release this hold before waiting for the next (the
	// next state is reached by the goroutine held here); otherwise the
	// next is reached by what act started, and this one is released after
	// it.
	releaseFirst bool
}

// drive runs the migration through the cell's holds.
func (r *cellRun) drive() {
	t, c := r.t, r.c
	var holds []hold
	if pre := preludeOf(c); pre != nil {
		h := hold{side: pre.side, state: pre.state, releaseFirst: true}
		if pre.what == "cancel" {
			p := r.procFor(pre.side)
			// Cancelling is reached by the cancel itself, which the cell's
			// hold then blocks; cancelled by the migration's goroutine,
			// released once the cancel was accepted.
			h.releaseFirst = c.State != "cancelling"
			h.act = func() {
				done := p.async(r.bound, "migrate_cancel", nil)
				if h.releaseFirst {
					if err := <-done; err != nil {
						r.t.Fatal(err)
					}
				}
			}
		} else {
			f := pre.what
			h.act = func() { r.apply(f) }
		}
		holds = append(holds, h)
	}
	holds = append(holds, hold{side: c.Side, state: c.State, act: func() { r.apply(c.Fault) }})

	// The destination listens first; a hold while it opens its transport
	// is handled before the source starts.
	var incoming <-chan error
	if r.dst != nil {
		incoming = r.dst.async(r.bound+holdBound, "migrate-incoming", map[string]any{"uri": r.link.dstURI, "exit-on-error": false})
		if first := holds[0]; first.side == spec.Incoming && (first.state == "setup" || first.state == "listening") {
			r.through(first, nil)
			holds = holds[1:]
		}
		if r.dst.alive() && !r.dst.isStopped() {
			select {
			case err := <-incoming:
				if err != nil {
					t.Logf("migrate-incoming: %v", err)
				}
			case <-time.After(r.bound + holdBound):
				t.Fatalf("migrate-incoming did not answer within %v", r.bound+holdBound)
			}
			if err := r.link.learnPort(r.dst); err != nil {
				t.Logf("the destination's port: %v", err)
			}
		}
	}
	r.src.async(r.bound+holdBound, "migrate", map[string]any{"uri": r.link.srcURI})
	var pending []hold // held and not yet released (releaseFirst false)
	for i, h := range holds {
		var next *hold
		if i+1 < len(holds) {
			next = &holds[i+1]
		}
		if !r.through(h, next) {
			return
		}
		if !h.releaseFirst && next != nil {
			pending = append(pending, h)
		}
		if h.side == spec.Outgoing && h.state == "pre-switchover" && r.src.alive() {
			r.src.async(r.bound, "migrate-continue", map[string]any{"state": "pre-switchover"})
		}
	}
	for i := len(pending) - 1; i >= 0; i-- {
		r.releaseAt(pending[i])
	}
}

// through waits for hold h, acts, and releases it (unless it must stay
// held until next was reached). False when the state was not reached (the
// test is skipped) — never silently.
func (r *cellRun) through(h hold, next *hold) bool {
	p := r.procFor(h.side)
	ok := p.waitFor(holdBound, func() bool {
		return p.heldAt(h.side, h.state) || terminal(h.side, p.state[h.side]) && !p.enteredLocked(h.side, h.state)
	})
	p.mu.Lock()
	held, now := p.heldAt(h.side, h.state), p.state[h.side]
	p.mu.Unlock()
	if !held {
		if !ok {
			r.t.Fatalf("%s:%s: not held within %v (the %s is in %s)\n%s", h.side, h.state, holdBound, p.role, now, p.out.String())
		}
		var mi qmp.MachineInfo
		_ = p.query("query-migctl-machine", nil, &mi)
		desc := mi.Outgoing.ErrorDesc
		if h.side == spec.Incoming {
			desc = mi.Incoming.ErrorDesc
		}
		r.res.Note = fmt.Sprintf("%s ended in %s without entering %s (%s)", h.side, now, h.state, desc)
		r.t.Skipf("not reached: %s", r.res.Note)
		return false
	}
	r.reached = true
	if h.act != nil {
		h.act()
	}
	if h.releaseFirst || next == nil {
		r.releaseAt(h)
	}
	return true
}

// releaseAt releases hold h on its process unless it was killed; on a
// stopped process the release waits in its socket until SIGCONT.
func (r *cellRun) releaseAt(h hold) {
	p := r.procFor(h.side)
	if !p.alive() {
		return
	}
	if p.isStopped() {
		go func() { _ = p.release(h.side, h.state) }()
		return
	}
	if err := p.release(h.side, h.state); err != nil && p.alive() {
		r.t.Errorf("release %s:%s: %v", h.side, h.state, err)
	}
}

// apply applies a fault.
func (r *cellRun) apply(f string) {
	px := r.link.proxy
	switch f {
	case fCut:
		px.Cut()
	case fStall:
		px.Stall()
	case fCorruptFwd:
		px.Corrupt(fault.Forward)
	case fCorruptBack:
		px.Corrupt(fault.Backward)
	case fTrickle:
		px.Trickle(trickleBytes, trickleEvery)
	case fResetFwd, fResetBack:
		// A reset acts on open links: held where the source has just
		// connected (outgoing:active), the proxy may still be dialling
		// the destination (or, for exec, the source's command may not
		// have connected yet). Wait, bounded, for the link.
		ctx, cancel := context.WithTimeout(context.Background(), r.bound)
		err := px.WaitLinked(ctx, 1)
		cancel()
		if err != nil {
			r.t.Fatalf("%s: no link to reset within %v: %v", f, r.bound, err)
		}
		if f == fResetFwd {
			px.ResetOneWay(fault.Forward)
		} else {
			px.ResetOneWay(fault.Backward)
		}
	case fKillSrc:
		r.src.kill()
	case fKillDst:
		r.dst.kill()
	case fStopSrc:
		r.src.stop()
		r.stoppedProc = r.src
	case fStopDst:
		r.dst.stop()
		r.stoppedProc = r.dst
	case fWriteFails:
		var old unix.Rlimit
		if err := unix.Prlimit(r.src.cmd.Process.Pid, unix.RLIMIT_FSIZE, nil, &old); err != nil {
			r.t.Fatal(err)
		}
		low := unix.Rlimit{Cur: 256 << 10, Max: old.Max}
		if err := unix.Prlimit(r.src.cmd.Process.Pid, unix.RLIMIT_FSIZE, &low, nil); err != nil {
			r.t.Fatal(err)
		}
		r.fsizeOld = &old
	default:
		r.t.Fatalf("unknown fault %s", f)
	}
}

// judged is a live process and the side it is judged on.
type judged struct {
	p    *proc
	side string
}

// sides lists the live processes and the side each is judged on.
func (r *cellRun) sides() []judged {
	var out []judged
	if r.src.alive() {
		out = append(out, judged{r.src, spec.Outgoing})
	}
	if r.dst != nil && r.dst.alive() {
		out = append(out, judged{r.dst, spec.Incoming})
	}
	return out
}

// settle waits, within the bound, for every surviving side to reach a
// terminal or operator-wait state: first the side a stop fault did not
// stop (then the stopped one is continued), then all of them; stalls and
// trickles are healed only once they did.
func (r *cellRun) settle() {
	if !r.reached {
		return
	}
	t := r.t
	waitSide := func(p *proc, side string) {
		t.Helper()
		if !p.waitFor(r.bound, func() bool { return r.settled(side, p.state[side]) }) && p.alive() {
			r.errorf("the %s's %s side did not reach a terminal or operator-wait state within %v of the fault: it is in %s (deadlines from migctl: %v)",
				p.role, side, r.bound, p.sideState(side), r.deadlines)
		}
	}
	if sp := r.stoppedProc; sp != nil {
		for _, s := range r.sides() {
			if s.p != sp {
				waitSide(s.p, s.side)
			}
		}
		sp.cont()
		r.stoppedProc = nil
	}
	for _, s := range r.sides() {
		waitSide(s.p, s.side)
	}
	if r.link.proxy != nil {
		// What a stall held now reaches a side: settle again once it is
		// delivered.
		r.link.proxy.Heal()
		ctx, cancel := context.WithTimeout(context.Background(), r.bound)
		err := r.link.proxy.Drain(ctx)
		cancel()
		if err != nil {
			r.errorf("the proxy did not deliver what the stall held within %v: %v", r.bound, err)
		}
		for _, s := range r.sides() {
			waitSide(s.p, s.side)
		}
	}
	if r.fsizeOld != nil && r.src.alive() {
		_ = unix.Prlimit(r.src.cmd.Process.Pid, unix.RLIMIT_FSIZE, r.fsizeOld, nil)
	}
}

// settled is the package's settled, except that a destination still
// listening after the proxy forwarded it bytes has a connection it has not
// taken yet: it is not settled there.
func (r *cellRun) settled(side, state string) bool {
	if side == spec.Incoming && state == sListening && r.link.proxy != nil && r.link.proxy.Forwarded(fault.Forward) > 0 {
		return false
	}
	return settled(side, state)
}

// finals reads each surviving side's state from the process itself.
func (r *cellRun) finals() (src, dst string) {
	src, dst = "killed", "killed"
	if r.dst == nil {
		dst = "-"
	}
	for _, s := range r.sides() {
		var mi qmp.MachineInfo
		if err := s.p.query("query-migctl-machine", nil, &mi); err != nil {
			r.t.Fatal(err)
		}
		if s.side == spec.Outgoing {
			src = mi.Outgoing.State
		} else {
			dst = mi.Incoming.State
		}
	}
	return src, dst
}

func (r *cellRun) check() {
	if !r.reached {
		return
	}
	src, dst := r.finals()
	r.res.Src, r.res.Dst = src, dst
	if src != "killed" && !slices.Contains(r.row.src, src) {
		r.errorf("source ended %s; the table allows %v (%s)", src, r.row.src, r.row.why)
	}
	if dst != "killed" && dst != "-" && !slices.Contains(r.row.dst, dst) {
		r.errorf("destination ended %s; the table allows %v (%s)", dst, r.row.dst, r.row.why)
	}
	if r.src.alive() {
		r.checkSource(src)
	}
	if r.dst != nil && r.dst.alive() {
		r.checkDestinationRanOnGo()
	}
}

// checkSource: a source that failed or was cancelled runs its guest again,
// intact; one that completed or does not know the outcome never runs it
// on its own, and its memory is intact too.
func (r *cellRun) checkSource(final string) {
	t := r.t
	var rs qmp.RunState
	if err := r.src.query("query-status", nil, &rs); err != nil {
		t.Fatal(err)
	}
	switch final {
	case sFailed, sCancelled:
		if !rs.Running {
			r.errorf("the source ended %s but its guest is %s, not running again", final, rs.Status)
		}
	case sCompleted, sUnknown:
		if rs.Running {
			r.errorf("the source ended %s but runs its guest (%s): after the commit it must never resume on its own", final, rs.Status)
		}
	}
	if rs.Running {
		if err := r.src.query("stop", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.src.query("x-migctl-verify-guest", nil, nil); err != nil {
		r.errorf("the source's guest after the fault: %v", err)
	}
	if rs.Running {
		if err := r.src.query("cont", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// checkDestinationRanOnGo: a live destination's guest ran only after its
// incoming side reached completed by complete (the source's go, or the
// end of a one-way stream) — never otherwise, whatever happened to the
// source. (A killed destination's last events may never have reached the
// test; its run log still counts for the overlap check.)
func (r *cellRun) checkDestinationRanOnGo() {
	spans, err := guest.ReadRunLog(r.dst.runLog)
	if err != nil {
		r.t.Fatal(err)
	}
	if len(spans) == 0 {
		return
	}
	// settle waited for the side's final state by its events, so the
	// move into completed, if any, is in.
	r.dst.mu.Lock()
	defer r.dst.mu.Unlock()
	for _, m := range r.dst.moves {
		if m.Side == spec.Incoming && m.To == sCompleted && m.Trigger == "complete" {
			return
		}
	}
	r.errorf("the destination's guest ran (%d intervals) without its incoming side completing on the source's go (moves %+v)", len(spans), r.dst.moves)
}

// followUp: a migration from the surviving source to a new destination
// completes. The old destination is killed first, which makes
// destination-gone true.
func (r *cellRun) followUp() {
	t := r.t
	if !r.reached || !r.src.alive() || t.Failed() {
		return
	}
	if r.c.Transport == "file" {
		r.restore()
	}
	if r.dst != nil {
		r.dst.kill()
	}
	if r.src.sideState(spec.Outgoing) == sUnknown {
		if err := r.src.query("x-migctl-resolve-switchover", map[string]any{"destination-gone": true}, nil); err != nil {
			t.Fatalf("resolve the unknown outcome: %v", err)
		}
		if !r.src.waitFor(r.bound, func() bool { return r.src.state[spec.Outgoing] == sFailed }) {
			t.Fatalf("after destination-gone the source is %s, want failed", r.src.sideState(spec.Outgoing))
		}
	}
	var rs qmp.RunState
	if err := r.src.query("query-status", nil, &rs); err != nil {
		t.Fatal(err)
	}
	if !rs.Running {
		if err := r.src.query("cont", nil, nil); err != nil {
			t.Fatalf("cont on the source (%s): %v", rs.Status, err)
		}
	}
	if len(capsOf(r.c)) > 0 {
		// The follow-up is a plain migration: nobody continues it.
		var list []map[string]any
		for _, name := range capsOf(r.c) {
			list = append(list, map[string]any{"capability": name, "state": false})
		}
		if err := r.src.query("migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
			t.Fatal(err)
		}
	}
	r.newDst = startProc(t, r.dir, "new destination", true, nil)
	r.migrateTo(r.newDst, "unix:"+r.dir+"/new.mig")
}

// restore loads a completed save into the destination (file cells).
func (r *cellRun) restore() {
	if r.src.sideState(spec.Outgoing) != sCompleted {
		return
	}
	r.dst = startProc(r.t, r.dir, "destination", true, nil)
	r.configure(r.dst)
	if err := r.dst.query("migrate-incoming", map[string]any{"uri": r.link.dstURI, "exit-on-error": false}, nil); err != nil {
		r.t.Fatal(err)
	}
	if !r.dst.waitFor(r.bound+holdBound, func() bool { return terminal(spec.Incoming, r.dst.state[spec.Incoming]) }) ||
		r.dst.sideState(spec.Incoming) != sCompleted {
		r.t.Fatalf("restoring the completed save: the destination is %s", r.dst.sideState(spec.Incoming))
	}
}

// migrateTo migrates the source to a new destination over uri and checks
// the new guest.
func (r *cellRun) migrateTo(dst *proc, uri string) {
	t := r.t
	if err := dst.query("migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
		t.Fatal(err)
	}
	r.src.mu.Lock()
	r.src.moves = nil
	r.src.mu.Unlock()
	if err := r.src.query("migrate", map[string]any{"uri": uri}, nil); err != nil {
		t.Fatalf("migrate to a new destination: %v", err)
	}
	bound := r.bound + holdBound
	if !dst.waitFor(bound, func() bool { return terminal(spec.Incoming, dst.state[spec.Incoming]) }) ||
		!r.src.waitFor(bound, func() bool {
			return settled(spec.Outgoing, r.src.state[spec.Outgoing]) && r.src.enteredLocked(spec.Outgoing, sCompleted)
		}) {
		t.Fatalf("migration to a new destination: source %s, new destination %s", r.src.sideState(spec.Outgoing), dst.sideState(spec.Incoming))
	}
	if st := dst.sideState(spec.Incoming); st != sCompleted {
		t.Fatalf("the new destination ended %s", st)
	}
	if err := dst.query("stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := dst.query("x-migctl-verify-guest", nil, nil); err != nil {
		r.errorf("the new destination's guest: %v", err)
	}
}

// teardown ends every process and checks, over the whole run, that no
// two guests ever ran at once.
func (r *cellRun) teardown() {
	procs := []*proc{r.src, r.dst, r.newDst}
	var wg sync.WaitGroup
	for _, p := range procs {
		if p != nil {
			wg.Go(p.shutdown)
		}
	}
	wg.Wait()
	for _, p := range procs {
		if p != nil && strings.Contains(p.out.String(), "WARNING: DATA RACE") {
			r.errorf("the race detector reported a data race in the %s (migctl built with -race):\n%s", p.role, p.out.String())
		}
	}
	if r.link != nil {
		r.link.close()
	}
	var logs [][]guest.Span
	var names []string
	for _, p := range procs {
		if p == nil {
			continue
		}
		sp, err := p.spans()
		if err != nil {
			r.t.Error(err)
			continue
		}
		logs, names = append(logs, sp), append(names, p.role)
	}
	for i := range logs {
		for j := i + 1; j < len(logs); j++ {
			for _, a := range logs[i] {
				for _, b := range logs[j] {
					if a.Start < b.Stop && b.Start < a.Stop {
						r.errorf("two guests ran at once: the %s's [%d, %d] and the %s's [%d, %d] (CLOCK_MONOTONIC ns; overlap %v)",
							names[i], a.Start, a.Stop, names[j], b.Start, b.Stop, time.Duration(min(a.Stop, b.Stop)-max(a.Start, b.Start)))
					}
				}
			}
		}
	}
	if r.t.Failed() {
		for _, p := range procs {
			if p != nil {
				p.mu.Lock()
				r.t.Logf("%s moves: %+v\n%s output:\n%s", p.role, p.moves, p.role, p.out.String())
				p.mu.Unlock()
			}
		}
	}
}
