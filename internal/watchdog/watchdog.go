// Package watchdog ends a migration whose peer went silent. Each side of a
// migration feeds its Dog with every piece of evidence that the peer is
// alive (a keepalive, a return-path message, a record loaded, bytes a
// one-way channel accepted); Run watches the silence between feeds,
// reports a stall once two keepalive intervals passed without one, and
// calls the timeout once the silence reaches the io-timeout. The side
// decides what a timeout means (failed before the switchover commit, an
// unknown outcome after it): the Dog only measures.
package watchdog

import (
	"context"
	"sync/atomic"
	"time"
)

// Dog measures how long a peer has been silent. Feed, Pause and Silent are
// safe from any goroutine; Run belongs to one.
type Dog struct {
	clock  func() time.Duration // monotonic time since the Dog was made
	last   atomic.Int64         // clock() at the last feed
	paused atomic.Int32         // > 0: the side does local work and expects nothing
}

// New returns a Dog fed now.
func New() *Dog {
	base := time.Now()
	return newDog(func() time.Duration { return time.Since(base) })
}

// newDog returns a Dog reading clock (tests pass a manual one).
func newDog(clock func() time.Duration) *Dog {
	d := &Dog{clock: clock}
	d.Feed()
	return d
}

// Feed records evidence that the peer is alive.
func (d *Dog) Feed() { d.last.Store(int64(d.clock())) }

// Pause stops counting silence while the side itself is busy with local
// work during which it expects nothing from the peer (saving devices,
// syncing a file); resume feeds the Dog and counts again. Pauses nest.
func (d *Dog) Pause() (resume func()) {
	d.paused.Add(1)
	return func() {
		d.Feed()
		d.paused.Add(-1)
	}
}

// Silent returns how long the peer has been silent (0 while paused).
func (d *Dog) Silent() time.Duration {
	if d.paused.Load() > 0 {
		return 0
	}
	return d.clock() - time.Duration(d.last.Load())
}

// Limits are the watch's live settings, re-read at every tick:
// x-migctl-keepalive and x-migctl-io-timeout.
type Limits struct {
	Keepalive time.Duration // how often the peer proves it is alive
	Timeout   time.Duration // the longest silence survived; 0: never time out
}

// Watch is what Run reports to.
type Watch struct {
	// Limits returns the current settings (called at every tick).
	Limits func() Limits
	// Stalled is called when the silence first exceeds two keepalive
	// intervals (since: when the peer was last heard), and with the zero
	// time when the peer is heard again. May be nil.
	Stalled func(since time.Time)
	// Timeout is called once, when the silence reaches Limits.Timeout; Run
	// returns after it.
	Timeout func(silent time.Duration)
}

// Run watches until ctx ends or the timeout fired. It ticks every half
// keepalive interval (between 5 ms and 500 ms).
func (d *Dog) Run(ctx context.Context, w Watch) {
	stalled := false
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		l := w.Limits()
		silent := d.Silent()
		if l.Keepalive > 0 {
			now := silent >= 2*l.Keepalive
			if now != stalled && w.Stalled != nil {
				if now {
					w.Stalled(time.Now().Add(-silent))
				} else {
					w.Stalled(time.Time{})
				}
			}
			stalled = now
		}
		if l.Timeout > 0 && silent >= l.Timeout {
			w.Timeout(silent)
			return
		}
		t.Reset(min(max(l.Keepalive/2, 5*time.Millisecond), 500*time.Millisecond))
	}
}
