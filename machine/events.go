package machine

import (
	"sync/atomic"
	"time"
)

// Event kinds.
const (
	EventState  = "state"  // a side changed state
	EventConfig = "config" // configuration changed
	EventPass   = "pass"   // the outgoing side started a new dirty-sync pass
	EventStats  = "stats"  // new statistics were published
)

// Event is what subscribers receive.
type Event struct {
	Kind    string
	Time    time.Time
	Side    string // empty for configuration events
	From    string
	To      string
	Trigger string
	Detail  string
	// Pass is the dirty-sync count for EventPass.
	Pass uint64
	// Stats is set for EventStats.
	Stats *Stats
}

// Subscription delivers events on a bounded channel. A subscriber that
// does not keep up loses events (counted by Dropped); it never slows the
// controller.
type Subscription struct {
	c       *Controller
	ch      chan Event
	closed  bool // guarded by Controller.mu
	dropped atomic.Uint64
}

// Subscribe returns a subscription with room for buf undelivered events
// (at least 1).
func (c *Controller) Subscribe(buf int) *Subscription {
	if buf < 1 {
		buf = 1
	}
	s := &Subscription{c: c, ch: make(chan Event, buf)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		s.closed = true
		close(s.ch)
		return s
	}
	c.subs[s] = struct{}{}
	return s
}

// C returns the event channel; it is closed by Close (or the controller's
// Close).
func (s *Subscription) C() <-chan Event { return s.ch }

// Dropped returns how many events were lost because the channel was full.
func (s *Subscription) Dropped() uint64 { return s.dropped.Load() }

// Close ends the subscription and closes its channel.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	delete(s.c.subs, s)
	s.closeLocked()
}

func (s *Subscription) closeLocked() {
	if !s.closed {
		s.closed = true
		close(s.ch)
	}
}

// publish delivers ev to every subscriber without blocking; the caller
// holds c.mu.
func (c *Controller) publish(ev Event) {
	for s := range c.subs {
		select {
		case s.ch <- ev:
		default:
			s.dropped.Add(1)
		}
	}
}

// Stats are a side's migration statistics, shaped after QMP's
// query-migrate (MigrationInfo and its ram member). Times are durations;
// byte counts are bytes.
type Stats struct {
	Transferred      uint64  // bytes sent or received so far
	Remaining        uint64  // bytes still dirty
	Total            uint64  // guest RAM size
	Duplicate        uint64  // zero pages
	Normal           uint64  // full pages
	NormalBytes      uint64  // bytes of full pages
	DirtyPagesRate   uint64  // pages dirtied per second (last pass)
	Mbps             float64 // throughput in megabits per second
	DirtySyncCount   uint64  // passes so far
	PageSize         uint64
	PagesPerSecond   uint64
	PrecopyBytes     uint64
	DowntimeBytes    uint64
	ExpectedDowntime time.Duration
	Downtime         time.Duration // measured; set on completion
	SetupTime        time.Duration
	TotalTime        time.Duration
	// Checksum is the guest digest at switchover (source) or after load
	// (destination), 0 when unknown. Used by the demo to verify.
	Checksum uint64
}

// PublishStats stores a side's latest statistics and tells subscribers.
// The data plane calls it outside its I/O; it takes the lock briefly.
func (c *Controller) PublishStats(sideName string, st Stats) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return err
	}
	sd.stats = st
	cp := st
	c.publish(Event{Kind: EventStats, Time: c.opts.Now(), Side: sideName, Stats: &cp})
	return nil
}

// PublishPass announces a new dirty-sync pass (QMP's MIGRATION_PASS).
func (c *Controller) PublishPass(sideName string, pass uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return err
	}
	sd.stats.DirtySyncCount = pass
	c.publish(Event{Kind: EventPass, Time: c.opts.Now(), Side: sideName, Pass: pass})
	return nil
}

// Locked runs fn under the controller lock. The destination's loader uses
// it around a device Load that NeedsLock; fn must not block on I/O.
func (c *Controller) Locked(fn func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fn()
}
