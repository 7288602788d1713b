package qmp

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/spec"
)

// probe issues query-migrate over the socket every millisecond until stop
// and records each round trip with the side's state when it was sent.
type sample struct {
	state string
	rtt   time.Duration
}

func probe(b *testing.B, n *node, side string, cl *Client, stop <-chan struct{}) []sample {
	var out []sample
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return out
		case <-t.C:
		}
		st, _ := n.c.State(side)
		t0 := time.Now()
		if _, err := cl.Execute(context.Background(), "query-migrate", nil); err != nil {
			b.Error(err)
			return out
		}
		out = append(out, sample{string(st), time.Since(t0)})
	}
}

func pctl(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[int(float64(len(d)-1)*p)]
}

func rtts(ss []sample, states ...string) []time.Duration {
	var out []time.Duration
	for _, s := range ss {
		if len(states) == 0 || slices.Contains(states, s.state) {
			out = append(out, s.rtt)
		}
	}
	return out
}

// BenchmarkQMPLatencyFullSpeed: the p99 round trip of query-migrate over
// the QMP socket on a destination loading at full speed (unlimited
// bandwidth, 512 MiB of random content over loopback TCP), and on the
// source while it sends and through switchover, each beside the idle p99
// measured on the same sockets in the same run.
func BenchmarkQMPLatencyFullSpeed(b *testing.B) {
	cfg := guest.Config{Size: 512 << 20, Seed: 3, Random: true, DirtyRate: 32 << 20, VRAM: -1}
	for b.Loop() {
		src := newNode(b, nodeOpts{guest: &cfg})
		dst := newNode(b, nodeOpts{dest: true, guest: &cfg})
		cs, cd, ps, pd := src.client(b), dst.client(b), src.client(b), dst.client(b)

		idleStop := make(chan struct{})
		idleS, idleD := make(chan []sample), make(chan []sample)
		go func() { idleS <- probe(b, src, spec.Outgoing, ps, idleStop) }()
		go func() { idleD <- probe(b, dst, spec.Incoming, pd, idleStop) }()
		time.Sleep(2 * time.Second) // the idle measuring window (this machine stalls large processes every ~500 ms)
		close(idleStop)
		idleSrc, idleDst := <-idleS, <-idleD

		run(b, cd, "migrate-set-capabilities", caps("events", true))
		run(b, cs, "migrate-set-capabilities", caps("events", true))
		run(b, cs, "migrate-set-parameters", map[string]any{"max-bandwidth": 0, "downtime-limit": 50})
		uri := listen(b, cd, map[string]any{"exit-on-error": false})
		stop := make(chan struct{})
		go func() { idleS <- probe(b, src, spec.Outgoing, ps, stop) }()
		go func() { idleD <- probe(b, dst, spec.Incoming, pd, stop) }()
		run(b, cs, "migrate", map[string]any{"uri": uri})
		waitStatus(b, cs, "completed")
		waitStatus(b, cd, "completed")
		close(stop)
		busySrc, busyDst := <-idleS, <-idleD

		load := rtts(busyDst, "active")
		send := rtts(busySrc, "active")
		sw := rtts(busySrc, "device", "pre-switchover")
		fmt.Fprintf(os.Stderr, "query-migrate over QMP: destination loading p99 %v (p50 %v, max %v, %d samples), idle p99 %v max %v\n",
			pctl(load, .99), pctl(load, .5), pctl(load, 1), len(load), pctl(rtts(idleDst), .99), pctl(rtts(idleDst), 1))
		fmt.Fprintf(os.Stderr, "                        source sending p99 %v (max %v, %d samples); switchover max %v (%d samples); idle p99 %v\n",
			pctl(send, .99), pctl(send, 1), len(send), pctl(sw, 1), len(sw), pctl(rtts(idleSrc), .99))
		b.ReportMetric(float64(pctl(load, .99).Microseconds()), "dst-load-p99-µs")
		b.ReportMetric(float64(pctl(rtts(idleDst), .99).Microseconds()), "dst-idle-p99-µs")
		b.ReportMetric(float64(pctl(send, .99).Microseconds()), "src-send-p99-µs")
		b.ReportMetric(float64(pctl(rtts(idleSrc), .99).Microseconds()), "src-idle-p99-µs")
		for _, c := range []*Client{cs, cd, ps, pd} {
			c.Close()
		}
		src.close()
		dst.close()
	}
}
