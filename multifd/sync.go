package multifd

import (
	"context"
	"fmt"
	"sync"

	"github.com/migctl/migctl/stream"
)

// FlushMode says which main-channel RAM record is the per-pass barrier.
type FlushMode uint8

const (
	// FlushPerPass: a MULTIFD_FLUSH record (be64 0x200) after setup and
	// after each full pass of the dirty bitmap (QEMU >= 8.1 with its default
	// multifd-flush-after-each-section=off; the property is on for machine
	// types <= 8.0). EOS is not a barrier.
	FlushPerPass FlushMode = iota
	// FlushPerSection: every EOS of the RAM section is the barrier (QEMU 7.2,
	// and newer QEMU with multifd-flush-after-each-section=on). No 0x200
	// record is sent.
	FlushPerSection
)

// IsSyncPoint reports whether a main-channel RAM record is the point where
// the destination's main thread must wait for every channel's sync packet
// (multifd_recv_sync_main) before reading on:
//
//	record            FlushPerPass   FlushPerSection
//	MULTIFD_FLUSH     yes            no (not sent; tolerated)
//	EOS               no             yes
//	anything else     no             no
func IsSyncPoint(m FlushMode, k stream.Kind) bool {
	switch k {
	case stream.KindFlush:
		return m == FlushPerPass
	case stream.KindEOS:
		return m == FlushPerSection
	}
	return false
}

// RecvSync is the destination's per-pass barrier between the main thread
// and the channel readers, as QEMU's multifd_recv_sync_main: a channel that
// reads a sync packet (after applying that packet's pages) calls Arrive and
// blocks; the main thread, at a sync point of the main stream (IsSyncPoint),
// calls Wait, which returns once every channel has arrived and releases them
// together. So no channel applies pages of pass n+1 before every channel
// has applied pass n and the main stream reached the barrier, and the main
// stream is not read past the barrier before pass n is complete.
//
// The source does not wait for the destination: it only drains its own
// channels (each writes its sync packet after its queued packets) before it
// writes the FLUSH record; nothing is acknowledged on the wire.
//
// Every wait is bounded by its context. A RecvSync is shared by the main
// goroutine and the channel goroutines; its state is guarded by mu.
type RecvSync struct {
	channels int

	mu      sync.Mutex
	arrived int           // channels waiting in the current round
	release chan struct{} // closed to release the current round
	full    chan struct{} // closed when arrived reaches channels
}

// NewRecvSync returns a barrier for n channels.
func NewRecvSync(n int) *RecvSync {
	return &RecvSync{channels: n, release: make(chan struct{}), full: make(chan struct{})}
}

// Arrive is called by channel ch's reader when it reads a sync packet. It
// returns when the main thread releases the round, or with ctx's error.
func (s *RecvSync) Arrive(ctx context.Context, ch int) error {
	s.mu.Lock()
	if s.arrived >= s.channels {
		s.mu.Unlock()
		return fmt.Errorf("multifd: channel %d sent a second sync packet before the main stream's barrier: more sync packets than channels", ch)
	}
	s.arrived++
	release := s.release
	if s.arrived == s.channels {
		close(s.full)
	}
	s.mu.Unlock()
	select {
	case <-release:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("multifd: channel %d waiting at the sync barrier: %w", ch, context.Cause(ctx))
	}
}

// Wait is called by the main thread at a sync point. It returns once every
// channel has arrived, releasing them, or with ctx's error.
func (s *RecvSync) Wait(ctx context.Context) error {
	s.mu.Lock()
	full := s.full
	s.mu.Unlock()
	select {
	case <-full:
	case <-ctx.Done():
		s.mu.Lock()
		n := s.arrived
		s.mu.Unlock()
		return fmt.Errorf("multifd: main stream waiting at the sync barrier (%d of %d channels arrived): %w", n, s.channels, context.Cause(ctx))
	}
	s.mu.Lock()
	close(s.release)
	s.arrived = 0
	s.release = make(chan struct{})
	s.full = make(chan struct{})
	s.mu.Unlock()
	return nil
}
