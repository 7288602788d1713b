package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// progressSnap is one reading of an outgoing migration's progress, from
// whichever source the command has: the demo's controller events or a
// serve's query-migrate.
type progressSnap struct {
	// Status is the state to show (QMP's MigrationStatus or the machine's
	// state name).
	Status string
	// Pass is the dirty-sync count: 1 during the first pass over RAM.
	Pass                          uint64
	Transferred, Remaining, Total uint64
	// Rate is the throughput in bytes per second.
	Rate             float64
	ExpectedDowntime time.Duration
}

// progress is the one progress renderer of the command line (demo,
// migrate, and later long commands). On a terminal it draws an mpb bar of
// the RAM sent in this pass with the pass, rate, remaining bytes, expected
// downtime and ETA; elsewhere it prints a plain line every second and at
// each change of status or pass; with --quiet it prints nothing. Lines
// from note go above the bar.
//
// update, note and finish are called from one goroutine (the command's);
// mpb's render goroutine reads the snapshot through the decorators, so
// mu guards cur.
type progress struct {
	w     io.Writer
	quiet bool
	now   func() time.Time

	mu  sync.Mutex
	cur progressView

	// Terminal mode: tty says to draw a bar, created at the first update.
	tty, forceTTY bool
	p             *mpb.Progress
	bar           *mpb.Bar
	// Plain mode.
	lastLine   time.Time
	lastStatus string
	lastPass   uint64
}

// progressView is a snapshot with what the renderer derives from the
// ones before it.
type progressView struct {
	progressSnap
	passStart uint64 // bytes dirty when this pass began: the bar's total
}

func (v progressView) sentThisPass() uint64 {
	if v.Remaining >= v.passStart {
		return 0
	}
	return v.passStart - v.Remaining
}

func (v progressView) percent() float64 {
	if v.passStart == 0 {
		return 0
	}
	return float64(v.sentThisPass()) / float64(v.passStart) * 100
}

// eta is the time to send what is dirty now at the current rate (the
// guest may dirty more meanwhile); ok is false while the rate is unknown.
func (v progressView) eta() (time.Duration, bool) {
	if v.Rate <= 0 {
		return 0, false
	}
	return time.Duration(float64(v.Remaining) / v.Rate * float64(time.Second)), true
}

// newProgress renders on w: a bar when w is a terminal (forceTTY makes
// it one, for tests), plain lines otherwise, nothing when quiet.
func newProgress(w io.Writer, quiet, forceTTY bool) *progress {
	pr := &progress{w: w, quiet: quiet, now: time.Now, tty: !quiet && (forceTTY || isTerminal(w)), forceTTY: forceTTY}
	return pr
}

// startBar creates the bar at the first reading (so that nothing is drawn
// while the command prepares).
func (pr *progress) startBar() {
	forceTTY := pr.forceTTY
	w := pr.w
	pr.p = mpb.New(mpb.WithOutput(w), mpb.WithWidth(100), mpb.WithRefreshRate(150*time.Millisecond),
		mpb.ContainerOptional(mpb.ForceTTY(), forceTTY), mpb.ContainerOptional(mpb.WithAutoRefresh(), forceTTY))
	text := func(fn func(v progressView) string) decor.Decorator {
		return decor.Any(func(decor.Statistics) string {
			pr.mu.Lock()
			defer pr.mu.Unlock()
			return fn(pr.cur)
		})
	}
	pr.bar = pr.p.New(0, mpb.BarStyle().Lbound("[").Rbound("]"),
		mpb.PrependDecorators(
			text(func(v progressView) string { return fmt.Sprintf("%-14s pass %d ", v.Status, v.Pass) }),
		),
		mpb.AppendDecorators(
			text(func(v progressView) string { return " " + progressFields(v) }),
		),
	)
}

// isTerminal reports whether w is a terminal (golang.org/x/term).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressFields is the text both modes show after the status and pass.
func progressFields(v progressView) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%5.1f%%  %s  remaining %s", v.percent(), formatRate(v.Rate), formatBytes(v.Remaining))
	if v.ExpectedDowntime > 0 {
		fmt.Fprintf(&b, "  expected downtime %s", formatDuration(v.ExpectedDowntime))
	}
	if eta, ok := v.eta(); ok {
		fmt.Fprintf(&b, "  ETA %s", formatDuration(eta))
	}
	return b.String()
}

// update takes a new reading.
func (pr *progress) update(s progressSnap) {
	if pr.quiet {
		return
	}
	pr.mu.Lock()
	v := progressView{progressSnap: s, passStart: pr.cur.passStart}
	switch {
	case s.Pass != pr.cur.Pass || v.passStart == 0:
		// A new pass: what is dirty now is what it has to send (the whole
		// RAM in the first).
		v.passStart = s.Remaining
		if s.Pass <= 1 && s.Total > v.passStart {
			v.passStart = s.Total
		}
	case s.Remaining > v.passStart:
		v.passStart = s.Remaining
	}
	pr.cur = v
	pr.mu.Unlock()

	if pr.tty && pr.bar == nil {
		pr.startBar()
	}
	if pr.bar != nil {
		pr.bar.SetTotal(int64(v.passStart), false)
		pr.bar.SetCurrent(int64(v.sentThisPass()))
		return
	}
	now := pr.now()
	if s.Status == pr.lastStatus && s.Pass == pr.lastPass && now.Sub(pr.lastLine) < time.Second {
		return
	}
	pr.lastLine, pr.lastStatus, pr.lastPass = now, s.Status, s.Pass
	if s.Pass == 0 && s.Total == 0 {
		fmt.Fprintln(pr.w, s.Status) // no statistics yet
		return
	}
	fmt.Fprintf(pr.w, "%-14s pass %d  %s\n", s.Status, s.Pass, progressFields(v))
}

// note prints a line for the operator: above the bar on a terminal. It
// prints even with --quiet: notes say what to do, not how far it got.
func (pr *progress) note(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	if !strings.HasSuffix(line, "\n") {
		line += "\n"
	}
	if pr.p != nil {
		_, _ = io.WriteString(pr.p, line)
		return
	}
	_, _ = io.WriteString(pr.w, line)
}

// finish ends the bar (completed when ok, aborted otherwise) and waits
// for its last frame. Call it once.
func (pr *progress) finish(ok bool) {
	if pr.bar == nil {
		return
	}
	if ok {
		pr.bar.SetTotal(-1, true)
	} else {
		pr.bar.Abort(false)
	}
	pr.p.Wait()
}
