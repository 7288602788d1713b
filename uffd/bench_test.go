package uffd

import (
	"context"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkRoundTrip measures the bare userfaultfd round trip in one
// process, with nothing but the kernel between the two threads: a thread
// touches a missing 4 KiB page of a memfd mapping (a kernel-mode read inside
// pwrite(2), so that no Go code faults), the handler thread wakes from
// poll, reads the message and installs a ready page with UFFDIO_COPY, and
// the faulting thread resumes.
//
// Clock: per operation, it starts just before pwrite(2) is issued and stops
// when pwrite returns; ns/op is the mean, p50-us and p99-us the
// percentiles. Every 256 operations the pages are punched out of the memfd
// again (FALLOC_FL_PUNCH_HOLE) with the timer stopped.
func BenchmarkRoundTrip(b *testing.B) {
	f := openFD(b, Options{Features: FeatureMissingShmem, UserMode: UserModeAll})
	const pages = 256
	r := newRegion(b, pages)
	if _, err := f.Register(r.rng(0, pages), ModeMissing); err != nil {
		b.Fatal(err)
	}
	scratch, err := unix.MemfdCreate("bench-scratch", unix.MFD_CLOEXEC)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(scratch)

	ctx, cancel := context.WithCancel(context.Background())
	handled := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		src := pattern(1)
		msgs := make([]Msg, 16)
		for {
			n, err := f.Read(ctx, msgs)
			if err != nil {
				handled <- err
				return
			}
			for _, m := range msgs[:n] {
				if _, err := f.CopyPages(m.Address&^(pg-1), src, pg, 0); err != nil {
					handled <- err
					return
				}
			}
		}
	}()

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		p := i % pages
		if p == 0 && i > 0 {
			b.StopTimer()
			if err := unix.Fallocate(r.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, pages*pg); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		t0 := time.Now()
		if _, err := unix.Pwrite(scratch, r.mem[p*pg:(p+1)*pg], 0); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	cancel()
	if err := <-handled; err != context.Canceled {
		b.Fatalf("handler: %v", err)
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-us")
}
