package engine

import "time"

// The engine's decisions that are pure functions of counters and
// parameters, kept apart from its I/O so that each can be tested against a
// table of QEMU's behaviour.

// throttlePeriodLength is how long auto-converge accumulates before it
// judges: QEMU re-evaluates when a dirty-bitmap sync comes at least one
// second after the previous period began (migration_bitmap_sync).
const throttlePeriodLength = time.Second

// throttlePeriod is one auto-converge period's counters.
type throttlePeriod struct {
	start   time.Time
	sent    uint64 // bytes sent in the period
	dirtied uint64 // bytes found dirty at the syncs of the period
	high    int    // periods so far whose dirtying outran the threshold (QEMU's dirty_rate_high_cnt)
}

// throttleParams are the auto-converge parameters, read live.
type throttleParams struct {
	Threshold uint64 // throttle-trigger-threshold, % of the bytes sent
	Initial   uint64 // cpu-throttle-initial, %
	Increment uint64 // cpu-throttle-increment, %
	Max       uint64 // max-cpu-throttle, %
	Tailslow  bool   // cpu-throttle-tailslow
}

// throttleStep is QEMU's migration_trigger_throttle and
// mig_throttle_guest_down: given the current throttle (0 when inactive),
// the count of high periods so far, and one period's dirtied and sent
// bytes, it returns the new throttle and count. A period is high when the
// bytes dirtied exceed threshold% of the bytes sent; on every second high
// period (the count need not be consecutive: QEMU never resets it on a
// low period) the throttle starts at Initial, or rises by Increment — with
// Tailslow, by only what would bring the dirty rate down to the threshold,
// at most Increment — capped at Max.
func throttleStep(p throttleParams, current uint64, high int, dirtied, sent uint64) (next uint64, newHigh int) {
	thresholdBytes := sent * p.Threshold / 100
	if dirtied <= thresholdBytes {
		return current, high
	}
	high++
	if high < 2 {
		return current, high
	}
	if current == 0 {
		return clampThrottle(min(p.Initial, p.Max)), 0
	}
	inc := p.Increment
	if p.Tailslow {
		cpuNow := 100 - current
		cpuIdeal := uint64(float64(cpuNow) * (float64(thresholdBytes) / float64(dirtied)))
		inc = min(cpuNow-cpuIdeal, p.Increment)
	}
	return clampThrottle(min(current+inc, p.Max)), 0
}

// clampThrottle keeps a throttle within QEMU's CPU_THROTTLE_PCT_MIN and
// CPU_THROTTLE_PCT_MAX (1..99).
func clampThrottle(p uint64) uint64 { return max(1, min(p, 99)) }

// expectedDowntime is the switchover decision's estimate: how long sending
// remaining bytes would take with the guest stopped, and the bandwidth it
// assumed. The bandwidth is the pass's send rate (what the kernel
// accepted), lowered to what the destination was seen to absorb (from its
// PONGs; 0 while unknown) when that is less — socket buffers make a send
// rate optimistic — and replaced altogether by the operator's
// avail-switchover-bandwidth when set (QEMU 8.2+). Unknown bandwidth gives
// an expected downtime of 0.
func expectedDowntime(remaining uint64, sent, absorbed, avail float64) (bw float64, expected time.Duration) {
	bw = sent
	if absorbed > 0 && (bw == 0 || absorbed < bw) {
		bw = absorbed
	}
	if avail > 0 {
		bw = avail
	}
	if bw > 0 {
		expected = time.Duration(float64(remaining) / bw * float64(time.Second))
	}
	return bw, expected
}
