package postcopy

import (
	"testing"
	"time"
)

// QEMU's postcopy-latency-dist buckets: bucket n counts faults resolved in
// [2^n µs, 2^(n+1) µs), under 1 µs in bucket 0, 2^24 µs and more in the
// last (qapi/migration.json, postcopy-ram.c blocktime_latency_account).
func TestLatencyBucket(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want int
	}{
		{0, 0}, {999 * time.Nanosecond, 0}, {time.Microsecond, 0}, {2 * time.Microsecond, 1},
		{3 * time.Microsecond, 1}, {255 * time.Microsecond, 7}, {256 * time.Microsecond, 8},
		{511 * time.Microsecond, 8}, {(1 << 23) * time.Microsecond, 23}, {(1 << 24) * time.Microsecond, 23},
		{time.Hour, 23}, {-time.Second, 0},
	} {
		if got := latencyBucket(c.d); got != c.want {
			t.Errorf("latencyBucket(%v) = %d, want %d", c.d, got, c.want)
		}
	}
}

// Two vCPUs: A blocked over [0,10] ms, B over [5,15] ms; a non-vCPU thread
// over [2,4] ms. QEMU's definitions give: all-vCPU blocktime 5 ms (the
// overlap), A and B 10 ms each, three remote faults with 22 ms of latency,
// one of them non-vCPU.
func TestBlocktimeOverlap(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	bt, vcpu := newBlocktime([]int{101, 102})
	st := Stats{VCPU: vcpu}
	bt.begin(101, at(0))
	bt.begin(999, at(2))
	bt.end(&st, 999, at(4), 2*time.Millisecond)
	bt.begin(102, at(5))
	bt.end(&st, 101, at(10), 10*time.Millisecond)
	bt.end(&st, 102, at(15), 10*time.Millisecond)
	want := Stats{
		RemoteFaults: 3, LatencyTotal: 22 * time.Millisecond, BlockTime: 5 * time.Millisecond,
		NonVCPUFaults: 1, NonVCPULatency: 2 * time.Millisecond,
	}
	if st.RemoteFaults != want.RemoteFaults || st.LatencyTotal != want.LatencyTotal || st.BlockTime != want.BlockTime ||
		st.NonVCPUFaults != want.NonVCPUFaults || st.NonVCPULatency != want.NonVCPULatency {
		t.Fatalf("stats %+v, want %+v", st, want)
	}
	for i, v := range st.VCPU {
		if v.BlockTime != 10*time.Millisecond || v.Faults != 1 {
			t.Errorf("vCPU %d: %+v, want 10ms blocked, 1 fault", i, v)
		}
	}
	if st.LatencyDist[latencyBucket(10*time.Millisecond)] != 2 || st.LatencyDist[latencyBucket(2*time.Millisecond)] != 1 {
		t.Errorf("distribution %v", st.LatencyDist)
	}
	if got := st.Latency(); got != 22*time.Millisecond/3 {
		t.Errorf("mean latency %v", got)
	}
}
