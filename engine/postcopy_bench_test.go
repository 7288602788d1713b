package engine_test

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/uffd"
)

// benchPostcopySize is the guest RAM of BenchmarkPostcopyFault (small, so
// that -benchtime 1x checks it quickly; the lead's campaign may raise it).
const benchPostcopySize = 16 << 20

// BenchmarkPostcopyFault measures postcopy's fault latency end to end, with
// and without the preempt channel, beside the bare userfaultfd round trip
// measured in the same run.
//
//   - bare-uffd: one process, two locked threads: a thread touches a missing
//     4 KiB page of a memfd mapping registered for MISSING faults (a
//     kernel-mode read inside pwrite(2)), the handler thread reads the
//     message and installs a ready page with UFFDIO_COPY. The clock starts
//     just before pwrite(2) and stops when it returns; p50-us/p99-us are the
//     percentiles over b.N touches (every 256 touches the pages are punched
//     out again with the timer stopped).
//   - preempt=false, preempt=true: a whole postcopy migration over loopback
//     TCP of a guest of benchPostcopySize. The destination's guest process
//     runs one reader vCPU; migrate-start-postcopy comes at once (almost no
//     page precopied); the fault service asks for the faulting page alone
//     (loaders.Options.PostcopyBatch 1) and the background stream is held to
//     max-postcopy-bandwidth 64 KiB/s, so nearly every first touch is a
//     fault fetched from the source. touch-p50-us/touch-p99-us: the reader's
//     first-touch latency, timed in the guest process: the clock starts just
//     before the load of the page's first word and stops when the load
//     returns (fault read by migctl, REQ_PAGES sent on the return path, page
//     sent by the source on the main or preempt channel, UFFDIO_COPY, thread
//     woken). faulted-% is the share of touches that asked the source
//     (destination postcopy-requests / pages). ns/op is the whole migration,
//     from engine.Start to both sides' end; spawning the guest process is
//     outside the timer.
//
// Run with -benchtime 1x here (2 shared cores); the campaign compares p50
// with the goal (≤ 200 µs and ≤ 5× bare-uffd's p50) and reports p99.
func BenchmarkPostcopyFault(b *testing.B) {
	if err := uffd.Probe(); err != nil {
		b.Skipf("postcopy needs userfaultfd: %v", err)
	}
	b.Run("bare-uffd", benchBareRoundTrip)
	for _, preempt := range []bool{false, true} {
		b.Run(fmt.Sprintf("preempt=%v", preempt), func(b *testing.B) {
			var touch proc.LatencySummary
			var faulted float64
			for range b.N {
				touch, faulted = benchPostcopyOnce(b, preempt)
			}
			b.ReportMetric(float64(touch.P50.Nanoseconds())/1e3, "touch-p50-us")
			b.ReportMetric(float64(touch.P99.Nanoseconds())/1e3, "touch-p99-us")
			b.ReportMetric(faulted*100, "faulted-%")
		})
	}
}

// benchPostcopyOnce runs one timed migration (see BenchmarkPostcopyFault).
func benchPostcopyOnce(b *testing.B, preempt bool) (proc.LatencySummary, float64) {
	b.StopTimer()
	cfg := guest.Config{Size: benchPostcopySize, Seed: 21, ZeroFraction: 0.1}
	src := newEndB(b, false, cfg)
	b.Cleanup(func() { src.c.Close(); src.g.Close() })
	caps := map[string]bool{"postcopy-ram": true, "postcopy-preempt": preempt}
	if err := src.c.SetCapabilities(context.Background(), caps); err != nil {
		b.Fatal(err)
	}
	if err := src.c.SetParameters(context.Background(), map[string]any{"max-postcopy-bandwidth": 64 << 10}); err != nil {
		b.Fatal(err)
	}
	dst := newPostcopyDest(b, cfg, 1, caps)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{PostcopyBatch: 1})
	if err != nil {
		b.Fatal(err)
	}
	b.StartTimer()
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{SectionBytes: 256 << 10})
	if err != nil {
		in.Abort("source refused")
		<-in.Done()
		b.Fatal(err)
	}
	m.StartPostcopy()
	sr, err := m.Wait(ctx)
	if err != nil {
		in.Abort("timed out")
		<-in.Done()
		b.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	b.StopTimer()
	if err != nil || sr.Err != nil || dr.Err != nil {
		b.Fatalf("source %v, destination %v %v", sr.Err, dr.Err, err)
	}
	st, err := dst.g.Stats(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if st.LostReads != 0 {
		b.Fatalf("%d lost reads", st.LostReads)
	}
	return st.FirstTouch, float64(dr.Stats.PostcopyRequests) / float64(st.Pages)
}

// benchBareRoundTrip is BenchmarkPostcopyFault/bare-uffd.
func benchBareRoundTrip(b *testing.B) {
	const pg, pages = 4096, 256
	f, err := uffd.Open(uffd.Options{Features: uffd.FeatureMissingShmem, UserMode: uffd.UserModeAll})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fd, err := unix.MemfdCreate("bench-uffd", unix.MFD_CLOEXEC)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, pages*pg); err != nil {
		b.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, pages*pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if _, err := f.Register(uffd.Range{Start: base, Len: pages * pg}, uffd.ModeMissing); err != nil {
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
		page := make([]byte, pg)
		msgs := make([]uffd.Msg, 16)
		for {
			n, err := f.Read(ctx, msgs)
			if err != nil {
				handled <- err
				return
			}
			for _, m := range msgs[:n] {
				if _, err := f.CopyPages(m.Address&^(pg-1), page, pg, 0); err != nil {
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
			if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, pages*pg); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		t0 := time.Now()
		if _, err := unix.Pwrite(scratch, mem[p*pg:(p+1)*pg], 0); err != nil {
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

// BenchmarkPostcopyVsPrecopy compares the total time of a migration of a
// guest that dirties about 90 % of its RAM per pass (dirty rate 0.9 ×
// max-bandwidth, so a pass of the whole RAM at the link's rate finds 90 %
// of it dirty again, less the pages rewritten twice), in precopy
// (downtime-limit 20 ms: it ends only when a pass leaves little enough;
// x-migctl-convergence-passes reports it does not converge long before)
// and in postcopy (migrate-start-postcopy as the second pass begins, as an
// operator acting on that report would; the destination's guest process
// then pulls the rest). The clock starts at engine.Start and stops when
// both sides have ended; setting up the guests is outside it. passes is
// the source's dirty-sync count.
func BenchmarkPostcopyVsPrecopy(b *testing.B) {
	if err := uffd.Probe(); err != nil {
		b.Skipf("postcopy needs userfaultfd: %v", err)
	}
	const size, link = 16 << 20, 64 << 20
	for _, mode := range []string{"precopy", "postcopy"} {
		b.Run(mode, func(b *testing.B) {
			var passes uint64
			for range b.N {
				passes = benchDirtyOnce(b, mode == "postcopy", size, link)
			}
			b.ReportMetric(float64(passes), "passes")
		})
	}
}

func benchDirtyOnce(b *testing.B, postcopy bool, size, link int64) uint64 {
	b.StopTimer()
	cfg := guest.Config{Size: size, DirtyRate: link * 9 / 10, Writers: 2, Seed: 22, ZeroFraction: 0.1}
	src := newEndB(b, false, cfg)
	b.Cleanup(func() { src.c.Close(); src.g.Close() })
	if err := src.g.Start(); err != nil {
		b.Fatal(err)
	}
	caps := map[string]bool{"postcopy-ram": postcopy}
	if err := src.c.SetCapabilities(context.Background(), caps); err != nil {
		b.Fatal(err)
	}
	if err := src.c.SetParameters(context.Background(), map[string]any{"max-bandwidth": int(link), "downtime-limit": 20}); err != nil {
		b.Fatal(err)
	}
	dst := newPostcopyDest(b, cfg, 0, caps)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
	if err != nil {
		b.Fatal(err)
	}
	sub := src.c.Subscribe(64)
	defer sub.Close()
	b.StartTimer()
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{SectionBytes: 256 << 10})
	if err != nil {
		in.Abort("source refused")
		<-in.Done()
		b.Fatal(err)
	}
	if postcopy {
		for started := false; !started; {
			select {
			case ev := <-sub.C():
				if ev.Kind == machine.EventPass && ev.Pass >= 2 {
					m.StartPostcopy()
					started = true
				}
			case <-m.Done():
				started = true
			case <-ctx.Done():
				started = true
			}
		}
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		in.Abort("timed out")
		<-in.Done()
		b.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	b.StopTimer()
	if err != nil || sr.Err != nil || dr.Err != nil {
		b.Fatalf("source %v, destination %v %v", sr.Err, dr.Err, err)
	}
	return sr.Stats.DirtySyncCount
}
