package machine

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/internal/mutant"
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
	From    State
	To      State
	Trigger Trigger
	Detail  string
	// Pass is the dirty-sync count for EventPass.
	Pass uint64
	// Stats is set for EventStats.
	Stats *Stats
}

// MaxQueued bounds the events a subscription holds for a subscriber that
// does not read: beyond it the subscription is closed with ErrOverflow
// rather than lose a state event. State changes are rare (tens per
// migration), so only a subscriber that stopped reading for good gets
// there.
const MaxQueued = 1 << 16

// ErrOverflow is a subscription's Err when it was closed because its
// subscriber stopped reading (MaxQueued events were waiting).
var ErrOverflow = errors.New("machine: subscription closed: its subscriber stopped reading")

// Subscription delivers events on a channel, in order. State, configuration
// and pass events are never lost: the controller queues them for the
// subscriber without blocking (a slow subscriber never slows the
// controller) and a goroutine of the subscription hands them over. Only
// statistics are lossy: when buf events are already waiting, a new
// statistics event replaces the latest waiting one of the same side, or is
// dropped if there is none (either way one is counted by Dropped).
type Subscription struct {
	c     *Controller
	ch    chan Event
	buf   int
	ready chan struct{} // capacity 1: pokes the pump
	stop  chan struct{} // closed by Close: the pump returns at once
	pdone chan struct{} // closed when the pump has returned

	mu      sync.Mutex // guards the fields below; taken after Controller.mu when both are held
	queue   []Event
	closing bool // no more events: the pump closes ch once the queue is delivered
	err     error

	dropped  atomic.Uint64
	stopOnce sync.Once
}

// Subscribe returns a subscription whose channel has room for buf events
// (at least 1); see Subscription. Call Close when done with it.
func (c *Controller) Subscribe(buf int) *Subscription {
	if buf < 1 {
		buf = 1
	}
	s := &Subscription{c: c, ch: make(chan Event, buf), buf: buf, ready: make(chan struct{}, 1), stop: make(chan struct{}), pdone: make(chan struct{})}
	c.mu.Lock()
	if c.closed {
		s.closing = true
	} else {
		c.subs[s] = struct{}{}
	}
	c.mu.Unlock()
	go s.pump()
	return s
}

// C returns the event channel. It is closed after Close, or after the
// controller's Close once every queued event was delivered.
func (s *Subscription) C() <-chan Event { return s.ch }

// Dropped returns how many statistics events were dropped because the
// subscriber was behind. State, configuration and pass events are never
// dropped.
func (s *Subscription) Dropped() uint64 { return s.dropped.Load() }

// Err returns ErrOverflow if the subscription was closed because its
// subscriber stopped reading, and nil otherwise.
func (s *Subscription) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close ends the subscription: events not yet delivered are discarded and
// the channel is closed. It waits for the subscription's goroutine.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	delete(s.c.subs, s)
	s.c.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	<-s.pdone
}

// closeLocked stops new events; the pump delivers the queue, then closes
// the channel. The caller holds Controller.mu.
func (s *Subscription) closeLocked() {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.poke()
}

func (s *Subscription) poke() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// push queues ev; the caller holds Controller.mu.
func (s *Subscription) push(ev Event) {
	s.mu.Lock()
	switch {
	case s.closing:
		s.mu.Unlock()
		return
	case mutant.LossyEvents && len(s.queue) >= s.buf:
		s.dropped.Add(1)
	case ev.Kind == EventStats && len(s.queue) >= s.buf:
		// One statistics event is lost either way: the waiting one it
		// replaces, or this one.
		s.dropped.Add(1)
		for i := len(s.queue) - 1; i >= 0; i-- {
			if q := &s.queue[i]; q.Kind == EventStats && q.Side == ev.Side {
				*q = ev
				break
			}
		}
	case len(s.queue) >= MaxQueued:
		s.err = ErrOverflow
		s.closing = true
		s.queue = nil
		delete(s.c.subs, s)
	default:
		s.queue = append(s.queue, ev)
	}
	s.mu.Unlock()
	s.poke()
}

// pump hands queued events to the channel in order. It owns the sending
// side of ch.
func (s *Subscription) pump() {
	defer close(s.pdone)
	defer close(s.ch)
	for {
		s.mu.Lock()
		batch, closing := s.queue, s.closing
		s.queue = nil
		s.mu.Unlock()
		for _, ev := range batch {
			select {
			case s.ch <- ev:
			case <-s.stop:
				return
			}
		}
		if len(batch) > 0 {
			continue
		}
		if closing {
			return
		}
		select {
		case <-s.ready:
		case <-s.stop:
			return
		}
	}
}

// publish queues ev for every subscriber without blocking; the caller
// holds c.mu.
func (c *Controller) publish(ev Event) {
	for s := range c.subs {
		s.push(ev)
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
	MultifdBytes     uint64 // bytes sent or received on multifd channels
	ExpectedDowntime time.Duration
	// Downtime is QEMU's downtime: from the source stopping its guest to
	// the source's last byte written (with QEMU's return-path capability
	// on, to the destination's SHUT), set on completion.
	Downtime time.Duration
	// TrueDowntime is the guest's true downtime: from the source stopping
	// its guest to the destination's guest running. When both sides run on
	// the same boot of the same host and speak the commit protocol it is
	// exact (CLOCK_MONOTONIC stamps exchanged in the stream, on both
	// sides; TrueDowntimeExact); otherwise, on the source, an upper bound:
	// until the destination's confirmation arrived (its half round trip
	// more). 0 where nothing measures it (one-way transports: the time
	// until the save was durable; a destination without the source's stop).
	TrueDowntime time.Duration
	// TrueDowntimeExact says TrueDowntime was measured from both sides'
	// monotonic stamps.
	TrueDowntimeExact bool
	// BacklogAtStop (source) is how many bytes written before the guest
	// stopped the destination had not yet absorbed then (not acknowledged
	// by a PONG): queued in socket buffers, they lengthen the downtime.
	// The drain before the stop makes it 0.
	BacklogAtStop uint64
	// ThrottlePercent is auto-converge's current throttle of the source's
	// guest (query-migrate's cpu-throttle-percentage); 0 when inactive.
	ThrottlePercent int
	SetupTime       time.Duration
	TotalTime       time.Duration
	// Checksum is the guest digest at switchover (source) or after load
	// (destination), 0 when unknown. Used by the demo to verify.
	Checksum uint64
	// RDMAProvider names the RDMA provider the migration's channel runs
	// on ("soft", "verbs"); empty when the transport is not rdma: (QMP's
	// x-migctl-rdma-provider).
	RDMAProvider string
	// Postcopy. PostcopyRequests counts page requests (QEMU's
	// postcopy-requests: on the source those it served, on the destination
	// the faults that asked); PostcopyBytes the bytes the source sent after
	// the switch to postcopy.
	PostcopyRequests uint64
	PostcopyBytes    uint64
	// PostcopyBlocktime (destination) is QEMU's postcopy-blocktime: the
	// time every vCPU was blocked on a fault at once; PostcopyVCPUBlocktime
	// the time each vCPU had a fault pending (postcopy-vcpu-blocktime, one
	// per vCPU thread of the guest process); PostcopyLatency the mean
	// latency of a fault served from the source (postcopy-latency). A
	// published slice is never modified afterwards.
	PostcopyBlocktime     time.Duration
	PostcopyVCPUBlocktime []time.Duration
	PostcopyLatency       time.Duration
	// NotConverging (source): x-migctl-convergence-passes passes in a row
	// ended with an expected downtime above downtime-limit (QMP's
	// x-migctl-not-converging).
	NotConverging bool
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

// PublishStalled records that the side's peer has been silent since
// since (the zero time: it is not, or no longer); Status reports it as
// Stalled. It does nothing in a terminal or initial state, so a watchdog
// that reports late never marks the next migration.
func (c *Controller) PublishStalled(sideName string, since time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	sd, err := c.side(sideName)
	if err != nil {
		return err
	}
	if sd.graph.Terminal(sd.state) || sd.state == sd.graph.Initial {
		return nil
	}
	sd.stalled = since
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
