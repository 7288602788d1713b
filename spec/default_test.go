package spec

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
)

func loadDefault(t testing.TB) *Spec {
	t.Helper()
	s, err := Load("transitions.yaml", readDefault(t), registry)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// The default spec must follow QEMU: capabilities and parameters in QEMU's
// enum order (qemu-control.md §2, §3; QAPI MigrationCapability and
// MigrationParameter).
func TestDefaultCapabilitiesAndParameters(t *testing.T) {
	s := loadDefault(t)
	caps := names(s.Capabilities, func(c Capability) string { return c.Name })
	wantCaps := []string{"xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo",
		"release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
		"postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
		"background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram"}
	if !slices.Equal(caps, wantCaps) {
		t.Errorf("capabilities:\n got %v\nwant %v", caps, wantCaps)
	}
	for _, c := range s.Capabilities {
		if c.Since == "" {
			t.Errorf("capability %s has no since", c.Name)
		}
	}
	params := names(s.Parameters, func(p Parameter) string { return p.Name })
	wantParams := []string{"announce-initial", "announce-max", "announce-rounds", "announce-step",
		"throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow",
		"tls-creds", "tls-hostname", "tls-authz", "max-bandwidth", "avail-switchover-bandwidth", "downtime-limit",
		"x-checkpoint-delay", "multifd-channels", "xbzrle-cache-size", "max-postcopy-bandwidth", "max-cpu-throttle",
		"multifd-compression", "multifd-zlib-level", "multifd-qatzip-level", "multifd-zstd-level",
		"block-bitmap-mapping", "x-vcpu-dirty-limit-period", "vcpu-dirty-limit", "mode", "zero-page-detection",
		"direct-io", "cpr-exec-command",
		// migctl's extensions (issues 9, 11) follow QEMU's parameters.
		"x-migctl-keepalive", "x-migctl-io-timeout", "x-migctl-convergence-passes"}
	if !slices.Equal(params, wantParams) {
		t.Errorf("parameters:\n got %v\nwant %v", params, wantParams)
	}
	var live, match, capMatch []string
	for _, p := range s.Parameters {
		if p.Live {
			live = append(live, p.Name)
		}
		if p.MustMatchPeer {
			match = append(match, p.Name)
		}
	}
	for _, c := range s.Capabilities {
		if c.MustMatchPeer {
			capMatch = append(capMatch, c.Name)
		}
	}
	wantLive := []string{"announce-initial", "announce-max", "announce-rounds", "announce-step",
		"throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow",
		"max-bandwidth", "avail-switchover-bandwidth", "downtime-limit", "x-checkpoint-delay",
		"xbzrle-cache-size", "max-postcopy-bandwidth", "max-cpu-throttle", "x-vcpu-dirty-limit-period", "vcpu-dirty-limit",
		"x-migctl-keepalive", "x-migctl-io-timeout", "x-migctl-convergence-passes"}
	if !slices.Equal(live, wantLive) {
		t.Errorf("live parameters:\n got %v\nwant %v", live, wantLive)
	}
	if want := []string{"multifd-channels", "multifd-compression", "zero-page-detection"}; !slices.Equal(match, want) {
		t.Errorf("must-match parameters: got %v, want %v", match, want)
	}
	wantCapMatch := []string{"xbzrle", "postcopy-ram", "x-colo", "return-path", "multifd", "dirty-bitmaps",
		"x-ignore-shared", "postcopy-preempt", "switchover-ack", "mapped-ram"}
	if !slices.Equal(capMatch, wantCapMatch) {
		t.Errorf("must-match capabilities:\n got %v\nwant %v", capMatch, wantCapMatch)
	}
	// Ranges from qemu-control.md §3.
	for _, c := range []struct {
		name      string
		ok, notOK []any
	}{
		{"announce-step", []any{"1", "10000"}, []any{"0", "10001"}},
		{"throttle-trigger-threshold", []any{"1", "100"}, []any{"0", "101"}},
		{"cpu-throttle-initial", []any{"1", "99"}, []any{"0", "100"}},
		{"downtime-limit", []any{"0", "2000000"}, []any{"2000001"}},
		{"multifd-channels", []any{"1", "255"}, []any{"0", "256"}},
		{"multifd-zstd-level", []any{"0", "20"}, []any{"21"}},
		{"multifd-qatzip-level", []any{"1", "9"}, []any{"0", "10"}},
		{"xbzrle-cache-size", []any{"4096", "64M"}, []any{"2048", "100000"}},
		{"x-vcpu-dirty-limit-period", []any{"1", "1000"}, []any{"0", "1001"}},
		{"vcpu-dirty-limit", []any{"1"}, []any{"0"}},
		{"multifd-compression", []any{"none", "qatzip"}, []any{"lz4"}},
		{"mode", []any{"cpr-exec"}, []any{"cpr"}},
	} {
		p := s.Parameter(c.name)
		for _, v := range c.ok {
			if _, err := p.Normalize(v); err != nil {
				t.Errorf("%s = %v refused: %v", c.name, v, err)
			}
		}
		for _, v := range c.notOK {
			if _, err := p.Normalize(v); err == nil {
				t.Errorf("%s = %v accepted", c.name, v)
			}
		}
	}
}

func TestDefaultTransports(t *testing.T) {
	s := loadDefault(t)
	got := map[string]string{}
	for i := range s.Transports {
		tr := &s.Transports[i]
		var props []string
		for _, p := range []string{PropMultiChannel, PropSeekable, PropReturnPath, PropExtraFDs, PropStreamable} {
			if tr.Has(p) {
				props = append(props, p)
			}
		}
		got[tr.Name] = strings.Join(props, " ")
	}
	want := map[string]string{
		"tcp":   "multi-channel return-path streamable",
		"unix":  "multi-channel return-path streamable",
		"vsock": "multi-channel return-path streamable",
		"fd":    "return-path streamable",
		"exec":  "streamable",
		"rdma":  "return-path streamable",
		"file":  "seekable extra-fds",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("transports:\n got %v\nwant %v", got, want)
	}
}

func TestDefaultRules(t *testing.T) {
	s := loadDefault(t)
	rules := map[string]Rule{}
	for _, r := range s.Rules() {
		if _, dup := rules[r.Name]; dup {
			t.Errorf("two rules named %s", r.Name)
		}
		rules[r.Name] = r
	}
	// Every rule the QEMU mapping in docs/spec.md names must exist.
	for _, name := range []string{
		"x-colo/needs-kernel", "postcopy-ram/needs-kernel", "postcopy-ram/conflicts/x-ignore-shared",
		"background-snapshot/needs-kernel", "zero-copy-send/requires/multifd", "zero-copy-send/conflicts/xbzrle",
		"zero-copy-send/no-compression", "zero-copy-send/no-tls", "zero-copy-send/needs-kernel",
		"postcopy-preempt/requires/postcopy-ram", "postcopy-preempt/before-listen", "multifd/before-listen",
		"switchover-ack/requires/return-path", "dirty-limit/conflicts/auto-converge", "dirty-limit/needs-kernel",
		"multifd/conflicts/xbzrle", "mapped-ram/conflicts/xbzrle", "mapped-ram/conflicts/postcopy-ram",
		"rdma/no-xbzrle", "rdma/no-multifd", "rdma/no-postcopy", "rdma-pin-all/transports",
		"mapped-ram/transports", "mapped-ram/needs-transport/seekable", "postcopy-preempt/needs-transport/multi-channel",
		"multifd/needs-multi-channel", "multifd/file-needs-mapped-ram", "direct-io/needs-extra-fds",
		"mode/cpr-transfer-needs-stream", "mode/cpr-exec-needs-command", "mode/cpr-no-postcopy-snapshot-colo",
		"mapped-ram/no-compression", "mapped-ram/no-tls", "max-cpu-throttle/at-least-initial",
		"release-ram/no-recovery", "background-snapshot/not-incoming",
		// migctl's own TLS rules: TLS needs a two-way socket; QEMU's rdma:
		// would migrate in the clear.
		"migctl/tls-needs-two-way", "migctl/rdma-no-tls",
		// migctl's own postcopy limits.
		"migctl/postcopy-no-multifd", "migctl/postcopy-no-tls",
	} {
		if _, ok := rules[name]; !ok {
			t.Errorf("no rule %s", name)
		}
	}
	bg := s.Capability("background-snapshot")
	if len(bg.Conflicts) != 14 {
		t.Errorf("background-snapshot conflicts with %d capabilities, want the 14 of migrate_caps_check #6", len(bg.Conflicts))
	}
	for _, r := range s.RuleList {
		if !strings.Contains(r.Doc, "QEMU") && !strings.Contains(r.Doc, "migctl") {
			t.Errorf("rule %s: doc %q names no origin", r.Name, r.Doc)
		}
		if len(r.When.Transports)+len(r.When.NotTransports)+len(r.When.TransportHas)+len(r.When.TransportLacks) > 0 {
			if !strings.Contains(r.Message, "{transport}") || !strings.Contains(r.Message, "{uri}") {
				t.Errorf("rule %s tests the transport but its message lacks {transport} or {uri}: %q", r.Name, r.Message)
			}
		}
	}
}

// edge is "from --on [guards] else--> to" in a compact form for comparison.
func edgeString(t Transition) string {
	if t.Kind == KindIgnore {
		if len(t.Guards) > 0 {
			return t.From + " --" + t.On + " [" + strings.Join(t.Guards, ",") + "]--> (ignore)"
		}
		return t.From + " --" + t.On + "--> (ignore)"
	}
	if t.Kind == KindRefuse {
		return t.From + " --" + t.On + "--> (refuse: " + t.Message + ")"
	}
	g := ""
	if len(t.Guards) > 0 {
		g = " [" + strings.Join(t.Guards, ",") + "]"
	}
	if t.Else != "" {
		g += " else " + t.Else
	}
	return t.From + " --" + t.On + g + "--> " + t.To
}

// TestDefaultGraphs pins both graphs of the default spec edge by edge.
func TestDefaultGraphs(t *testing.T) {
	s := loadDefault(t)
	tc := "[transport-compatible]"
	// Edges that start a migration (or a recovery) also check the TLS
	// objects the parameters name.
	st := "[transport-compatible,tls-objects]"
	const noCancel = "Postcopy migration in progress, cannot cancel." // QEMU's migrate_cancel in postcopy
	// migctl's own words for the switchover states QEMU lacks (issue 9).
	const (
		committedOut = "The switchover is committed: the destination may already run the guest, so the migration cannot be cancelled; wait for it to end"
		unknownOut   = "The outcome of the switchover is unknown: the destination may run the guest; say what happened with x-migctl-resolve-switchover"
		unknownIn    = "The outcome of the switchover is unknown: the source may resume the guest or may have handed it over; say which with x-migctl-resolve-switchover"
	)
	want := map[string][]string{
		Incoming: {
			"none --incoming " + st + "--> setup",
			"setup --listen--> listening", "setup --listen-failed--> none",
			"listening --connect " + tc + " else failed--> connected",
			"listening --fail--> failed",
			"setup --cancel--> cancelling", "listening --cancel--> cancelling", "connected --cancel--> cancelling", "active --cancel--> cancelling",
			"cancelling --cleanup--> cancelled", "cancelling --fail--> (ignore)", "cancelling --cancel--> (ignore)",
			"postcopy-device --cancel--> (refuse: " + noCancel + ")",
			"postcopy-active --cancel--> (refuse: " + noCancel + ")", "postcopy-paused --cancel--> (refuse: " + noCancel + ")",
			"postcopy-recover-listening --cancel--> (refuse: " + noCancel + ")",
			"postcopy-recover --cancel--> (refuse: " + noCancel + ")",
			"connected --load--> active", "connected --fail--> failed",
			"active --complete--> completed", "active --fail--> failed",
			// Postcopy (issue 11): LISTEN, then the guest runs only at RUN;
			// a fault after the destination loaded the package pauses, never
			// fails (fail is the process shutting down).
			"active --postcopy--> postcopy-device",
			"postcopy-device --run--> postcopy-active", "postcopy-device --fail--> failed", "postcopy-device --pause--> postcopy-paused",
			"postcopy-active --complete--> completed", "postcopy-active --pause--> postcopy-paused", "postcopy-active --fail--> failed",
			"postcopy-paused --recover " + st + "--> postcopy-recover-listening", "postcopy-paused --fail--> failed",
			"postcopy-recover-listening --connect--> postcopy-recover", "postcopy-recover-listening --pause--> postcopy-paused",
			"postcopy-recover-listening --fail--> failed",
			"postcopy-recover --resume--> postcopy-active", "postcopy-recover --pause--> postcopy-paused", "postcopy-recover --fail--> failed",
			"none --reattach--> postcopy-paused",
			"completed --cancel--> (ignore)", "failed --cancel--> (ignore)", "cancelled --cancel--> (ignore)",
			// The switchover commit protocol (issue 9): the guest runs here
			// only after the source's go; a cut before it is an unknown
			// outcome only an operator resolves.
			"active --loaded--> loaded", "loaded --complete--> completed", "loaded --fail--> failed",
			"loaded --lost--> unknown-outcome", "loaded --cancel--> cancelling",
			"unknown-outcome --resolve-start--> completed", "unknown-outcome --resolve-discard--> failed",
			"unknown-outcome --cancel--> (refuse: " + unknownIn + ")",
		},
		Outgoing: {
			"none --migrate " + st + "--> setup", "failed --migrate " + st + "--> setup", "cancelled --migrate " + st + "--> setup",
			"completed --migrate " + st + "--> setup",
			"cancelling --fail--> (ignore)",
			"postcopy-device --cancel--> (refuse: " + noCancel + ")",
			"postcopy-active --cancel--> (refuse: " + noCancel + ")", "postcopy-paused --cancel--> (refuse: " + noCancel + ")",
			"postcopy-recover-setup --cancel--> (refuse: " + noCancel + ")", "postcopy-recover --cancel--> (refuse: " + noCancel + ")",
			"setup --start--> active",
			"active --switchover [pause-before-switchover] else device--> pre-switchover",
			"pre-switchover --continue--> device",
			"device --complete--> completed",
			"setup --cancel--> cancelling", "active --cancel--> cancelling", "pre-switchover --cancel--> cancelling", "device --cancel--> cancelling",
			"cancelling --cleanup--> cancelled",
			"setup --fail--> failing", "active --fail--> failing", "pre-switchover --fail--> failing", "device --fail--> failing",
			"failing --cleanup--> failed",
			"postcopy-active --complete--> completed", "postcopy-active --pause--> postcopy-paused",
			"postcopy-paused --resume " + st + "--> postcopy-recover-setup", "postcopy-paused --fail--> failing",
			"postcopy-recover-setup --connect--> postcopy-recover", "postcopy-recover-setup --connect-failed--> postcopy-paused",
			"postcopy-recover --resume-ack--> postcopy-active", "postcopy-recover --pause--> postcopy-paused",
			// The postcopy commit point (issue 11): the source resumes its
			// guest only before run (POSTCOPY_RUN); after it no edge fails a
			// fault: postcopy-active and postcopy-recover only pause.
			"device --postcopy--> postcopy-device", "postcopy-device --run--> postcopy-active", "postcopy-device --fail--> failing",
			"none --cancel--> (ignore)", "cancelling --cancel--> (ignore)", "cancelled --cancel--> (ignore)",
			"completed --cancel--> (ignore)", "failing --cancel--> (ignore)", "failed --cancel--> (ignore)",
			// The switchover commit protocol: after the commit the source
			// never resumes on its own and cannot be cancelled.
			"device --commit--> committed", "committed --complete--> completed", "committed --fail--> failing",
			"committed --lost--> unknown-outcome", "committed --cancel--> (refuse: " + committedOut + ")",
			"unknown-outcome --resolve-running--> completed", "unknown-outcome --resolve-gone--> failing",
			"unknown-outcome --cancel--> (refuse: " + unknownOut + ")",
		},
	}
	wantStates := map[string]string{
		Incoming: "none:mutable setup:mutable listening:mutable connected:frozen active:frozen postcopy-device:frozen postcopy-active:frozen " +
			"postcopy-paused:frozen postcopy-recover-listening:frozen postcopy-recover:frozen loaded:frozen unknown-outcome:frozen cancelling:frozen completed:mutable:end failed:mutable:end cancelled:mutable:end",
		Outgoing: "none:mutable setup:frozen active:frozen pre-switchover:frozen device:frozen committed:frozen unknown-outcome:frozen postcopy-device:frozen postcopy-active:frozen " +
			"postcopy-paused:frozen postcopy-recover-setup:frozen postcopy-recover:frozen completed:mutable:end " +
			"cancelling:frozen cancelled:mutable:end failing:frozen failed:mutable:end",
	}
	for _, side := range SideNames {
		sd := s.Side(side)
		if sd.Initial != "none" || !slices.Equal(sd.Configure, []string{"config-mutable", "transport-compatible", "tls-objects"}) {
			t.Errorf("%s: initial %q, configure %v", side, sd.Initial, sd.Configure)
		}
		var states []string
		for _, st := range sd.States {
			x := st.Name + ":" + st.Config
			if st.Terminal {
				x += ":end"
			}
			states = append(states, x)
			if st.Doc == "" {
				t.Errorf("%s state %s has no doc", side, st.Name)
			}
		}
		if got := strings.Join(states, " "); got != wantStates[side] {
			t.Errorf("%s states:\n got %s\nwant %s", side, got, wantStates[side])
		}
		var got []string
		for _, tr := range sd.Transitions {
			got = append(got, edgeString(tr))
			if tr.Doc == "" {
				t.Errorf("%s edge %s has no doc", side, edgeString(tr))
			}
		}
		slices.Sort(got)
		w := slices.Sorted(slices.Values(want[side]))
		if !slices.Equal(got, w) {
			t.Errorf("%s edges:\n got %q\nwant %q", side, got, w)
		}
	}
}

// TestRulesConcurrent reads Rules from many goroutines; -race proves Load
// left nothing lazy behind, and a hand-built Spec never writes either.
func TestRulesConcurrent(t *testing.T) {
	loaded := loadDefault(t)
	built := &Spec{Capabilities: []Capability{{Name: "a", Conflicts: []string{"b"}}, {Name: "b"}}}
	n := len(loaded.Rules())
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				if len(loaded.Rules()) != n || len(built.Rules()) != 1 {
					t.Error("Rules changed length")
					return
				}
			}
		}()
	}
	wg.Wait()
	if got := built.Rules()[0].Name; got != "a/conflicts/b" {
		t.Errorf("hand-built rule = %q", got)
	}
}

// TestLoadConcurrent loads the default spec from several goroutines at
// once: the shared validators must be safe for it (run with -race).
func TestLoadConcurrent(t *testing.T) {
	data := readDefault(t)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := Load("transitions.yaml", data, registry); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
}

// TestDefaultGuestGraph pins the guest graph (QEMU's RunState) edge by edge.
func TestDefaultGuestGraph(t *testing.T) {
	s := loadDefault(t)
	sd := s.Guest
	if sd == nil || sd.Initial != "prelaunch" {
		t.Fatalf("guest graph %+v", sd)
	}
	const refuse = "(refuse: The guest is stopped for the switchover of a migration; wait for the migration to end, or cancel it " +
		"(if its outcome is unknown, status x-migctl-unknown-outcome, resolve it with x-migctl-resolve-switchover))"
	want := []string{
		"prelaunch --boot--> running", "prelaunch --await-incoming--> inmigrate", "prelaunch --cont--> running",
		"inmigrate --arrive--> running", "inmigrate-paused --arrive--> paused",
		"inmigrate --stop--> inmigrate-paused", "inmigrate-paused --cont [outcome-known]--> inmigrate",
		"inmigrate --cont [outcome-known]--> (ignore)", "inmigrate-paused --stop--> (ignore)",
		"running --stop--> paused", "running --cont--> (ignore)",
		"paused --cont--> running", "paused --stop--> (ignore)",
		"running --switchover--> finish-migrate", "finish-migrate --restart--> running",
		"finish-migrate --migrated--> postmigrate", "paused --migrated--> postmigrate",
		"finish-migrate --cont--> " + refuse, "finish-migrate --stop--> (ignore)",
		"postmigrate --cont--> running", "postmigrate --stop--> (ignore)",
	}
	var got []string
	for _, tr := range sd.Transitions {
		got = append(got, edgeString(tr))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("guest edges:\n got %q\nwant %q", got, want)
	}
	status := map[string]string{}
	for _, st := range sd.States {
		status[st.Name] = st.QMPStatus()
	}
	wantStatus := map[string]string{"prelaunch": "prelaunch", "inmigrate": "inmigrate", "inmigrate-paused": "inmigrate",
		"running": "running", "paused": "paused", "finish-migrate": "finish-migrate", "postmigrate": "postmigrate"}
	if !maps.Equal(status, wantStatus) {
		t.Errorf("guest statuses %v, want QEMU's RunState names %v", status, wantStatus)
	}
}

// TestDefaultEffects: every setting says what migctl does with it, and the
// verdicts are the ones written here (honoured by the data plane, refused
// by a rule until implemented, vacuous where the guest has nothing it
// applies to). An issue that implements a refused capability flips its row.
func TestDefaultEffects(t *testing.T) {
	s := loadDefault(t)
	h, r, v := EffectHonoured, EffectRefused, EffectVacuous
	wantCaps := map[string]string{
		// rdma-pin-all: honoured since the rdma: transport (issue 10).
		// postcopy-ram, postcopy-preempt, postcopy-blocktime: honoured since
		// postcopy (issue 11).
		"xbzrle": r, "rdma-pin-all": h, "auto-converge": h, "events": h, "postcopy-ram": h, "x-colo": r,
		"release-ram": r, "return-path": h, "pause-before-switchover": h, "multifd": h, "dirty-bitmaps": r,
		"postcopy-blocktime": h, "late-block-activate": v, "x-ignore-shared": r, "validate-uuid": h,
		"background-snapshot": r, "zero-copy-send": r, "postcopy-preempt": h, "switchover-ack": h,
		"dirty-limit": r, "mapped-ram": h,
	}
	wantParams := map[string]string{
		"announce-initial": v, "announce-max": v, "announce-rounds": v, "announce-step": v,
		"throttle-trigger-threshold": h, "cpu-throttle-initial": h, "cpu-throttle-increment": h, "cpu-throttle-tailslow": h,
		// tls-*: honoured since the data plane carries TLS (issue 12).
		"tls-creds": h, "tls-hostname": h, "tls-authz": h, "max-bandwidth": h, "avail-switchover-bandwidth": h,
		"downtime-limit": h, "x-checkpoint-delay": v, "multifd-channels": h, "xbzrle-cache-size": v,
		"max-postcopy-bandwidth": h, "max-cpu-throttle": h, "multifd-compression": h, "multifd-zlib-level": h,
		"multifd-qatzip-level": v, "multifd-zstd-level": h, "block-bitmap-mapping": v,
		"x-vcpu-dirty-limit-period": v, "vcpu-dirty-limit": v, "mode": r, "zero-page-detection": h,
		"direct-io": h, "cpr-exec-command": v,
		"x-migctl-keepalive": h, "x-migctl-io-timeout": h, "x-migctl-convergence-passes": h,
	}
	for _, c := range s.Capabilities {
		if c.Effect != wantCaps[c.Name] || c.Why == "" {
			t.Errorf("capability %s: effect %q (why %q), want %q with a why", c.Name, c.Effect, c.Why, wantCaps[c.Name])
		}
	}
	for _, p := range s.Parameters {
		if p.Effect != wantParams[p.Name] || p.Why == "" {
			t.Errorf("parameter %s: effect %q (why %q), want %q with a why", p.Name, p.Effect, p.Why, wantParams[p.Name])
		}
	}
	if len(wantCaps) != len(s.Capabilities) || len(wantParams) != len(s.Parameters) {
		t.Errorf("the tables cover %d capabilities and %d parameters; the spec has %d and %d", len(wantCaps), len(wantParams), len(s.Capabilities), len(s.Parameters))
	}
}
