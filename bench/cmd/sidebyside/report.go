package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// summary is the machine-readable result (-json), from which
// docs/benchmarks.md is regenerated (-markdown).
type summary struct {
	Tool        string            `json:"tool"`
	Format      int               `json:"format"`
	Started     string            `json:"started"`
	FinishedSec float64           `json:"elapsed_s"`
	Command     string            `json:"command"`
	Host        map[string]string `json:"host"`
	Params      params            `json:"params"`
	Clocks      map[string]string `json:"clocks"`
	Configs     []configResult    `json:"configs"`
	Comparisons []compared        `json:"comparisons"`
	Skipped     map[string]string `json:"skipped,omitempty"`
	Samples     []sample          `json:"samples"`
}

// summaryFormat is the version of summary's shape.
const summaryFormat = 1

// params are the campaign's inputs.
type params struct {
	GuestBytes   int64   `json:"guest_bytes"`
	ZeroFraction float64 `json:"zero_fraction"`
	RandomBytes  int64   `json:"random_bytes"`
	Rounds       int     `json:"rounds"`
	Backing      string  `json:"backing"`
	QEMULayout   string  `json:"qemu_layout"`
	MaxBandwidth uint64  `json:"max_bandwidth"`
	Transport    string  `json:"transport"`
	Guest        string  `json:"guest"`
}

// configResult is one configuration's figures over the rounds.
type configResult struct {
	config
	Throughput       *spread  `json:"throughput_gbps,omitempty"`
	StartPlusRun     *spread  `json:"start_plus_transfer_gbps,omitempty"`
	TotalMS          *spread  `json:"total_ms,omitempty"`
	TrueDowntimeMS   *spread  `json:"true_downtime_ms,omitempty"`
	ReportedDowntime *spread  `json:"reported_downtime_ms,omitempty"`
	DestStartMS      *spread  `json:"dest_start_ms,omitempty"`
	RSSRatio         *spread  `json:"destination_rss_per_guest,omitempty"`
	Failures         int      `json:"failures"`
	Errors           []string `json:"errors,omitempty"`
}

// summarizeConfig gathers one configuration's samples.
func summarizeConfig(c config, samples []sample) configResult {
	r := configResult{config: c}
	get := func(m metric) *spread {
		if s, ok := summarize(values(samples, c.Name, m)); ok {
			return &s
		}
		return nil
	}
	r.Throughput = get(metricThroughput)
	r.StartPlusRun = get(metricStartPlusRun)
	r.TrueDowntimeMS = get(metricTrueDowntime)
	r.RSSRatio = get(metricRSSRatio)
	var total, rep, start []float64
	for _, s := range samples {
		if s.Config != c.Name {
			continue
		}
		if s.Err != "" {
			r.Failures++
			r.Errors = append(r.Errors, fmt.Sprintf("round %d: %s", s.Round, s.Err))
			continue
		}
		total = append(total, s.TotalMS)
		if s.ReportedDowntimeMS != nil {
			rep = append(rep, *s.ReportedDowntimeMS)
		}
		if s.DestStartMS != nil {
			start = append(start, *s.DestStartMS)
		}
	}
	for _, p := range []struct {
		dst **spread
		vs  []float64
	}{{&r.TotalMS, total}, {&r.ReportedDowntime, rep}, {&r.DestStartMS, start}} {
		if s, ok := summarize(p.vs); ok {
			*p.dst = &s
		}
	}
	return r
}

// fmtSpread prints a spread as "median [min–max]" with the given format,
// or "—".
func fmtSpread(s *spread, format string) string {
	if s == nil {
		return "—"
	}
	if s.N == 1 || s.Min == s.Max {
		return fmt.Sprintf(format, s.Median)
	}
	return fmt.Sprintf(format+" ["+format+"–"+format+"]", s.Median, s.Min, s.Max)
}

// metricFormat is how a metric's values print.
func metricFormat(m metric) (format, unit string) {
	switch m {
	case metricThroughput, metricStartPlusRun:
		return "%.2f", "GB/s"
	case metricTrueDowntime:
		return "%.1f", "ms"
	case metricRSSRatio:
		return "%.3f", "×RAM"
	}
	return "%g", ""
}

// printText writes the human-readable report.
func printText(w io.Writer, sum summary) {
	p := sum.Params
	fmt.Fprintf(w, "\nside-by-side, %s: guest %s (%s random, %.0f%% zero pages; QEMU layout %s), idle, %s, max-bandwidth %s/s, "+
		"%d alternating round(s), migctl backing %s\n",
		sum.Started, fmtBytes(p.GuestBytes), fmtBytes(p.RandomBytes), p.ZeroFraction*100, p.QEMULayout, p.Transport,
		fmtBytes(int64(p.MaxBandwidth)), p.Rounds, p.Backing)
	for _, k := range []string{"qemu", "migctl", "commit", "kernel", "cpus", "thp", "thp_shmem"} {
		if v, ok := sum.Host[k]; ok {
			fmt.Fprintf(w, "  %-9s %s\n", k, v)
		}
	}
	fmt.Fprintln(w, "\nconfigurations (median [min–max] over the rounds; GB/s = 10^9 B/s):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  config\tthroughput GB/s\ttotal ms\ttrue downtime ms\treported downtime ms\tdest start ms\tdest peak RSS/RAM\tfailed")
	for _, r := range sum.Configs {
		if _, ok := sum.Skipped[r.Name]; ok {
			fmt.Fprintf(tw, "  %s\tskipped (below)\t\t\t\t\t\t\n", r.Name)
			continue
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", r.Name,
			fmtSpread(r.Throughput, "%.2f"), fmtSpread(r.TotalMS, "%.0f"), fmtSpread(r.TrueDowntimeMS, "%.1f"),
			fmtSpread(r.ReportedDowntime, "%.0f"), fmtSpread(r.DestStartMS, "%.0f"), fmtSpread(r.RSSRatio, "%.3f"), r.Failures)
	}
	tw.Flush()
	for _, r := range sum.Configs {
		if why, ok := sum.Skipped[r.Name]; ok {
			fmt.Fprintf(w, "  %s skipped: %s\n", r.Name, why)
		}
		for _, e := range r.Errors {
			fmt.Fprintf(w, "  %s failed, %s\n", r.Name, e)
		}
	}
	fmt.Fprintln(w, "\ncomparisons (ratio = candidate / baseline, paired within each round, median [min–max]):")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  row\tcandidate\tbaseline\tratio\tgoal (issue 8)\t")
	for _, c := range sum.Comparisons {
		f, unit := metricFormat(c.Metric)
		if c.Skipped != "" {
			fmt.Fprintf(tw, "  %s\tskipped (%s)\t\t\t%s\t\n", c.Name, c.Skipped, c.Goal)
			continue
		}
		met := ""
		if c.Met != nil {
			met = "  not met"
			if *c.Met {
				met = "  met"
			}
		}
		fmt.Fprintf(tw, "  %s\t%s %s\t%s %s\t%s\t%s%s\t\n", c.Name,
			fmtSpread(c.CandidateValue, f), unit, fmtSpread(c.BaselineValue, f), unit, fmtSpread(c.Ratio, "%.2f"), c.Goal, met)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nwhere each clock starts and stops:")
	for _, k := range []string{"qemu", "migctl", "raw", "raw-write", "mapped-ram", "true-downtime", "dest-start", "rss"} {
		fmt.Fprintf(w, "  %s: %s\n", k, sum.Clocks[k])
	}
}

// clockTexts are the clocks, keyed as printed.
func clockTexts() map[string]string {
	return map[string]string{
		"qemu": clockQEMU, "migctl": clockMigctl, "raw": clockRaw, "raw-write": clockRawWrite,
		"mapped-ram": clockMappedRAM, "true-downtime": clockTrueDowntime, "dest-start": clockDestStart, "rss": clockRSS,
	}
}

// printMarkdown writes the comparisons as rows of docs/benchmarks.md's
// table, from a summary read back from -json.
func printMarkdown(w io.Writer, sum summary) {
	p := sum.Params
	fmt.Fprintf(w, "Side by side with QEMU (%s; `%s`): guest %s holding %s of random data (%.0f%% zero pages), idle, %s, "+
		"%d alternating rounds, medians [min–max], ratios paired within a round.\n\n",
		sum.Started, sum.Command, fmtBytes(p.GuestBytes), fmtBytes(p.RandomBytes), p.ZeroFraction*100, p.Transport, p.Rounds)
	fmt.Fprintln(w, "| row | candidate | baseline | ratio | goal |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, c := range sum.Comparisons {
		f, unit := metricFormat(c.Metric)
		if c.Skipped != "" {
			fmt.Fprintf(w, "| %s | skipped: %s | | | %s |\n", c.Name, c.Skipped, c.Goal)
			continue
		}
		goal := c.Goal
		if c.Met != nil {
			goal += map[bool]string{true: " (met)", false: " (not met)"}[*c.Met]
		}
		fmt.Fprintf(w, "| %s | %s %s | %s %s | %s | %s |\n", c.Name, fmtSpread(c.CandidateValue, f), unit,
			fmtSpread(c.BaselineValue, f), unit, fmtSpread(c.Ratio, "%.2f"), goal)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| configuration | throughput GB/s | true downtime ms | destination start ms | destination peak RSS / RAM |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, r := range sum.Configs {
		if why, ok := sum.Skipped[r.Name]; ok {
			fmt.Fprintf(w, "| %s | skipped: %s | | | |\n", r.Label, why)
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", r.Label, fmtSpread(r.Throughput, "%.2f"),
			fmtSpread(r.TrueDowntimeMS, "%.1f"), fmtSpread(r.DestStartMS, "%.0f"), fmtSpread(r.RSSRatio, "%.3f"))
	}
}

// fmtBytes prints n in binary units.
func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return strings.TrimSuffix(fmt.Sprintf("%.1f", float64(n)/(1<<20)), ".0") + " MiB"
	}
	return fmt.Sprintf("%d B", n)
}
