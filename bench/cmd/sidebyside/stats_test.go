package main

import (
	"math"
	"os"
	"slices"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(cleanup{m}) }

// cleanup removes the binaries the end-to-end tests built once all tests
// ran.
type cleanup struct{ m *testing.M }

func (c cleanup) Run() int {
	code := c.m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	return code
}

func f(v float64) *float64 { return &v }

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

// The median is the middle value, or the mean of the middle two.
func TestSummarize(t *testing.T) {
	cases := []struct {
		in   []float64
		want spread
	}{
		{[]float64{3}, spread{3, 3, 3, 1}},
		{[]float64{5, 1, 3}, spread{3, 1, 5, 3}},
		{[]float64{4, 1, 3, 2}, spread{2.5, 1, 4, 4}},
		{[]float64{2, 2, 9, 1, 2}, spread{2, 1, 9, 5}},
	}
	for _, c := range cases {
		in := slices.Clone(c.in)
		got, ok := summarize(c.in)
		if !ok || got != c.want {
			t.Errorf("summarize(%v) = %+v, %v; want %+v", in, got, ok, c.want)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("summarize reordered its input: %v", c.in)
		}
	}
	if _, ok := summarize(nil); ok {
		t.Error("summarize(nil) reported a value")
	}
}

// Each metric, worked out by hand.
func TestSampleValue(t *testing.T) {
	s := sample{Bytes: 1e9, TotalMS: 500, DestStartMS: f(500), TrueDowntimeMS: f(3.5), DestPeakRSS: 1100, GuestRAM: 1000}
	want := map[metric]float64{
		metricThroughput:   2,   // 1e9 B in 0.5 s
		metricStartPlusRun: 1,   // 1e9 B in 0.5 + 0.5 s
		metricTrueDowntime: 3.5, //
		metricRSSRatio:     1.1, // 1100 / 1000
	}
	for m, w := range want {
		got, ok := s.value(m)
		if !ok || !near(got, w) {
			t.Errorf("%s = %v, %v; want %v", m, got, ok, w)
		}
	}
	failed := s
	failed.Err = "boom"
	for m := range want {
		if _, ok := failed.value(m); ok {
			t.Errorf("a failed sample has a %s", m)
		}
	}
	empty := sample{}
	for m := range want {
		if _, ok := empty.value(m); ok {
			t.Errorf("a sample without figures has a %s", m)
		}
	}
}

// Ratios pair the candidate and the baseline of the same round only;
// rounds where either failed are left out.
func TestPairedRatios(t *testing.T) {
	ss := []sample{
		{Config: "a", Round: 0, Bytes: 2e9, TotalMS: 1000}, // 2 GB/s
		{Config: "b", Round: 0, Bytes: 1e9, TotalMS: 1000}, // 1 GB/s
		{Config: "b", Round: 1, Bytes: 1e9, TotalMS: 500},  // 2 GB/s
		{Config: "a", Round: 1, Bytes: 3e9, TotalMS: 1000}, // 3 GB/s
		{Config: "a", Round: 2, Bytes: 3e9, TotalMS: 1000},
		{Config: "b", Round: 2, Err: "failed"},
		{Config: "c", Round: 2, Bytes: 1e9, TotalMS: 1000},
		{Config: "b", Round: 3, Bytes: 1e9, TotalMS: 1000}, // no a in round 3
	}
	got := pairedRatios(ss, "a", "b", metricThroughput)
	want := []float64{2, 1.5}
	if len(got) != len(want) {
		t.Fatalf("pairedRatios = %v, want %v", got, want)
	}
	for i := range want {
		if !near(got[i], want[i]) {
			t.Fatalf("pairedRatios = %v, want %v", got, want)
		}
	}
}

// A ratio goal is judged on the median paired ratio; a ceiling goal on
// the candidate's median.
func TestCompareGoals(t *testing.T) {
	ss := []sample{
		{Config: "a", Round: 0, Bytes: 1e9, TotalMS: 1000, TrueDowntimeMS: f(4)},
		{Config: "b", Round: 0, Bytes: 1e9, TotalMS: 1250, TrueDowntimeMS: f(200)},
		{Config: "a", Round: 1, Bytes: 1e9, TotalMS: 1000, TrueDowntimeMS: f(6)},
		{Config: "b", Round: 1, Bytes: 1e9, TotalMS: 1000, TrueDowntimeMS: f(100)},
		{Config: "a", Round: 2, Bytes: 1e9, TotalMS: 1000, TrueDowntimeMS: f(5)},
		{Config: "b", Round: 2, Bytes: 1e9, TotalMS: 1500, TrueDowntimeMS: f(150)},
	}
	cases := []struct {
		c     comparison
		ratio float64 // median paired ratio
		met   *bool
	}{
		// ratios 1.25, 1, 1.5: median 1.25
		{comparison{Candidate: "a", Baseline: "b", Metric: metricThroughput, GoalRatio: 1.2}, 1.25, new(true)},
		{comparison{Candidate: "a", Baseline: "b", Metric: metricThroughput, GoalRatio: 1.3}, 1.25, new(false)},
		{comparison{Candidate: "a", Baseline: "b", Metric: metricThroughput}, 1.25, nil},
		// downtimes 4, 6, 5: median 5; ratios 0.02, 0.06, 0.0333…
		{comparison{Candidate: "a", Baseline: "b", Metric: metricTrueDowntime, GoalMax: 5}, 5.0 / 150, new(true)},
		{comparison{Candidate: "a", Baseline: "b", Metric: metricTrueDowntime, GoalMax: 4.9}, 5.0 / 150, new(false)},
	}
	for _, c := range cases {
		got := compare(c.c, ss)
		if got.Ratio == nil || !near(got.Ratio.Median, c.ratio) {
			t.Errorf("%+v: ratio %+v, want median %v", c.c, got.Ratio, c.ratio)
		}
		switch {
		case c.met == nil && got.Met != nil:
			t.Errorf("%+v: met %v, want no verdict", c.c, *got.Met)
		case c.met != nil && got.Met == nil:
			t.Errorf("%+v: no verdict, want met=%v", c.c, *c.met)
		case c.met != nil && *got.Met != *c.met:
			t.Errorf("%+v: met %v, want %v", c.c, *got.Met, *c.met)
		}
	}
	none := compare(comparison{Candidate: "x", Baseline: "b", Metric: metricThroughput, GoalRatio: 1}, ss)
	if none.Ratio != nil || none.Met != nil || none.CandidateValue != nil {
		t.Errorf("a comparison without candidate samples has figures: %+v", none)
	}
}

// Every comparison names configurations that exist and a metric they
// can have.
func TestComparisonsNameConfigs(t *testing.T) {
	byName := map[string]config{}
	for _, c := range configs {
		if _, dup := byName[c.Name]; dup {
			t.Errorf("configuration %s twice", c.Name)
		}
		byName[c.Name] = c
	}
	for _, cmp := range comparisons {
		for _, n := range []string{cmp.Candidate, cmp.Baseline} {
			c, ok := byName[n]
			if !ok {
				t.Errorf("%q names unknown configuration %q", cmp.Name, n)
				continue
			}
			migrates := c.Kind == kindQEMU || c.Kind == kindMigctl
			if cmp.Metric == metricTrueDowntime && !migrates {
				t.Errorf("%q: %s has no true downtime", cmp.Name, n)
			}
		}
		if cmp.GoalRatio > 0 && cmp.GoalMax > 0 {
			t.Errorf("%q has two goals", cmp.Name)
		}
	}
}

// Odd rounds run the configurations in the reverse order.
func TestRoundOrder(t *testing.T) {
	cs := []config{{Name: "a"}, {Name: "b"}, {Name: "c"}}
	names := func(cs []config) string {
		s := ""
		for _, c := range cs {
			s += c.Name
		}
		return s
	}
	for r, want := range []string{"abc", "cba", "abc", "cba"} {
		if got := names(roundOrder(cs, r)); got != want {
			t.Errorf("round %d: %s, want %s", r, got, want)
		}
	}
	if names(cs) != "abc" {
		t.Error("roundOrder reordered its input")
	}
}
