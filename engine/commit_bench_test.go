package engine_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// BenchmarkCommitProtocol measures what the switchover commit protocol
// costs: the downtime of an idle guest (1 GiB; MIGCTL_BENCH_SIZE, e.g.
// 256M) over tcp loopback with the protocol on (both sides speak it:
// LOADED, commit, GO, then SHUT) and off (NoCommitProtocol on both: the
// destination starts at the end of the stream, QEMU's way). Each
// iteration runs one migration of each kind, in alternating order, each
// between fresh guests and controllers built outside the clock. Metrics,
// medians over the iterations:
//
//   - true-downtime-on-ms, true-downtime-off-ms: from the source guest's
//     last stop to the destination guest's first start, both from the
//     guests' run logs on this process's monotonic clock;
//   - commit-wait-us (protocol on): what the protocol adds, from the
//     destination's loaded transition (it is about to send LOADED) to its
//     complete transition (GO arrived), both timestamps from the
//     destination controller's history: one round trip plus the source's
//     commit;
//   - cost-us: the median over iterations of (on − off) true downtime.
//
// b.Loop's ns/op covers two whole migrations and is not the figure.
func BenchmarkCommitProtocol(b *testing.B) {
	size := benchSize(b, 1<<30)
	cfg := guest.Config{Size: size, Seed: 5, ZeroFraction: 0.1} // idle: no writers
	var on, off, wait, cost []time.Duration
	i := 0
	for b.Loop() {
		order := []bool{true, false}
		if i%2 == 1 {
			order = []bool{false, true}
		}
		i++
		var pair [2]time.Duration
		for _, proto := range order {
			b.StopTimer()
			truth, w := commitRun(b, cfg, proto)
			b.StartTimer()
			if proto {
				on, pair[0] = append(on, truth), truth
				wait = append(wait, w)
			} else {
				off, pair[1] = append(off, truth), truth
			}
		}
		cost = append(cost, pair[0]-pair[1])
	}
	med := func(d []time.Duration) time.Duration { slices.Sort(d); return d[len(d)/2] }
	b.ReportMetric(float64(med(on).Microseconds())/1000, "true-downtime-on-ms")
	b.ReportMetric(float64(med(off).Microseconds())/1000, "true-downtime-off-ms")
	b.ReportMetric(float64(med(wait).Microseconds()), "commit-wait-us")
	b.ReportMetric(float64(med(cost).Microseconds()), "cost-us")
	fmt.Fprintf(os.Stderr, "commit protocol, idle %d MiB over tcp loopback, %d pairs: true downtime on %v off %v; commit wait %v (all %v); on−off %v\n",
		size>>20, len(on), med(on), med(off), med(wait), wait, med(cost))
}

// commitRun migrates between fresh ends with the protocol on or off and
// returns the true downtime and, with the protocol, the destination's wait
// for go (zero without it). The caller stops the benchmark clock: the
// timings come from run logs and histories.
func commitRun(b *testing.B, cfg guest.Config, proto bool) (truth, wait time.Duration) {
	src := newEndB(b, false, cfg)
	defer src.c.Close()
	defer src.g.Close()
	if err := src.g.Start(); err != nil {
		b.Fatal(err)
	}
	dst := newEndStarting(b, cfg)
	defer dst.c.Close()
	defer dst.g.Close()
	ctx := context.Background()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{NoCommitProtocol: !proto})
	if err != nil {
		b.Fatal(err)
	}
	<-in.Prefaulted()
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{NoCommitProtocol: !proto})
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
		b.Fatalf("run logs: source %v, destination %v", srcLog, dstLog)
	}
	truth = dstLog[0].Start.Sub(srcLog[len(srcLog)-1].Stop)
	st, _ := dst.c.Status(spec.Incoming, -1)
	var loaded, done time.Time
	for _, r := range st.History {
		switch {
		case r.To == "loaded":
			loaded = r.Time
		case r.From == "loaded" && r.To == "completed":
			done = r.Time
		}
	}
	if proto != !loaded.IsZero() {
		b.Fatalf("protocol %v, but the destination went through loaded: %v", proto, !loaded.IsZero())
	}
	if proto {
		wait = done.Sub(loaded)
	}
	return truth, wait
}

// stallConn stops reading (as a stopped process does) once frozen: what
// the peer writes piles up in the kernel's buffers until they are full;
// its own writes stop too. Close and a past deadline end a blocked call.
type stallConn struct {
	transport.Conn
	frozen <-chan struct{}
	closed chan struct{}
	once   sync.Once
	dl     chan struct{}
	dlOnce sync.Once
}

func (c *stallConn) hold() error {
	select {
	case <-c.frozen:
	default:
		return nil
	}
	select {
	case <-c.closed:
		return net.ErrClosed
	case <-c.dl:
		return os.ErrDeadlineExceeded
	}
}

func (c *stallConn) Read(b []byte) (int, error) {
	if err := c.hold(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *stallConn) Write(b []byte) (int, error) {
	if err := c.hold(); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

func (c *stallConn) SetDeadline(t time.Time) error {
	if !t.IsZero() && !t.After(time.Now()) {
		c.dlOnce.Do(func() { close(c.dl) })
	}
	return c.Conn.SetDeadline(t)
}

func (c *stallConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

type stallListener struct {
	transport.Listener
	frozen <-chan struct{}
}

func (l *stallListener) Accept(ctx context.Context) (transport.Conn, error) {
	c, err := l.Listener.Accept(ctx)
	if err != nil {
		return nil, err
	}
	return &stallConn{Conn: c, frozen: l.frozen, closed: make(chan struct{}), dl: make(chan struct{})}, nil
}

// BenchmarkStallToTerminal measures how long a source takes to notice a
// destination that stopped (its channel freezes both ways, as under
// SIGSTOP) and end the migration, at the default x-migctl-keepalive
// (1 s) and x-migctl-io-timeout (30 s), unless MIGCTL_BENCH_IO_TIMEOUT
// (ms) sets the timeout. The clock starts when the destination's channel
// freezes during the first pass (the source active, a 256 MiB guest
// paced to 32 MiB/s so it is still sending) and stops when the source's
// side reaches its terminal state; metrics: stall-to-terminal-s, and
// stall-reported-s (until query-migrate first showed x-migctl-stalled-ms),
// medians over the iterations.
func BenchmarkStallToTerminal(b *testing.B) {
	cfg := guest.Config{Size: 256 << 20, Seed: 5, ZeroFraction: 0.1}
	var toTerminal, toReport []time.Duration
	for b.Loop() {
		b.StopTimer()
		src := newEndB(b, false, cfg)
		if err := src.g.Start(); err != nil {
			b.Fatal(err)
		}
		params := map[string]any{"max-bandwidth": 32 << 20}
		if v := os.Getenv("MIGCTL_BENCH_IO_TIMEOUT"); v != "" {
			params["x-migctl-io-timeout"] = v
		}
		if err := src.c.SetParameters(context.Background(), params); err != nil {
			b.Fatal(err)
		}
		dst := newEndStarting(b, cfg)
		frozen := make(chan struct{})
		ctx := context.Background()
		in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{
			Listen: func(ctx context.Context, a transport.Addr) (transport.Listener, error) {
				ln, err := transport.Listen(ctx, a)
				if err != nil {
					return nil, err
				}
				return &stallListener{Listener: ln, frozen: frozen}, nil
			},
		})
		if err != nil {
			b.Fatal(err)
		}
		sub := src.c.Subscribe(4096)
		m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{})
		if err != nil {
			b.Fatal(err)
		}
		for active := false; !active; {
			ev := <-sub.C()
			active = ev.Kind == machine.EventState && ev.Side == spec.Outgoing && ev.To == "active"
		}
		sub.Close()
		b.StartTimer()
		t0 := time.Now()
		close(frozen)
		var reported time.Duration
		for reported == 0 {
			st, _ := src.c.Status(spec.Outgoing, 0)
			if st.Stalled > 0 {
				reported = time.Since(t0)
			}
			if st.Terminal {
				break
			}
			time.Sleep(10 * time.Millisecond) // polling: the controller has no event for the stall report
		}
		sr, _ := m.Wait(ctx)
		st, _ := src.c.Status(spec.Outgoing, 0)
		elapsed := time.Since(t0)
		b.StopTimer()
		if sr.Err == nil || !st.Terminal || !src.g.Running() {
			b.Fatalf("source ended %s (%v), guest running %v", st.State, sr.Err, src.g.Running())
		}
		toTerminal = append(toTerminal, elapsed)
		toReport = append(toReport, reported)
		in.Abort("benchmark over")
		<-in.Done()
		for _, e := range []*end{src, dst} {
			e.c.Close()
			e.g.Close()
		}
		b.StartTimer()
	}
	slices.Sort(toTerminal)
	slices.Sort(toReport)
	b.ReportMetric(toTerminal[len(toTerminal)/2].Seconds(), "stall-to-terminal-s")
	b.ReportMetric(toReport[len(toReport)/2].Seconds(), "stall-reported-s")
}
