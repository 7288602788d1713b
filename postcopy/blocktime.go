package postcopy

import (
	"math/bits"
	"time"
)

// LatencyBuckets is the number of buckets of [Stats.LatencyDist], as QEMU's
// postcopy-latency-dist (BLOCKTIME_LATENCY_BUCKET_N).
const LatencyBuckets = 24

// latencyBucket returns the bucket of a fault resolved after d: bucket n
// holds [2^n µs, 2^(n+1) µs); under 1 µs counts in bucket 0, 2^24 µs and
// more in the last bucket (QEMU's blocktime_latency_account).
func latencyBucket(d time.Duration) int {
	us := uint64(max(d, 0) / time.Microsecond)
	if us == 0 {
		return 0
	}
	return min(63-bits.LeadingZeros64(us), LatencyBuckets-1)
}

// Stats are the fault service's counters and QEMU's postcopy blocktime
// statistics. A "remote fault" is one that had to wait for a page from the
// source; the latency of a fault runs from the moment the fault thread read
// its message to the moment the UFFDIO_COPY (or UFFDIO_ZEROPAGE) that
// installed its page returned.
type Stats struct {
	Faults     uint64 // fault messages read
	Wakes      uint64 // faults on pages already present, answered with UFFDIO_WAKE
	ZeroFaults uint64 // faults on pages known to be zero, resolved at once with UFFDIO_ZEROPAGE
	Requests   uint64 // urgent requests for a faulting page (QEMU's postcopy-requests, counted on the destination)
	Prefetches uint64 // requests for the batch of neighbours around a faulting page
	Installed  uint64 // pages installed by Place, PlaceRun and zero faults
	Existing   uint64 // pages an install found already present (EEXIST)
	Pending    int    // faults waiting for their page now

	RemoteFaults uint64                 // remote faults resolved
	LatencyTotal time.Duration          // sum of their latencies
	LatencyDist  [LatencyBuckets]uint64 // QEMU's postcopy-latency-dist (see latencyBucket)

	// BlockTime is QEMU's postcopy-blocktime: the time during which every
	// vCPU thread of Options.VCPUThreads was blocked on a fault at once.
	// 0 when no vCPU threads are known.
	BlockTime time.Duration
	// VCPU holds, per entry of Options.VCPUThreads, QEMU's
	// postcopy-vcpu-blocktime (time the vCPU had at least one fault pending)
	// and its remote faults and their latency (postcopy-vcpu-latency).
	VCPU []VCPUStats
	// NonVCPUFaults and NonVCPULatency cover remote faults of threads that
	// are not vCPU threads (QEMU's postcopy-non-vcpu-latency), including all
	// faults when the thread id is unknown.
	NonVCPUFaults  uint64
	NonVCPULatency time.Duration
}

// VCPUStats is the blocktime of one vCPU thread.
type VCPUStats struct {
	TID          int
	BlockTime    time.Duration // time with at least one fault pending
	Faults       uint64        // remote faults resolved
	LatencyTotal time.Duration // sum of their latencies
}

// Latency returns the mean latency of remote faults (QEMU's
// postcopy-latency), or 0 when there was none.
func (s Stats) Latency() time.Duration {
	if s.RemoteFaults == 0 {
		return 0
	}
	return s.LatencyTotal / time.Duration(s.RemoteFaults)
}

// blocktime keeps the per-vCPU and all-vCPU blocked time. Owned by the
// Service and guarded by its mutex.
type blocktime struct {
	vcpu       map[uint32]int // thread id → index into stats.VCPU
	pending    []int          // per vCPU: faults pending
	since      []time.Time    // per vCPU: when its pending count left 0
	blocked    int            // vCPUs with pending > 0
	allBlocked time.Time      // when blocked reached len(vcpu)
}

func newBlocktime(tids []int) (blocktime, []VCPUStats) {
	bt := blocktime{vcpu: make(map[uint32]int, len(tids)), pending: make([]int, len(tids)), since: make([]time.Time, len(tids))}
	st := make([]VCPUStats, len(tids))
	for i, t := range tids {
		bt.vcpu[uint32(t)] = i
		st[i].TID = t
	}
	return bt, st
}

// begin records that thread tid started waiting at t.
func (b *blocktime) begin(tid uint32, t time.Time) {
	i, ok := b.vcpu[tid]
	if !ok {
		return
	}
	if b.pending[i]++; b.pending[i] == 1 {
		b.since[i] = t
		if b.blocked++; b.blocked == len(b.vcpu) {
			b.allBlocked = t
		}
	}
}

// end records that one wait of thread tid ended at t, after lat, and
// accounts it in st.
func (b *blocktime) end(st *Stats, tid uint32, t time.Time, lat time.Duration) {
	st.RemoteFaults++
	st.LatencyTotal += lat
	st.LatencyDist[latencyBucket(lat)]++
	i, ok := b.vcpu[tid]
	if !ok {
		st.NonVCPUFaults++
		st.NonVCPULatency += lat
		return
	}
	v := &st.VCPU[i]
	v.Faults++
	v.LatencyTotal += lat
	if b.pending[i]--; b.pending[i] == 0 {
		v.BlockTime += t.Sub(b.since[i])
		if b.blocked == len(b.vcpu) {
			st.BlockTime += t.Sub(b.allBlocked)
		}
		b.blocked--
	}
}
