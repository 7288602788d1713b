package reliability

import (
	"slices"
	"strings"
	"testing"
)

// TestPairwiseCovers: the default subset holds only runnable cells, and
// for every runnable cell of the full matrix it has a cell with the same
// state and fault, one with the same fault and transport, and one with the
// same state and transport.
func TestPairwiseCovers(t *testing.T) {
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	sub := pairwise(cells)
	for _, s := range sub {
		if s.Skip != "" {
			t.Errorf("the subset runs %s, which is skipped: %s", s.ID(), s.Skip)
		}
	}
	n := 0
	for _, c := range cells {
		if c.Skip != "" {
			continue
		}
		n++
		if !slices.ContainsFunc(sub, func(s cell) bool { return s.point() == c.point() && s.Fault == c.Fault }) {
			t.Errorf("no cell of the subset has state %s with fault %s", c.point(), c.Fault)
		}
		if !slices.ContainsFunc(sub, func(s cell) bool { return s.Fault == c.Fault && s.Transport == c.Transport }) {
			t.Errorf("no cell of the subset has fault %s over %s", c.Fault, c.Transport)
		}
		if !slices.ContainsFunc(sub, func(s cell) bool { return s.point() == c.point() && s.Transport == c.Transport }) {
			t.Errorf("no cell of the subset has state %s over %s", c.point(), c.Transport)
		}
	}
	if len(sub) >= n {
		t.Errorf("the subset has %d cells of %d runnable: it is no subset", len(sub), n)
	}
}

// TestCellsHandPicked: cells whose fate is known without the code —
// runnable ones, and skipped ones with the kind of reason written here
// (from issue 9 and the transports' nature).
func TestCellsHandPicked(t *testing.T) {
	want := map[string]string{ // cell ID: "" (runs) or the skip reason's start
		"tcp/outgoing:committed/cut":             "",
		"unix/incoming:loaded/stall":             "",
		"fd/outgoing:active/reset-back":          "",
		"exec/outgoing:device/kill-dst":          "",
		"file/outgoing:active/write-fails":       "",
		"tcp/incoming:completed/kill-src":        "",
		"tcp/outgoing:none/cut":                  "unreachable",
		"exec/incoming:loaded/cut":               "unreachable",
		"exec/outgoing:unknown-outcome/cut":      "unreachable",
		"exec/outgoing:active/corrupt-back":      "n/a",
		"tcp/outgoing:active/write-fails":        "n/a",
		"file/outgoing:active/cut":               "n/a",
		"file/outgoing:active/kill-dst":          "n/a",
		"unix/incoming:setup/reset-fwd":          "n/a",
		"tcp/outgoing:completed/stall":           "n/a",
		"tcp/outgoing:failed/cut":                "n/a",
		"tcp/outgoing:postcopy-active/cut":       "pending postcopy",
		"unix/incoming:postcopy-paused/kill-src": "pending postcopy",
		"rdma/outgoing:active/cut":               "not in the matrix yet: rdma:",
	}
	cells, err := allCells()
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]cell{}
	for _, c := range cells {
		byID[c.ID()] = c
	}
	for id, w := range want {
		c, ok := byID[id]
		switch {
		case !ok:
			t.Errorf("%s is no cell", id)
		case w == "" && c.Skip != "":
			t.Errorf("%s is skipped (%s), want it run", id, c.Skip)
		case w != "" && !strings.HasPrefix(c.Skip, w):
			t.Errorf("%s: skip reason %q, want one starting %q", id, c.Skip, w)
		}
	}
	for _, c := range cells {
		if strings.HasPrefix(c.Skip, "no outcome class") {
			t.Errorf("%s: %s", c.ID(), c.Skip)
		}
		if c.Skip == "" {
			if _, err := allowed(c); err != nil {
				t.Errorf("%s: %v", c.ID(), err)
			}
		}
	}
}
