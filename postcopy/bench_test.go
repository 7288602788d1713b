package postcopy

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/uffd"
)

// BenchmarkFaultInstall measures fault → install across two processes with
// the source in memory (no network): a guest process's single reader vCPU
// touches every page of an 8 MiB guest that has none of its RAM; this
// process's fault service reads each fault message and asks the in-memory
// source, which installs the page at once with UFFDIO_COPY, on the fault
// thread itself (a synchronous Request), so that only the two processes and
// the kernel sit between a touch and its page. batch=1 installs the faulting
// page alone (every touch faults: the cross-process round trip);
// batch=16 adds its 64 KiB block of neighbours.
//
// Clocks:
//   - ns/op: one op is one full reader pass over the guest (2304 first
//     touches), from START to the reply of WAIT_READERS; spawning the guest
//     process and attaching happen with the timer stopped.
//   - touch-p50-us, touch-p99-us: the guest's first-touch latency, timed in
//     the guest process by the reader: the clock starts just before the
//     load of the page's first word and stops when the load returns (page
//     installed, thread woken). Pages a batch brought in count too.
//   - fault-us: the service's mean remote-fault latency (QEMU's
//     postcopy-latency): from the fault thread's read of the message to the
//     return of the UFFDIO_COPY that installed the page.
//
// Run with -benchtime 1x here (the machine is shared); compare with
// uffd.BenchmarkRoundTrip, the bare in-process round trip, run alongside.
func BenchmarkFaultInstall(b *testing.B) {
	if err := uffd.Probe(); err != nil {
		b.Skipf("needs userfaultfd: %v", err)
	}
	cfg := guest.Config{Size: 8 * mib, Seed: 12}
	src := newSource(b, cfg)
	for _, batch := range []int{1, 16} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			var st proc.Stats
			var ss Stats
			for range b.N {
				b.StopTimer()
				st, ss = faultPass(b, cfg, src, batch)
			}
			b.ReportMetric(float64(st.FirstTouch.P50.Nanoseconds())/1e3, "touch-p50-us")
			b.ReportMetric(float64(st.FirstTouch.P99.Nanoseconds())/1e3, "touch-p99-us")
			b.ReportMetric(float64(ss.Latency().Nanoseconds())/1e3, "fault-us")
		})
	}
}

// faultPass runs one timed pass (see BenchmarkFaultInstall); the timer is
// stopped on entry and on return.
func faultPass(b *testing.B, cfg guest.Config, src *guest.Builtin, batch int) (proc.Stats, Stats) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, c, err := proc.Start(ctx, proc.SpawnOptions{Config: proc.Config{Guest: cfg, Role: proc.RoleDestination, Readers: 1}}, proc.AttachOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer quit(b, p, c)
	var svc *Service
	install := func(r Request) {
		blk := src.Blocks()[r.Region]
		if _, err := svc.PlaceRun(r.Region, r.Page, blk.Mem[r.Page*blk.PageSize:(r.Page+r.Count)*blk.PageSize]); err != nil {
			b.Error(err)
		}
	}
	svc, fd, err := FromGuest(c, Options{Request: install, Batch: batch})
	if err != nil {
		b.Fatal(err)
	}
	defer fd.Close()
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- svc.Run(rctx) }()
	b.StartTimer()
	if err := c.Start(); err != nil {
		b.Fatal(err)
	}
	if err := c.WaitReaders(ctx, 1, time.Minute); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if err := c.Stop(); err != nil {
		b.Fatal(err)
	}
	stop()
	<-ran
	st, err := c.Stats(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if st.LostReads != 0 {
		b.Fatalf("%d lost reads", st.LostReads)
	}
	return st, svc.Stats()
}
