package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/qmp"
)

// startServeB starts `migctl serve` for a benchmark and returns its socket.
func startServeB(b *testing.B, name string, args ...string) string {
	b.Helper()
	sock := filepath.Join(b.TempDir(), name+".sock")
	cmd := exec.Command(binary, append([]string{"serve", "--qmp", "unix:" + sock}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || !strings.Contains(line, "serving QMP") {
		b.Fatalf("%s: serve said %q (%v)", name, line, err)
	}
	return sock
}

type qmpSample struct {
	status string
	rtt    time.Duration
}

// probeQMP sends query-migrate every millisecond until stop and records
// the round trips with the status each reply carried.
func probeQMP(b *testing.B, cl *qmp.Client, stop <-chan struct{}) []qmpSample {
	var out []qmpSample
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return out
		case <-t.C:
		}
		t0 := time.Now()
		raw, err := cl.Execute(context.Background(), "query-migrate", nil)
		if err != nil {
			b.Error(err)
			return out
		}
		rtt := time.Since(t0)
		var info struct {
			Status string `json:"status"`
		}
		json.Unmarshal(raw, &info)
		out = append(out, qmpSample{info.Status, rtt})
	}
}

func qmpPct(ss []qmpSample, p float64, statuses ...string) (time.Duration, int) {
	var d []time.Duration
	for _, s := range ss {
		if len(statuses) == 0 || slices.Contains(statuses, s.status) {
			d = append(d, s.rtt)
		}
	}
	if len(d) == 0 {
		return 0, 0
	}
	slices.Sort(d)
	return d[int(float64(len(d)-1)*p)], len(d)
}

// BenchmarkServeQueryLatency: two `migctl serve` processes (1 GiB guest
// dirtying 64 MiB/s, unlimited bandwidth, loopback TCP) and a client in
// this process sending query-migrate every millisecond to each: the p99
// round trip on the destination while it loads, on the source while it
// sends and through switchover, each beside the idle p99 of the same
// sockets measured just before (2 s).
func BenchmarkServeQueryLatency(b *testing.B) {
	guest := "--guest=size=1G,dirty-rate=64M,seed=8"
	for b.Loop() {
		src := startServeB(b, "src", guest)
		dst := startServeB(b, "dst", guest, "--destination")
		ctx := context.Background()
		ps, err := qmp.DialAddr(ctx, "unix:"+src)
		if err != nil {
			b.Fatal(err)
		}
		pd, err := qmp.DialAddr(ctx, "unix:"+dst)
		if err != nil {
			b.Fatal(err)
		}
		measure := func(d time.Duration, until func()) ([]qmpSample, []qmpSample) {
			stop := make(chan struct{})
			rs, rd := make(chan []qmpSample), make(chan []qmpSample)
			go func() { rs <- probeQMP(b, ps, stop) }()
			go func() { rd <- probeQMP(b, pd, stop) }()
			if until != nil {
				until()
			} else {
				time.Sleep(d) // the measuring window
			}
			close(stop)
			return <-rs, <-rd
		}
		idleS, idleD := measure(2*time.Second, nil)
		cs, _ := qmp.DialAddr(ctx, "unix:"+src)
		cd, _ := qmp.DialAddr(ctx, "unix:"+dst)
		cd.Execute(ctx, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0", "exit-on-error": false})
		raw, _ := cd.Execute(ctx, "query-migrate", nil)
		var info qmp.MigrationInfo
		json.Unmarshal(raw, &info)
		if len(info.SocketAddress) == 0 {
			b.Fatalf("destination not listening: %s", raw)
		}
		cs.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": 0, "downtime-limit": 50})
		if d := os.Getenv("MIGCTL_BENCH_DEST_HEADSTART"); d != "" {
			hs, _ := time.ParseDuration(d)
			time.Sleep(hs) // the destination pre-faults while it waits
		}
		busyS, busyD := measure(0, func() {
			if _, err := cs.Execute(ctx, "migrate", map[string]any{"uri": info.SocketAddress[0].URI()}); err != nil {
				b.Fatal(err)
			}
			for {
				raw, _ := cs.Execute(ctx, "query-migrate", nil)
				var st struct {
					Status string `json:"status"`
				}
				json.Unmarshal(raw, &st)
				if st.Status == "completed" || st.Status == "failed" {
					return
				}
				time.Sleep(5 * time.Millisecond) // polling a remote process's state
			}
		})
		load, nl := qmpPct(busyD, .99, "active")
		send, ns := qmpPct(busyS, .99, "active")
		sw, nsw := qmpPct(busyS, 1, "device", "pre-switchover")
		idleDst, _ := qmpPct(idleD, .99)
		idleSrc, _ := qmpPct(idleS, .99)
		fmt.Fprintf(os.Stderr, "serve processes, query-migrate p99: destination loading %v (%d samples; idle %v), source sending %v (%d samples; idle %v), source switchover max %v (%d samples)\n",
			load, nl, idleDst, send, ns, idleSrc, sw, nsw)
		b.ReportMetric(float64(load.Microseconds()), "dst-load-p99-µs")
		b.ReportMetric(float64(send.Microseconds()), "src-send-p99-µs")
		b.ReportMetric(float64(idleDst.Microseconds()), "dst-idle-p99-µs")
		for _, c := range []*qmp.Client{ps, pd, cs, cd} {
			c.Close()
		}
	}
}
