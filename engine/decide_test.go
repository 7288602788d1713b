package engine

import (
	"testing"
	"time"
)

// throttleStep against QEMU's migration_trigger_throttle and
// mig_throttle_guest_down (migration/ram.c), worked by hand: a period is
// high when dirtied > sent × threshold / 100; every second high period
// (the count is not reset by a low one) starts the throttle at the initial
// value or raises it by the increment — with tailslow by
// min(cpu_now - cpu_now × threshold_bytes / dirtied, increment) — capped at
// max-cpu-throttle; QEMU keeps the throttle within 1..99.
func TestThrottleStep(t *testing.T) {
	def := throttleParams{Threshold: 50, Initial: 20, Increment: 10, Max: 99}
	for _, tc := range []struct {
		name          string
		p             throttleParams
		current       uint64
		high          int
		dirtied, sent uint64
		wantNext      uint64
		wantHigh      int
	}{
		{"low period: nothing", def, 0, 0, 50, 100, 0, 0},
		{"exactly the threshold is low", def, 0, 1, 50, 100, 0, 1},
		{"first high period only counts", def, 0, 0, 51, 100, 0, 1},
		{"second high period starts at initial", def, 0, 1, 51, 100, 20, 0},
		{"a low period does not reset the count", def, 0, 1, 10, 100, 0, 1},
		{"then raises by the increment", def, 20, 1, 200, 100, 30, 0},
		{"capped at max-cpu-throttle", throttleParams{Threshold: 50, Initial: 20, Increment: 10, Max: 35}, 30, 1, 200, 100, 35, 0},
		{"initial above max is capped", throttleParams{Threshold: 50, Initial: 60, Increment: 10, Max: 40}, 0, 1, 200, 100, 40, 0},
		{"threshold 100%: dirtied must exceed sent", throttleParams{Threshold: 100, Initial: 20, Increment: 10, Max: 99}, 0, 1, 100, 100, 0, 1},
		// tailslow: cpu_now = 100-40 = 60; threshold_bytes = 1000*50/100 = 500;
		// cpu_ideal = 60 × 500/600 = 50; inc = min(60-50, 10) = 10.
		{"tailslow, far from the threshold", throttleParams{Threshold: 50, Initial: 20, Increment: 10, Max: 99, Tailslow: true}, 40, 1, 600, 1000, 50, 0},
		// cpu_now = 60; cpu_ideal = 60 × 500/520 = 57.69 → 57; inc = min(3, 10) = 3.
		{"tailslow, near the threshold", throttleParams{Threshold: 50, Initial: 20, Increment: 10, Max: 99, Tailslow: true}, 40, 1, 520, 1000, 43, 0},
		{"tailslow does not change the start", throttleParams{Threshold: 50, Initial: 20, Increment: 10, Max: 99, Tailslow: true}, 0, 1, 520, 1000, 20, 0},
		{"never beyond QEMU's 99", throttleParams{Threshold: 50, Initial: 20, Increment: 10, Max: 99}, 95, 1, 200, 100, 99, 0},
	} {
		next, high := throttleStep(tc.p, tc.current, tc.high, tc.dirtied, tc.sent)
		if next != tc.wantNext || high != tc.wantHigh {
			t.Errorf("%s: throttleStep(current %d, high %d, dirtied %d, sent %d) = %d, %d; want %d, %d",
				tc.name, tc.current, tc.high, tc.dirtied, tc.sent, next, high, tc.wantNext, tc.wantHigh)
		}
	}
}

// TestExpectedDowntime: the switchover decision's bandwidth is the send
// rate, lowered to the absorption rate the destination's PONGs showed,
// replaced by avail-switchover-bandwidth when set (QEMU 8.2's
// migration_update_counters: "switchover_bw" overrides the estimate).
func TestExpectedDowntime(t *testing.T) {
	const mb = 1e6
	for _, tc := range []struct {
		name                  string
		remaining             uint64
		sent, absorbed, avail float64
		wantBW                float64
		wantExpected          time.Duration
	}{
		{"send rate alone", 100 * mb, 1000 * mb, 0, 0, 1000 * mb, 100 * time.Millisecond},
		{"the destination absorbs less", 100 * mb, 1000 * mb, 500 * mb, 0, 500 * mb, 200 * time.Millisecond},
		{"the destination absorbs more (buffers drained faster than sent)", 100 * mb, 500 * mb, 1000 * mb, 0, 500 * mb, 200 * time.Millisecond},
		{"only the absorption is known", 100 * mb, 0, 250 * mb, 0, 250 * mb, 400 * time.Millisecond},
		{"the operator's figure wins", 100 * mb, 1000 * mb, 500 * mb, 100 * mb, 100 * mb, time.Second},
		{"nothing known", 100 * mb, 0, 0, 0, 0, 0},
	} {
		bw, exp := expectedDowntime(tc.remaining, tc.sent, tc.absorbed, tc.avail)
		if bw != tc.wantBW || exp != tc.wantExpected {
			t.Errorf("%s: bandwidth %.0f, expected %v; want %.0f, %v", tc.name, bw, exp, tc.wantBW, tc.wantExpected)
		}
	}
}
