package main

import "slices"

// sample is one measurement of one configuration in one round. Figures a
// configuration does not have are nil.
type sample struct {
	Config string `json:"config"`
	Round  int    `json:"round"`
	Err    string `json:"error,omitempty"`

	Bytes   uint64  `json:"bytes"`    // moved: ram.transferred, or the raw bytes
	TotalMS float64 `json:"total_ms"` // the configuration's clock (config.Clock)

	TrueDowntimeMS     *float64 `json:"true_downtime_ms,omitempty"`     // source STOP → destination RESUME
	ReportedDowntimeMS *float64 `json:"reported_downtime_ms,omitempty"` // query-migrate's downtime
	DestStartMS        *float64 `json:"dest_start_ms,omitempty"`        // clockDestStart
	DestPeakRSS        uint64   `json:"dest_peak_rss,omitempty"`        // VmHWM, bytes
	// DestReadyRSS is the destination's VmRSS when it first answered QMP,
	// before migrate-incoming: a prepared destination holds all its RAM.
	DestReadyRSS uint64 `json:"dest_ready_rss,omitempty"`
	GuestRAM     uint64 `json:"guest_ram,omitempty"` // bytes
	// EndToEndMS is the driver's clock from sending migrate to the
	// destination's RESUME timestamp: one definition for both programs.
	EndToEndMS *float64 `json:"end_to_end_ms,omitempty"`
	Passes     uint64   `json:"passes,omitempty"`   // dirty-sync-count
	Settled    *bool    `json:"settled,omitempty"`  // the source was idle before migrate
	Verified   *bool    `json:"verified,omitempty"` // destination memory spot-checked equal to the source's
	FileBytes  int64    `json:"file_bytes,omitempty"`
}

// value returns the sample's figure for m, and whether it has one.
func (s sample) value(m metric) (float64, bool) {
	if s.Err != "" {
		return 0, false
	}
	switch m {
	case metricThroughput:
		if s.TotalMS <= 0 || s.Bytes == 0 {
			return 0, false
		}
		return float64(s.Bytes) / (s.TotalMS / 1000) / 1e9, true
	case metricStartPlusRun:
		if s.DestStartMS == nil || s.TotalMS <= 0 || s.Bytes == 0 {
			return 0, false
		}
		return float64(s.Bytes) / ((*s.DestStartMS + s.TotalMS) / 1000) / 1e9, true
	case metricTrueDowntime:
		if s.TrueDowntimeMS == nil {
			return 0, false
		}
		return *s.TrueDowntimeMS, true
	case metricRSSRatio:
		if s.DestPeakRSS == 0 || s.GuestRAM == 0 {
			return 0, false
		}
		return float64(s.DestPeakRSS) / float64(s.GuestRAM), true
	}
	return 0, false
}

// spread is a median with its range over N values.
type spread struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// summarize returns the median (the mean of the middle two for an even
// count), min and max of vs; ok is false for no values.
func summarize(vs []float64) (spread, bool) {
	if len(vs) == 0 {
		return spread{}, false
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return spread{Median: med, Min: s[0], Max: s[n-1], N: n}, true
}

// values collects metric m of a configuration's samples.
func values(samples []sample, config string, m metric) []float64 {
	var vs []float64
	for _, s := range samples {
		if s.Config != config {
			continue
		}
		if v, ok := s.value(m); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

// pairedRatios returns candidate/baseline of metric m for every round in
// which both have a figure, in round order.
func pairedRatios(samples []sample, candidate, baseline string, m metric) []float64 {
	byRound := map[int][2]*float64{}
	for _, s := range samples {
		v, ok := s.value(m)
		if !ok {
			continue
		}
		p := byRound[s.Round]
		switch s.Config {
		case candidate:
			p[0] = &v
		case baseline:
			p[1] = &v
		default:
			continue
		}
		byRound[s.Round] = p
	}
	rounds := make([]int, 0, len(byRound))
	for r := range byRound {
		rounds = append(rounds, r)
	}
	slices.Sort(rounds)
	var out []float64
	for _, r := range rounds {
		p := byRound[r]
		if p[0] != nil && p[1] != nil && *p[1] != 0 {
			out = append(out, *p[0] / *p[1])
		}
	}
	return out
}

// compared is a comparison's outcome.
type compared struct {
	comparison
	CandidateValue *spread `json:"candidate_value,omitempty"`
	BaselineValue  *spread `json:"baseline_value,omitempty"`
	Ratio          *spread `json:"ratio,omitempty"` // paired, per round
	// Met is whether the goal is reached (nil: no checkable goal or no
	// figures).
	Met     *bool  `json:"met,omitempty"`
	Skipped string `json:"skipped,omitempty"`
}

// compare evaluates c over the samples.
func compare(c comparison, samples []sample) compared {
	out := compared{comparison: c}
	if s, ok := summarize(values(samples, c.Candidate, c.Metric)); ok {
		out.CandidateValue = &s
	}
	if s, ok := summarize(values(samples, c.Baseline, c.Metric)); ok {
		out.BaselineValue = &s
	}
	if s, ok := summarize(pairedRatios(samples, c.Candidate, c.Baseline, c.Metric)); ok {
		out.Ratio = &s
	}
	switch {
	case c.GoalRatio > 0 && out.Ratio != nil:
		met := out.Ratio.Median >= c.GoalRatio
		out.Met = &met
	case c.GoalMax > 0 && out.CandidateValue != nil:
		met := out.CandidateValue.Median <= c.GoalMax
		out.Met = &met
	}
	return out
}
