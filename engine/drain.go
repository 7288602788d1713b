package engine

import (
	"context"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// What the destination has absorbed, learnt from PONGs.
//
// Every PING the source sends (keepalives between sections, and the drain
// before the stop) records how many bytes it had written when it sent it;
// the destination answers PONG only once it has read — and applied —
// everything before the PING (with multifd, its FLUSH waits for every
// channel first). So a PONG tells the source how far the destination has
// got, and two PONGs how fast it absorbs: that rate, not the rate at which
// the kernel accepted bytes into socket buffers, is what the switchover
// decision must use, and the drain before the stop waits for the last
// PING's PONG so the stop-copy phase moves only what is dirty, not
// megabytes still queued in buffers.

// pingLog is shared by the migration goroutine (which sends PINGs) and the
// return-path reader (which reads PONGs); mu guards it.
type pingLog struct {
	mu          sync.Mutex
	sent        map[uint32]uint64 // PING value → bytes written when it was flushed
	ackedBytes  uint64            // bytes the destination has absorbed (the latest PONG)
	anchorBytes uint64            // where the current rate window starts
	anchorAt    time.Time

	rate atomic.Uint64 // absorbed bytes/s, math.Float64bits; 0 until known

	last   atomic.Uint32 // the highest PONG value seen
	notify chan struct{} // 1-buffered: a PONG arrived
}

func newPingLog() *pingLog {
	return &pingLog{sent: map[uint32]uint64{}, notify: make(chan struct{}, 1)}
}

// sentPing records that PING v left with bytes written so far.
func (p *pingLog) sentPing(v uint32, bytes uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sent[v] = bytes
}

// A rate is measured over at least minRateWindow and minRateBytes: a
// window in which the source hardly sent says nothing of the destination.
const (
	minRateWindow = 20 * time.Millisecond
	minRateBytes  = 1 << 20
)

// pong records PONG v, read at now (called by the return-path reader).
func (p *pingLog) pong(v uint32, now time.Time) {
	p.mu.Lock()
	if bytes, ok := p.sent[v]; ok {
		for k := range p.sent {
			if k <= v {
				delete(p.sent, k)
			}
		}
		p.ackedBytes = max(p.ackedBytes, bytes)
		switch dt := now.Sub(p.anchorAt); {
		case p.anchorAt.IsZero() || bytes <= p.anchorBytes:
			// The first PONG, or nothing new: the window starts here.
			p.anchorBytes, p.anchorAt = max(p.anchorBytes, bytes), now
		case dt >= minRateWindow && bytes-p.anchorBytes >= minRateBytes:
			p.rate.Store(math.Float64bits(float64(bytes-p.anchorBytes) / dt.Seconds()))
			p.anchorBytes, p.anchorAt = bytes, now
		}
	}
	p.mu.Unlock()
	if v > p.last.Load() {
		p.last.Store(v)
	}
	select {
	case p.notify <- struct{}{}:
	default:
	}
}

// absorbed returns the destination's absorption rate in bytes/s, 0 while
// unknown.
func (p *pingLog) absorbed() float64 { return math.Float64frombits(p.rate.Load()) }

// backlog returns how many written bytes the destination has not
// acknowledged yet, given the bytes written now.
func (p *pingLog) backlog(written uint64) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if written < p.ackedBytes {
		return 0
	}
	return written - p.ackedBytes
}

// ping sends PING now (not waiting for the keepalive interval) and
// records it.
func (s *sender) ping() (uint32, error) {
	s.lastPing = time.Now()
	s.pingSeq++
	if err := s.enc.Ping(s.pingSeq); err != nil {
		return 0, err
	}
	if err := s.enc.Flush(); err != nil {
		return 0, err
	}
	s.pings.sentPing(s.pingSeq, s.moved())
	return s.pingSeq, nil
}

// drain waits, with the guest still running, until the destination has
// absorbed everything written so far (a PING and its PONG), so that the
// stop-copy phase moves only the pages dirtied since. Bounded by the
// migration's context (a cancel, a stall, a yank) and by
// x-migctl-io-timeout through the watchdog; it returns at once without a
// return path or with Options.NoDrain.
func (s *sender) drain() error {
	if s.rp == nil || s.m.opts.NoDrain {
		return nil
	}
	v, err := s.ping()
	if err != nil {
		return err
	}
	for s.pings.last.Load() < v {
		select {
		case <-s.pings.notify:
		case ev, ok := <-s.rp:
			if err := s.beforeSwitchover(ev, ok); err != nil {
				return err
			}
		case <-s.m.ioCtx.Done():
			return context.Cause(s.m.ioCtx)
		}
	}
	return nil
}
