package qmp

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp/raw"

	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// query-migrate names the RDMA provider of an rdma: migration in the
// optional member x-migctl-rdma-provider, from whichever side the reply
// shows, and leaves it out otherwise.
func TestMigrationInfoRDMAProvider(t *testing.T) {
	none := machine.Status{Report: spec.ReportNone}
	for _, tc := range []struct {
		name    string
		in, out machine.Status
		want    string // "" means the member is absent
	}{
		{"destination listening on rdma", machine.Status{Report: spec.ReportProgress, QMPStatus: "setup", Stats: machine.Stats{RDMAProvider: "soft"}}, none, "soft"},
		{"source over rdma, completed", none, machine.Status{Report: spec.ReportFinal, QMPStatus: "completed", Stats: machine.Stats{RDMAProvider: "verbs"}}, "verbs"},
		{"source over tcp", none, machine.Status{Report: spec.ReportProgress, QMPStatus: "active"}, ""},
		{"destination over tcp", machine.Status{Report: spec.ReportProgress, QMPStatus: "active"}, none, ""},
		{"no migration", none, none, ""},
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
			got, present := m["x-migctl-rdma-provider"]
			switch {
			case tc.want == "" && present:
				t.Errorf("%s: x-migctl-rdma-provider %v present", b, got)
			case tc.want != "" && got != tc.want:
				t.Errorf("%s: x-migctl-rdma-provider %v, want %q", b, got, tc.want)
			}
		})
	}
}

// A QMP client that does not know the member ignores it: go-qemu's own
// MigrationInfo decodes a reply carrying it, with every member it knows.
func TestGoQemuIgnoresXMigctlMember(t *testing.T) {
	reply := []byte(`{"status":"active","total-time":12,"setup-time":1,"expected-downtime":3,` +
		`"ram":{"transferred":4096,"remaining":0,"total":8192,"duplicate":1,"normal":1,"normal-bytes":4096,"dirty-pages-rate":0,"mbps":1.5,"dirty-sync-count":1,"postcopy-requests":0,"page-size":4096,"multifd-bytes":0,"pages-per-second":1,"precopy-bytes":4096,"downtime-bytes":0,"postcopy-bytes":0,"dirty-sync-missed-zero-copy":0},` +
		`"x-migctl-rdma-provider":"soft"}`)
	var mine MigrationInfo
	if err := json.Unmarshal(reply, &mine); err != nil || mine.XMigctlRDMAProvider != "soft" {
		t.Fatalf("migctl's MigrationInfo: %+v, %v", mine, err)
	}
	var theirs raw.MigrationInfo
	if err := json.Unmarshal(reply, &theirs); err != nil {
		t.Fatalf("go-qemu's MigrationInfo refuses the reply: %v", err)
	}
	if theirs.Status == nil || theirs.Status.String() != "active" || theirs.TotalTime == nil || *theirs.TotalTime != 12 || theirs.RAM == nil || theirs.RAM.Transferred != 4096 {
		t.Fatalf("go-qemu decoded %+v", theirs)
	}
}

// x-migctl-query-digest answers the guest's digest, and says why when the
// guest has none now.
func TestQueryDigest(t *testing.T) {
	c, err := machine.New(testSpec(t), machine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	for _, tc := range []struct {
		name   string
		digest func() (uint64, error)
		want   string // a result, or a word of the error
		failed bool
	}{
		{"stopped guest", func() (uint64, error) { return 0x1234abcd, nil }, `{"digest":"000000001234abcd"}`, false},
		{"running guest", func() (uint64, error) { return 0, errors.New("guest: Checksum: the guest is running") }, "stop it first", true},
		{"no digest", nil, "has no digest", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewServer(c, noopHost{}, Options{Digest: tc.digest})
			defer s.Close()
			out := feed(s, []byte(`{"execute":"x-migctl-query-digest"}`), true)
			if len(out) != 1 {
				t.Fatalf("replies: %q", out)
			}
			var r struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Class, Desc string
				} `json:"error"`
			}
			if err := json.Unmarshal(out[0], &r); err != nil {
				t.Fatal(err)
			}
			switch {
			case tc.failed && (r.Error == nil || !strings.Contains(r.Error.Desc, tc.want)):
				t.Errorf("reply %s, want an error saying %q", out[0], tc.want)
			case !tc.failed && string(r.Return) != tc.want:
				t.Errorf("reply %s, want return %s", out[0], tc.want)
			}
		})
	}
}
