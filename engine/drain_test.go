package engine

import (
	"testing"
	"time"
)

// TestAbsorbedRate: the destination's absorption rate comes from PONGs —
// bytes acknowledged between two of them over the time between — and
// only from windows in which the source sent at least a MiB: an idle
// stretch neither lowers it nor counts in the next window. Expected rates
// are worked out by hand in each row.
func TestAbsorbedRate(t *testing.T) {
	const mib = 1 << 20
	t0 := time.Unix(1000, 0)
	p := newPingLog()
	steps := []struct {
		ping      uint32
		bytes     uint64 // written when the PING left
		at        time.Duration
		wantRate  float64 // bytes/s after the PONG
		wantAcked uint64
	}{
		{2, 0, 0, 0, 0}, // the first PONG anchors the window
		{3, 10 * mib, 100 * time.Millisecond, 100 * mib, 10 * mib},              // 10 MiB in 100 ms
		{4, 10 * mib, time.Second, 100 * mib, 10 * mib},                         // idle 900 ms: nothing new, the window moves
		{5, 10*mib + mib/2, 1100 * time.Millisecond, 100 * mib, 10*mib + mib/2}, // half a MiB: too little to judge
		{6, 12 * mib, 1200 * time.Millisecond, 10 * mib, 12 * mib},              // 2 MiB in the 200 ms since the window moved
		{7, 13 * mib, 1210 * time.Millisecond, 10 * mib, 13 * mib},              // 10 ms: too short to judge
	}
	for _, st := range steps {
		p.sentPing(st.ping, st.bytes)
		p.pong(st.ping, t0.Add(st.at))
		if got := p.absorbed(); got != st.wantRate {
			t.Fatalf("after PONG(%d): rate %.0f B/s, want %.0f", st.ping, got, st.wantRate)
		}
		if got := p.backlog(st.bytes + 7); got != 7 {
			t.Fatalf("after PONG(%d): backlog of 7 more bytes written is %d", st.ping, got)
		}
		if p.ackedBytes != st.wantAcked {
			t.Fatalf("after PONG(%d): acknowledged %d, want %d", st.ping, p.ackedBytes, st.wantAcked)
		}
	}
	// A PONG for a PING never recorded (a peer's stray answer) changes
	// nothing but the highest value seen.
	p.pong(99, t0.Add(2*time.Second))
	if p.absorbed() != 10*mib || p.ackedBytes != 13*mib || p.last.Load() != 99 {
		t.Fatalf("a stray PONG: rate %.0f, acked %d, last %d", p.absorbed(), p.ackedBytes, p.last.Load())
	}
}
