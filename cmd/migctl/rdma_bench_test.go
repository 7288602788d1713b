package main

import (
	"encoding/json"
	"os"
	"testing"
)

// BenchmarkRDMAvsTCP migrates an idle built-in guest (MIGCTL_BENCH_SIZE,
// default 256M; dirty-rate 0, so every page is sent once) between two
// processes with `migctl demo`, over tcp: and over rdma: on the software
// provider, on demand and with rdma-pin-all, in one run. Each iteration is
// a whole demo process (it prepares the guest and starts the destination
// process), so ns/op is not the figure to read; the reported metrics are:
//
//   - MiB/s: the guest's RAM over the migration's total time, whose clock
//     starts when the source fires migrate (engine.Start) and stops when
//     the destination's confirmation (SHUT) completed the migration;
//   - x-tcp: that throughput over tcp:'s in the same run;
//   - dest-cpu-s/GiB: the destination process's whole CPU time, user and
//     system, all threads (getrusage RUSAGE_SELF), from its "listening"
//     report to its "done" report — accepting, pre-faulting, receiving,
//     applying, the page checksums (the demo verifies with them) and
//     starting the guest — per GiB of guest RAM received.
//
// The soft provider still copies every byte on the destination's CPU
// (read(2) from its TCP connection into guest memory, by its receiver
// goroutine); what it saves against tcp: is the loader's work per page
// (a record parsed and copied 4 KiB at a time, its checksum taken inline
// on the loader goroutine) against one read(2) per merged 1 MiB WRITE and
// the checksums taken in parallel at the end. The saving RDMA exists for —
// no destination CPU touching the bytes at all, no kernel TCP on either
// side — needs a real device (the verbs provider), which these machines do
// not have.
func BenchmarkRDMAvsTCP(b *testing.B) {
	size := os.Getenv("MIGCTL_BENCH_SIZE")
	if size == "" {
		size = "256M"
	}
	var tcpRate float64
	for _, v := range []struct {
		name string
		args []string
	}{
		{"tcp", []string{"--transport", "tcp"}},
		{"rdma-soft", []string{"--transport", "rdma", "--rdma-provider", "soft"}},
		{"rdma-soft-pin-all", []string{"--transport", "rdma", "--rdma-provider", "soft", "--cap", "rdma-pin-all=on"}},
	} {
		b.Run(v.name, func(b *testing.B) {
			var ram, ms, cpu float64
			for range b.N {
				args := append([]string{"demo", "--json", "-q", "--size", size, "--dirty-rate", "0"}, v.args...)
				out, errOut, code := run(b, args...)
				var r demoResult
				if err := json.Unmarshal([]byte(out), &r); err != nil || code != 0 || !r.Verified {
					b.Fatalf("demo %v: exit %d, %q (%v); stderr: %s", args, code, out, err, errOut)
				}
				ram += float64(r.SizeBytes)
				ms += r.TotalTimeMS
				cpu += r.DestinationCPUSeconds
			}
			rate := ram / (1 << 20) / (ms / 1000)
			b.ReportMetric(rate, "MiB/s")
			b.ReportMetric(cpu/(ram/(1<<30)), "dest-cpu-s/GiB")
			if v.name == "tcp" {
				tcpRate = rate
			} else if tcpRate > 0 {
				b.ReportMetric(rate/tcpRate, "x-tcp")
			}
		})
	}
}
