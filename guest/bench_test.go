package guest

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Benchmarks report bytes/s (go test -bench . -benchtime 1x... or -benchtime 2s).
// Compare them with machine-limits.md: memcpy ~17 GB/s, crc32c ~13.7 GB/s.

func benchFill(b *testing.B, random bool) {
	ct := newContent(&Config{Seed: 1, Random: random})
	buf := make([]byte, 4*mib) // touched once, stays warm
	b.SetBytes(int64(len(buf)))
	for i := 0; b.Loop(); i++ {
		for p := range len(buf) / PageSize {
			ct.fill(buf[p*PageSize:(p+1)*PageSize], 0, p, uint32(i))
		}
	}
}

// BenchmarkFillPage: the generator writing pages, one core.
func BenchmarkFillPage(b *testing.B) {
	b.Run("compressible", func(b *testing.B) { benchFill(b, false) })
	b.Run("random", func(b *testing.B) { benchFill(b, true) })
}

// BenchmarkNew: building and filling a 64 MiB source guest, pre-faulted
// with MADV_POPULATE_WRITE, on all cores.
func BenchmarkNew(b *testing.B) {
	b.SetBytes(64 * mib)
	for b.Loop() {
		g, err := New(Config{Size: 64 * mib, Random: true, VRAM: -1})
		if err != nil {
			b.Fatal(err)
		}
		g.Close()
	}
}

// BenchmarkVerify: checking every page of a 64 MiB guest, on all cores.
func BenchmarkVerify(b *testing.B) {
	for _, random := range []bool{false, true} {
		name := map[bool]string{false: "compressible", true: "random"}[random]
		b.Run(name, func(b *testing.B) {
			g := newGuest(b, Config{Size: 64 * mib, Random: random, ZeroFraction: 0.1, VRAM: -1})
			b.SetBytes(64 * mib)
			for b.Loop() {
				if err := g.Verify(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkChecksum: CRC-32C over 64 MiB plus the devices.
func BenchmarkChecksum(b *testing.B) {
	g := newGuest(b, Config{Size: 64 * mib, Random: true, VRAM: -1})
	b.SetBytes(64 * mib)
	for b.Loop() {
		if _, err := g.Checksum(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSyncDirty: draining the dirty log of a 1 GiB-sized bitmap
// (262144 pages) with 1% of the pages dirty.
func BenchmarkSyncDirty(b *testing.B) {
	const pages = 1 << 18
	src := NewBitmap(pages)
	dst := NewBitmap(pages)
	for b.Loop() {
		for p := 0; p < pages; p += 100 {
			src.SetAtomic(p)
		}
		src.Drain(dst)
	}
}

// prepareSize is the guest size of BenchmarkPrepare and
// BenchmarkPopulateLockHold: MIGCTL_BENCH_SIZE (e.g. 2G, 512M), else def.
func prepareSize(b *testing.B, def int64) int64 {
	s := os.Getenv("MIGCTL_BENCH_SIZE")
	if s == "" {
		return def
	}
	shift := 0
	switch {
	case strings.HasSuffix(strings.ToUpper(s), "G"):
		shift, s = 30, s[:len(s)-1]
	case strings.HasSuffix(strings.ToUpper(s), "M"):
		shift, s = 20, s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("MIGCTL_BENCH_SIZE=%q: use bytes, or a number followed by M or G", os.Getenv("MIGCTL_BENCH_SIZE"))
	}
	return n << shift
}

// warmHost faults in and frees size bytes once, untimed. This machine's
// VM hands freed memory back to its host (free-page reporting), and the
// first touch of such memory costs several times a normal fault: without
// this, whichever sub-benchmark runs first pays for it.
func warmHost(b *testing.B, size int64) {
	g, err := NewDestination(Config{Size: size, VRAM: -1, Prealloc: true})
	if err != nil {
		b.Fatal(err)
	}
	g.Close()
}

// BenchmarkPrepare: what Config.Prealloc (QEMU's -mem-prealloc) costs on
// each backing, for a destination of MIGCTL_BENCH_SIZE bytes (default
// 64 MiB; the figure is 2G). Run it with -benchtime 1x: each
// iteration faults in the whole guest.
//
// The clock starts just before NewDestination and stops when it returns
// (mapping, the memory check, faulting in every page with all cores, and
// reading the huge page count); Close (unmapping) is outside it. The metrics
// say what happened inside: prepare-ms is [Builtin.PrepareTime] alone (the
// faulting), huge-% the share of RAM the kernel mapped with 2 MiB pages.
// "threads=1" faults in from one goroutine, to show what the parallel
// faulting buys. Compare with machine-limits.md: QEMU 7.2's -mem-prealloc
// of 2 GiB anonymous THP memory takes 0.34–0.39 s, a 2 GiB memfd in 4 KiB
// pages 2.2–5 s.
func BenchmarkPrepare(b *testing.B) {
	size := prepareSize(b, 64*mib)
	if err := CheckMemory(2 * size); err != nil {
		b.Skip(err)
	}
	warmHost(b, size)
	for _, c := range []struct {
		name    string
		backing string
		threads int
	}{
		{"anon-thp", BackingAnon, 0},
		{"anon-thp/threads=1", BackingAnon, 1},
		{"memfd", BackingMemfd, 0},
		{"memfd/threads=1", BackingMemfd, 1},
	} {
		b.Run(c.name, func(b *testing.B) {
			saved := preallocThreads
			defer func() { preallocThreads = saved }()
			preallocThreads = c.threads
			b.SetBytes(size)
			var prep, huge float64
			for i := 0; i < b.N; i++ {
				g, err := NewDestination(Config{Size: size, VRAM: -1, Backing: c.backing, Prealloc: true})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				p := g.Preparation()
				prep += float64(p.Time.Milliseconds())
				huge += 100 * float64(p.HugeBytes) / float64(p.Bytes)
				g.Close()
				b.StartTimer()
			}
			b.ReportMetric(prep/float64(b.N), "prepare-ms")
			b.ReportMetric(huge/float64(b.N), "huge-%")
		})
	}
}

// BenchmarkPopulateLockHold chooses Populate's step (populateChunk). While
// Populate pre-faults a fresh destination of MIGCTL_BENCH_SIZE bytes
// (default 256 MiB), another goroutine maps and unmaps one page every
// 200 µs: mmap and munmap need the process's mmap lock for writing (as the
// Go runtime does to grow its heap, so a control plane answering a query),
// and wait while a populate call holds it for reading. The clock covers
// Populate only (building the guest and closing it are outside). Metrics,
// in µs: call-p50/p99/max, the duration of each madvise call (the longest
// it can hold the lock), and wait-p50/p99/max, the writer's mmap+munmap
// (what a lock writer actually waited, with the machine's own noise). Run
// it with -benchtime 1x.
//
// Measured here (2 vCPU, Linux 6.18, 256 MiB, -benchtime 1x, a few runs):
// see the comment on populateChunk for the figures and the choice.
func BenchmarkPopulateLockHold(b *testing.B) {
	size := prepareSize(b, 256*mib)
	warmHost(b, size)
	for _, backing := range []string{BackingAnon, BackingMemfd} {
		for _, step := range []int{512 << 10, 2 << 20, 4 << 20} {
			b.Run(fmt.Sprintf("%s/step=%dK", backing, step>>10), func(b *testing.B) {
				saved, savedAdvice := populateStep, populateAdvice
				defer func() { populateStep, populateAdvice = saved, savedAdvice }()
				populateStep = step
				var holds []time.Duration // each madvise call: it holds the lock for reading at most this long
				populateAdvice = func(mem []byte) error {
					t0 := time.Now()
					err := savedAdvice(mem)
					holds = append(holds, time.Since(t0))
					return err
				}
				b.SetBytes(size)
				var waits []time.Duration
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					g, err := NewDestination(Config{Size: size, VRAM: -1, Backing: backing})
					if err != nil {
						b.Fatal(err)
					}
					stop := make(chan struct{})
					done := make(chan []time.Duration)
					go func() {
						var w []time.Duration
						tick := time.NewTicker(200 * time.Microsecond)
						defer tick.Stop()
						for {
							select {
							case <-stop:
								done <- w
								return
							case <-tick.C:
							}
							t0 := time.Now()
							m, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
							if err == nil {
								unix.Munmap(m)
							}
							w = append(w, time.Since(t0))
						}
					}()
					b.StartTimer()
					err = g.Populate(context.Background(), 0)
					b.StopTimer()
					close(stop)
					waits = append(waits, <-done...)
					g.Close()
					b.StartTimer()
					if err != nil {
						b.Fatal(err)
					}
				}
				report := func(d []time.Duration, what string) {
					if len(d) == 0 {
						return
					}
					slices.Sort(d)
					us := func(q float64) float64 {
						return float64(d[min(len(d)-1, int(q*float64(len(d))))].Nanoseconds()) / 1e3
					}
					b.ReportMetric(us(0.5), what+"-p50-µs")
					b.ReportMetric(us(0.99), what+"-p99-µs")
					b.ReportMetric(float64(d[len(d)-1].Nanoseconds())/1e3, what+"-max-µs")
				}
				report(holds, "call")
				report(waits, "wait")
			})
		}
	}
}
