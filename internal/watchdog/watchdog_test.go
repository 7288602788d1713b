package watchdog

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The settings of every test; silence is measured on a manual clock that
// the test advances by step at every tick, so what the Dog decides does
// not depend on how fast this machine runs the goroutines.
const (
	ka      = 10 * time.Millisecond
	timeout = 60 * time.Millisecond
	step    = ka / 2
)

type rig struct {
	d      *Dog
	now    atomic.Int64
	ticks  chan struct{}  // one per tick, after the clock advanced
	stalls chan time.Time // Stalled reports
	fired  chan time.Duration
	stop   func()
}

// start runs a Dog whose clock advances by step at each tick; before
// measuring, each tick calls onTick, and each stall report onStall, both
// on the Run goroutine (nil: nothing).
func start(t *testing.T, onTick func(d *Dog), onStall func(since time.Time)) *rig {
	t.Helper()
	r := &rig{ticks: make(chan struct{}, 4096), stalls: make(chan time.Time, 64), fired: make(chan time.Duration, 1)}
	r.d = newDog(func() time.Duration { return time.Duration(r.now.Load()) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.d.Run(ctx, Watch{
			Limits: func() Limits {
				r.now.Add(int64(step))
				if onTick != nil {
					onTick(r.d)
				}
				r.ticks <- struct{}{}
				return Limits{Keepalive: ka, Timeout: timeout}
			},
			Stalled: func(since time.Time) {
				if onStall != nil {
					onStall(since)
				}
				r.stalls <- since
			},
			Timeout: func(s time.Duration) { r.fired <- s },
		})
	}()
	r.stop = func() { cancel(); <-done }
	t.Cleanup(r.stop)
	return r
}

// await waits for n ticks; a timeout meanwhile fails the test (Run
// returns after it, so no tick would come).
func (r *rig) await(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-r.ticks:
		case s := <-r.fired:
			t.Fatalf("timed out after %v of silence", s)
		}
	}
}

// TestSilenceTimesOut: a Dog nobody feeds reports a stall once two
// keepalives were missed, then times out at the timeout, in that order.
func TestSilenceTimesOut(t *testing.T) {
	r := start(t, nil, nil)
	since := <-r.stalls
	if since.IsZero() {
		t.Fatal("the first stall report clears a stall")
	}
	select {
	case s := <-r.fired:
		t.Fatalf("timed out (%v) at the first stall report", s)
	default:
	}
	if s := <-r.fired; s < timeout {
		t.Fatalf("timed out after %v of silence, want at least %v", s, timeout)
	}
}

// TestFedNeverTimesOut: a Dog fed at every tick never stalls nor times
// out, over twice the timeout's worth of ticks.
func TestFedNeverTimesOut(t *testing.T) {
	r := start(t, func(d *Dog) { d.Feed() }, nil)
	r.await(t, 2*int(timeout/step))
	select {
	case s := <-r.fired:
		t.Fatalf("timed out after %v although fed", s)
	case since := <-r.stalls:
		t.Fatalf("stall reported (since %v) although fed", since)
	default:
	}
}

// TestPauseHoldsOff: while the side is busy with local work, silence does
// not count; once it resumes, a silent peer times out again.
func TestPauseHoldsOff(t *testing.T) {
	resumed := make(chan func(), 1)
	paused := false
	r := start(t, func(d *Dog) {
		if !paused { // at the first tick, before anything is measured
			paused = true
			resumed <- d.Pause()
		}
	}, nil)
	resume := <-resumed
	r.await(t, 2*int(timeout/step))
	select {
	case s := <-r.fired:
		t.Fatalf("timed out after %v while paused", s)
	case <-r.stalls:
		t.Fatal("stall reported while paused")
	default:
	}
	resume()
	<-r.fired
}

// TestStallClears: a stall reported is cleared (zero time) once the peer
// is heard again.
func TestStallClears(t *testing.T) {
	heard := false // the peer speaks again from the tick after the first stall report
	r := start(t, func(d *Dog) {
		if heard {
			d.Feed()
		}
	}, func(time.Time) { heard = true })
	if since := <-r.stalls; since.IsZero() {
		t.Fatal("first report clears")
	}
	if since := <-r.stalls; !since.IsZero() {
		t.Fatalf("after a feed the report is %v, want the zero time", since)
	}
	select {
	case s := <-r.fired:
		t.Fatalf("timed out (%v) although heard again", s)
	default:
	}
}
