package engine_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// benchSize is the guest size of the throughput benchmarks; override with
// MIGCTL_BENCH_SIZE (e.g. 2G for the figure).
func benchSize(b *testing.B, def int64) int64 {
	if s := os.Getenv("MIGCTL_BENCH_SIZE"); s != "" {
		u := strings.ToUpper(s)
		shift := 30
		if strings.HasSuffix(u, "M") {
			shift = 20
		}
		n, err := strconv.ParseInt(strings.TrimRight(u, "GM"), 10, 64)
		if err != nil {
			b.Fatalf("MIGCTL_BENCH_SIZE=%q: want a size such as 1G or 256M", s)
		}
		return n << shift
	}
	return def
}

// rawCopy copies size bytes from src memory over a fresh connection of the
// given network into pre-faulted memory: the baseline a migration is
// compared with.
func rawCopy(b *testing.B, network, addr string, src []byte) time.Duration {
	dst, err := unix.Mmap(-1, 0, len(src), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(dst)
	ln, err := net.Listen(network, addr)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_, err = io.ReadFull(c, dst)
		done <- err
	}()
	start := time.Now()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	for off := 0; off < len(src); off += 1 << 20 {
		if _, err := c.Write(src[off:min(off+1<<20, len(src))]); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	c.Close()
	return time.Since(start)
}

// migrateOnce migrates an idle random guest in-process over uri and returns
// the time from migrate to completed on the destination.
func migrateOnce(b *testing.B, src *end, cfg guest.Config, listen string, waitPrefault bool) (time.Duration, machine.Stats) {
	dst := newEndB(b, true, cfg)
	ctx := context.Background()
	in, err := loaders.Listen(ctx, dst.c, dst.g, listen, loaders.Options{})
	if err != nil {
		b.Fatal(err)
	}
	if waitPrefault {
		<-in.Prefaulted()
	}
	start := time.Now()
	opts := engine.Options{}
	if os.Getenv("MIGCTL_BENCH_LOG") != "" {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), opts)
	if err != nil {
		b.Fatal(err)
	}
	sr, _ := m.Wait(ctx)
	dr, _ := in.Wait(ctx)
	took := time.Since(start)
	if sr.Err != nil || dr.Err != nil {
		b.Fatalf("source %s %v, destination %s %v", sr.State, sr.Err, dr.State, dr.Err)
	}
	dst.c.Close()
	dst.g.Close()
	// the source guest is left stopped in completed: reset it for the next run
	src.c.Close()
	c, err := machine.New(defaultSpec(b), machine.Options{})
	if err != nil {
		b.Fatal(err)
	}
	if err := c.SetParameters(ctx, map[string]any{"max-bandwidth": 0}); err != nil {
		b.Fatal(err)
	}
	src.c = c
	return took, sr.Stats
}

func newEndB(b *testing.B, dest bool, cfg guest.Config) *end {
	var g *guest.Builtin
	var err error
	if dest {
		g, err = guest.NewDestination(cfg)
	} else {
		g, err = guest.New(cfg)
	}
	if err != nil {
		b.Fatal(err)
	}
	c, err := machine.New(defaultSpec(b), machine.Options{Incoming: dest})
	if err != nil {
		b.Fatal(err)
	}
	if dest {
		stayPaused(b, c)
	}
	if err := c.SetParameters(context.Background(), map[string]any{"max-bandwidth": 0}); err != nil {
		b.Fatal(err)
	}
	return &end{c: c, g: g}
}

// BenchmarkThroughput migrates an idle guest with random content (default
// 512 MiB; MIGCTL_BENCH_SIZE=2G for the figure) and compares with a
// raw copy of the same bytes over the same kind of socket into pre-faulted
// memory, measured in the same run. The destination pre-faults its RAM from
// the moment it listens (loaders' default): "prefaulted" starts the source
// once that is done — both destinations pre-faulted, as a destination
// started ahead of its source is — and "overlapped" starts it at once, so
// pre-faulting competes with receiving for the two cores. Reports the ratio.
func BenchmarkThroughput(b *testing.B) {
	size := benchSize(b, 512<<20)
	cfg := guest.Config{Size: size, Seed: 3, Random: true, VRAM: -1}
	for _, v := range []struct {
		network string
		wait    bool
	}{{"tcp", true}, {"unix", true}, {"tcp", false}} {
		network := v.network
		name := network + "/prefaulted"
		if !v.wait {
			name = network + "/overlapped"
		}
		b.Run(name, func(b *testing.B) {
			src := newEndB(b, false, cfg)
			defer func() { src.c.Close(); src.g.Close() }()
			mem := src.g.Blocks()[0].Mem
			var migs, raws []time.Duration
			for b.Loop() {
				listen := "tcp:127.0.0.1:0"
				rawAddr := "127.0.0.1:0"
				if network == "unix" {
					listen = "unix:" + filepath.Join(b.TempDir(), "m.sock")
					rawAddr = filepath.Join(b.TempDir(), "raw.sock")
				}
				raws = append(raws, rawCopy(b, network, rawAddr, mem))
				d, _ := migrateOnce(b, src, cfg, listen, v.wait)
				migs = append(migs, d)
			}
			slices.Sort(migs)
			slices.Sort(raws)
			mig, raw := migs[len(migs)/2], raws[len(raws)/2]
			b.ReportMetric(float64(size)/mig.Seconds()/1e9, "migrate-GB/s")
			b.ReportMetric(float64(size)/raw.Seconds()/1e9, "raw-GB/s")
			b.ReportMetric(raw.Seconds()/mig.Seconds(), "ratio")
			fmt.Fprintf(os.Stderr, "throughput/%s size=%d MiB: migrate %.2f GB/s, raw copy %.2f GB/s, ratio %.2f (medians of %d)\n",
				name, size>>20, float64(size)/mig.Seconds()/1e9, float64(size)/raw.Seconds()/1e9, raw.Seconds()/mig.Seconds(), len(migs))
		})
	}
}

// BenchmarkDowntime migrates a 1 GiB guest dirtying 64 MiB/s over loopback
// TCP with downtime-limit 50 ms, the destination pre-faulted and started
// for real when the migration completes, and reports two downtimes per run:
//
//   - qemu-downtime-ms: QEMU's downtime as QEMU defines it (and as
//     query-migrate reports it): from the source stopping its guest to the
//     source having written its last byte. It says nothing about when the
//     destination's guest runs.
//   - true-downtime-ms: the guest's true downtime, from the source guest's
//     last Stop to the destination guest's first Start, both read from the
//     guests' run logs (guest.Builtin.RunLog) on this process's monotonic
//     clock: no guest of this migration runs in between.
//
// Override the size with MIGCTL_BENCH_SIZE and the limit with
// MIGCTL_BENCH_DOWNTIME_LIMIT (ms).
func BenchmarkDowntime(b *testing.B) {
	size := benchSize(b, 1<<30)
	cfg := guest.Config{Size: size, Seed: 5, DirtyRate: 64 << 20, ZeroFraction: 0.1}
	limit := os.Getenv("MIGCTL_BENCH_DOWNTIME_LIMIT") // ms; default 50, QEMU's default is 300
	if limit == "" {
		limit = "50"
	}
	var qemu, truth []time.Duration
	for b.Loop() {
		src := newEndB(b, false, cfg)
		if err := src.c.SetParameters(context.Background(), map[string]any{"downtime-limit": limit}); err != nil {
			b.Fatal(err)
		}
		if err := src.g.Start(); err != nil {
			b.Fatal(err)
		}
		dst := newEndStarting(b, cfg)
		ctx := context.Background()
		in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
		if err != nil {
			b.Fatal(err)
		}
		<-in.Prefaulted()
		m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{})
		if err != nil {
			b.Fatal(err)
		}
		sr, _ := m.Wait(ctx)
		dr, _ := in.Wait(ctx)
		if sr.Err != nil || dr.Err != nil {
			b.Fatalf("source %v, destination %v", sr.Err, dr.Err)
		}
		srcLog, dstLog := src.g.RunLog(), dst.g.RunLog()
		if len(dstLog) == 0 || srcLog[len(srcLog)-1].Stop.IsZero() {
			b.Fatalf("run logs: source %v, destination %v: the source must have stopped and the destination started", srcLog, dstLog)
		}
		gap := dstLog[0].Start.Sub(srcLog[len(srcLog)-1].Stop)
		if gap < 0 {
			b.Fatalf("the destination guest started %v before the source guest stopped", -gap)
		}
		qemu = append(qemu, sr.Stats.Downtime)
		truth = append(truth, gap)
		for _, e := range []*end{src, dst} {
			e.c.Close()
			e.g.Close()
		}
	}
	slices.Sort(qemu)
	slices.Sort(truth)
	b.ReportMetric(float64(qemu[len(qemu)/2].Microseconds())/1000, "qemu-downtime-ms")
	b.ReportMetric(float64(truth[len(truth)/2].Microseconds())/1000, "true-downtime-ms")
	fmt.Fprintf(os.Stderr, "downtime size=%d MiB dirty=64 MiB/s downtime-limit=%s ms: QEMU's downtime median %v (all %v); true downtime median %v (all %v)\n",
		size>>20, limit, qemu[len(qemu)/2], qemu, truth[len(truth)/2], truth)
}

// newEndStarting is a destination whose guest starts when the migration
// completes, as a production destination's does.
func newEndStarting(b *testing.B, cfg guest.Config) *end {
	g, err := guest.NewDestination(cfg)
	if err != nil {
		b.Fatal(err)
	}
	c, err := machine.New(defaultSpec(b), machine.Options{Incoming: true})
	if err != nil {
		b.Fatal(err)
	}
	return &end{c: c, g: g}
}

var _ = spec.Incoming

// percentile returns the p-th percentile (0..100) of sorted durations.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(float64(len(d)-1) * p / 100)
	return d[i]
}

// sampleQueries runs a destination state query (Status + Config, what
// query-migrate reads) every interval until stop is closed and returns the
// sorted round trips.
func sampleQueries(c *machine.Controller, interval time.Duration, stop <-chan struct{}) []time.Duration {
	var out []time.Duration
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			slices.Sort(out)
			return out
		case <-t.C:
			t0 := time.Now()
			_, _ = c.Status(spec.Incoming, 4)
			_ = c.Config()
			out = append(out, time.Since(t0))
		}
	}
}

// BenchmarkQueryLatencyDuringLoad: the destination's p99 latency of a state
// query while its loader runs at full speed (512 MiB random guest over
// loopback TCP), beside the idle p99 measured in the same run, and — for
// contrast — the same with the loader holding the controller lock around
// its reads (loaders.Options.LockedBatch, QEMU's old behaviour).
func BenchmarkQueryLatencyDuringLoad(b *testing.B) {
	size := benchSize(b, 512<<20)
	cfg := guest.Config{Size: size, Seed: 7, Random: true, VRAM: -1}
	src := newEndB(b, false, cfg)
	defer func() { src.c.Close(); src.g.Close() }()
	for b.Loop() {
		for _, mode := range []struct {
			name  string
			batch int
		}{{"lock-free", 0}, {"loader-holds-lock", 256}} {
			dst := newEndB(b, true, cfg)
			// idle baseline, same process, same duration order of magnitude
			stop := make(chan struct{})
			res := make(chan []time.Duration)
			go func() { res <- sampleQueries(dst.c, time.Millisecond, stop) }()
			time.Sleep(300 * time.Millisecond) // measuring window, not synchronisation
			close(stop)
			idle := <-res

			ctx := context.Background()
			in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{LockedBatch: mode.batch})
			if err != nil {
				b.Fatal(err)
			}
			stop = make(chan struct{})
			go func() { res <- sampleQueries(dst.c, time.Millisecond, stop) }()
			m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{})
			if err != nil {
				b.Fatal(err)
			}
			sr, _ := m.Wait(ctx)
			dr, _ := in.Wait(ctx)
			close(stop)
			load := <-res
			if sr.Err != nil || dr.Err != nil {
				b.Fatalf("%s: source %s %v, destination %s %v", mode.name, sr.State, sr.Err, dr.State, dr.Err)
			}
			fmt.Fprintf(os.Stderr, "query latency %s, %d MiB: during load p50 %v p99 %v max %v (%d samples); idle p50 %v p99 %v max %v\n",
				mode.name, size>>20, percentile(load, 50), percentile(load, 99), percentile(load, 100), len(load),
				percentile(idle, 50), percentile(idle, 99), percentile(idle, 100))
			if mode.batch == 0 {
				b.ReportMetric(float64(percentile(load, 99).Microseconds())/1000, "p99-load-ms")
				b.ReportMetric(float64(percentile(idle, 99).Microseconds())/1000, "p99-idle-ms")
			} else {
				b.ReportMetric(float64(percentile(load, 99).Microseconds())/1000, "p99-locked-ms")
			}
			dst.c.Close()
			dst.g.Close()
			// reset the source for the next mode
			src.c.Close()
			c, _ := machine.New(defaultSpec(b), machine.Options{})
			_ = c.SetParameters(ctx, map[string]any{"max-bandwidth": 0})
			src.c = c
		}
	}
}
