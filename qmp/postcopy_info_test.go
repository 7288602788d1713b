package qmp

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// query-migrate's postcopy members, with QEMU's names and units: the
// source's ram.postcopy-requests and ram.postcopy-bytes; the
// destination's postcopy-blocktime and postcopy-vcpu-blocktime (ms, only
// when measured: capability postcopy-blocktime) and postcopy-latency (ns);
// migctl's x-migctl-not-converging while a source in precopy does not
// converge.
func TestMigrationInfoPostcopy(t *testing.T) {
	none := machine.Status{Report: spec.ReportNone}
	for _, tc := range []struct {
		name    string
		in, out machine.Status
		want    map[string]any // member path → JSON value; nil value: absent
	}{
		{"source in postcopy", none, machine.Status{Report: spec.ReportPostcopy, QMPStatus: "postcopy-active", Stats: machine.Stats{PostcopyRequests: 7, PostcopyBytes: 4096}},
			map[string]any{"ram.postcopy-requests": 7.0, "ram.postcopy-bytes": 4096.0, "postcopy-blocktime": nil, "x-migctl-not-converging": nil}},
		{"destination with blocktime", machine.Status{Report: spec.ReportPostcopy, QMPStatus: "postcopy-active", Stats: machine.Stats{PostcopyBlocktime: 1500 * time.Microsecond, PostcopyVCPUBlocktime: []time.Duration{2 * time.Millisecond, 3 * time.Millisecond}, PostcopyLatency: 120 * time.Microsecond}}, none,
			map[string]any{"postcopy-blocktime": 1.0, "postcopy-vcpu-blocktime": []any{2.0, 3.0}, "postcopy-latency": 120000.0}},
		{"destination without blocktime", machine.Status{Report: spec.ReportPostcopy, QMPStatus: "postcopy-active"}, none,
			map[string]any{"postcopy-blocktime": nil, "postcopy-vcpu-blocktime": nil, "postcopy-latency": nil}},
		{"source not converging", none, machine.Status{Report: spec.ReportProgress, QMPStatus: "active", Stats: machine.Stats{NotConverging: true}},
			map[string]any{"x-migctl-not-converging": true}},
		{"source converging", none, machine.Status{Report: spec.ReportProgress, QMPStatus: "active"},
			map[string]any{"x-migctl-not-converging": nil}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := json.Marshal(migrationInfo(tc.in, tc.out, time.Now()))
			if err != nil {
				t.Fatal(err)
			}
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatal(err)
			}
			for path, want := range tc.want {
				var got any
				var present bool
				if len(path) > 4 && path[:4] == "ram." {
					ram, _ := m["ram"].(map[string]any)
					got, present = ram[path[4:]]
				} else {
					got, present = m[path]
				}
				wb, _ := json.Marshal(want)
				gb, _ := json.Marshal(got)
				switch {
				case want == nil && present:
					t.Errorf("%s: %s = %s present, want absent", b, path, gb)
				case want != nil && string(gb) != string(wb):
					t.Errorf("%s: %s = %s, want %s", b, path, gb, wb)
				}
			}
		})
	}
}
