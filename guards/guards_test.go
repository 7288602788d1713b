package guards_test

import (
	"errors"
	"strings"
	"testing"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/internal/intent"
	"github.com/migctl/migctl/spec"
)

// defaultSpec returns the repository's transitions.yaml, loaded.
func defaultSpec(t testing.TB) *spec.Spec {
	t.Helper()
	s, err := migctl.Spec()
	if err != nil {
		t.Fatalf("load default spec: %v", err)
	}
	return s
}

// ruleCase describes one configuration and what transport-compatible must
// say about it.
type ruleCase struct {
	name      string
	side      string // default outgoing
	state     string // default none
	trigger   string // default "test"
	caps      []string
	params    map[string]string
	transport string // scheme; URI is derived
	// props, when set, are the endpoint's probed properties
	// (guards.Endpoint.Props), replacing the spec's declaration.
	props    map[string]bool
	features []string
	enabling []string // caps turned on by the change under judgement
	peer     *guards.Peer
	// refuse lists substrings every one of which must appear in the
	// refusal; nil means the configuration must be allowed.
	refuse []string
}

var uris = map[string]string{
	"tcp":  "tcp:127.0.0.1:4444",
	"unix": "unix:/tmp/mig.sock",
	"fd":   "fd:3",
	"exec": "exec:cat > /tmp/f",
	"file": "file:/tmp/f",
	"rdma": "rdma:0.0.0.0:4444",
}

// The properties transport.Probe gives an fd: endpoint, written from the
// spec's declarations of file: and fd: (a socket).
var (
	regularFileProps = map[string]bool{"multi-channel": false, "seekable": true, "return-path": false, "extra-fds": true, "streamable": false}
	socketProps      = map[string]bool{"multi-channel": false, "seekable": false, "return-path": true, "extra-fds": false, "streamable": true}
)

var allFeatures = []string{"userfaultfd", "userfault-guest", "uffd-wp", "kvm-dirty-ring", "msg-zerocopy", "colo-replication"}

func (c ruleCase) input(s *spec.Spec) *guards.Input {
	in := &guards.Input{Spec: s, Side: spec.Outgoing, State: "none", Trigger: "test", Features: map[string]bool{}}
	if c.side != "" {
		in.Side = c.side
	}
	if c.state != "" {
		in.State = c.state
	}
	if c.trigger != "" {
		in.Trigger = c.trigger
	}
	cfg := guards.DefaultConfig(s)
	for _, cp := range c.caps {
		cfg.Caps[cp] = true
	}
	for k, v := range c.params {
		p := s.Parameter(k)
		if p == nil {
			panic("unknown parameter " + k)
		}
		n, err := p.Normalize(v)
		if err != nil {
			panic(err)
		}
		cfg.Params[k] = n
	}
	in.Config, in.Previous = cfg, cfg
	if len(c.enabling) > 0 {
		prev := cfg.Clone()
		ch := &guards.Change{Caps: map[string]bool{}}
		for _, cp := range c.enabling {
			prev.Caps[cp] = false
			ch.Caps[cp] = true
		}
		in.Previous, in.Change = prev, ch
	}
	if c.transport != "" {
		in.Transport = &guards.Endpoint{Transport: c.transport, URI: uris[c.transport], Props: c.props}
	}
	for _, f := range c.features {
		in.Features[f] = true
	}
	in.Peer = c.peer
	return in
}

// The rules of qemu-control.md §3–§4, each as a refused configuration and
// its allowed neighbours.
var ruleCases = []ruleCase{
	// §4.2 #1: COLO needs the replication module.
	{name: "x-colo without replication", caps: []string{"x-colo"}, refuse: []string{"x-colo", "colo-replication"}},
	{name: "x-colo with replication", caps: []string{"x-colo"}, features: []string{"colo-replication"}},
	// #2: postcopy-ram on a destination needs userfaultfd.
	{name: "postcopy-ram on destination without uffd", side: spec.Incoming, caps: []string{"postcopy-ram"}, refuse: []string{"postcopy-ram", "userfaultfd"}},
	{name: "postcopy-ram on destination with uffd", side: spec.Incoming, caps: []string{"postcopy-ram"}, features: []string{"userfaultfd", "userfault-guest"}},
	// migctl: the destination's vCPUs must fault in another process than
	// the one that serves the faults.
	{name: "postcopy-ram on destination with uffd, guest in migctl's process", side: spec.Incoming, caps: []string{"postcopy-ram"}, features: []string{"userfaultfd"}, refuse: []string{"postcopy-ram", "postcopy=on"}},
	{name: "postcopy-ram + multifd at migrate", trigger: "migrate", transport: "tcp", caps: []string{"postcopy-ram", "multifd"}, refuse: []string{"postcopy-ram", "multifd"}},
	{name: "postcopy-ram on source without uffd", caps: []string{"postcopy-ram"}},
	// Both sides judge every change; a destination-only rule applies only
	// once the incoming side is in use.
	{name: "postcopy-ram enabled while the incoming side is unused", side: spec.Incoming, caps: []string{"postcopy-ram"}, enabling: []string{"postcopy-ram"}},
	{name: "postcopy-ram enabled while listening without uffd", side: spec.Incoming, state: "listening", transport: "tcp", caps: []string{"postcopy-ram"}, enabling: []string{"postcopy-ram"}, refuse: []string{"postcopy-ram", "userfaultfd"}},
	{name: "background-snapshot at migrate-incoming", side: spec.Incoming, trigger: "incoming", caps: []string{"background-snapshot"}, features: allFeatures, transport: "tcp", refuse: []string{"background-snapshot"}},
	// #3
	{name: "postcopy-ram + x-ignore-shared", caps: []string{"postcopy-ram", "x-ignore-shared"}, refuse: []string{"postcopy-ram", "x-ignore-shared"}},
	{name: "x-ignore-shared alone", caps: []string{"x-ignore-shared"}},
	// #4
	{name: "background-snapshot without uffd-wp", caps: []string{"background-snapshot"}, refuse: []string{"background-snapshot", "uffd-wp"}},
	{name: "background-snapshot with uffd-wp", caps: []string{"background-snapshot"}, features: []string{"uffd-wp"}},
	// #7
	{name: "zero-copy-send without multifd", caps: []string{"zero-copy-send"}, features: allFeatures, refuse: []string{"zero-copy-send"}},
	{name: "zero-copy-send with plain multifd", caps: []string{"zero-copy-send", "multifd"}, features: allFeatures, transport: "tcp"},
	{name: "zero-copy-send with compression", caps: []string{"zero-copy-send", "multifd"}, features: allFeatures, params: map[string]string{"multifd-compression": "zstd"}, refuse: []string{"zero-copy-send"}},
	{name: "zero-copy-send with TLS", caps: []string{"zero-copy-send", "multifd"}, features: allFeatures, params: map[string]string{"tls-creds": "tls0"}, refuse: []string{"zero-copy-send"}},
	{name: "zero-copy-send with xbzrle", caps: []string{"zero-copy-send", "multifd", "xbzrle"}, features: allFeatures, refuse: []string{"zero-copy-send", "xbzrle"}},
	{name: "zero-copy-send without MSG_ZEROCOPY", caps: []string{"zero-copy-send", "multifd"}, refuse: []string{"zero-copy-send", "msg-zerocopy"}},
	// #8
	{name: "postcopy-preempt without postcopy-ram", caps: []string{"postcopy-preempt"}, refuse: []string{"postcopy-preempt", "postcopy-ram"}},
	{name: "postcopy-preempt with postcopy-ram", caps: []string{"postcopy-preempt", "postcopy-ram"}},
	// #9 / #10: enabling after the incoming socket listener exists.
	{name: "multifd enabled while listening on tcp", side: spec.Incoming, state: "listening", transport: "tcp", caps: []string{"multifd"}, enabling: []string{"multifd"}, refuse: []string{"multifd"}},
	{name: "multifd enabled before listening", side: spec.Incoming, state: "none", caps: []string{"multifd"}, enabling: []string{"multifd"}},
	{name: "multifd already on while listening on tcp", side: spec.Incoming, state: "listening", transport: "tcp", caps: []string{"multifd"}},
	{name: "postcopy-preempt enabled while listening on tcp", side: spec.Incoming, state: "listening", transport: "tcp", caps: []string{"postcopy-preempt", "postcopy-ram"}, features: allFeatures, enabling: []string{"postcopy-preempt"}, refuse: []string{"postcopy-preempt"}},
	// #11
	{name: "switchover-ack without return-path", caps: []string{"switchover-ack"}, refuse: []string{"switchover-ack", "return-path"}},
	{name: "switchover-ack with return-path", caps: []string{"switchover-ack", "return-path"}},
	// #12, #13
	{name: "dirty-limit + auto-converge", caps: []string{"dirty-limit", "auto-converge"}, features: allFeatures, refuse: []string{"dirty-limit", "auto-converge"}},
	{name: "dirty-limit without dirty ring", caps: []string{"dirty-limit"}, refuse: []string{"dirty-limit", "kvm-dirty-ring"}},
	{name: "dirty-limit with dirty ring", caps: []string{"dirty-limit"}, features: allFeatures},
	{name: "auto-converge alone", caps: []string{"auto-converge"}},
	// #14–#16
	{name: "multifd + xbzrle", caps: []string{"multifd", "xbzrle"}, refuse: []string{"multifd", "xbzrle"}},
	{name: "mapped-ram + xbzrle", caps: []string{"mapped-ram", "xbzrle"}, refuse: []string{"mapped-ram", "xbzrle"}},
	{name: "mapped-ram + postcopy-ram", caps: []string{"mapped-ram", "postcopy-ram"}, refuse: []string{"mapped-ram", "postcopy-ram"}},
	{name: "xbzrle alone over tcp", caps: []string{"xbzrle"}, transport: "tcp"},
	// §4.3 RDMA.
	{name: "rdma + xbzrle", caps: []string{"xbzrle"}, transport: "rdma", refuse: []string{"xbzrle", "rdma"}},
	{name: "rdma + multifd", caps: []string{"multifd"}, transport: "rdma", refuse: []string{"multifd", "rdma"}},
	{name: "rdma + postcopy-ram", caps: []string{"postcopy-ram"}, transport: "rdma", refuse: []string{"postcopy-ram", "rdma"}},
	{name: "rdma + mapped-ram", caps: []string{"mapped-ram"}, transport: "rdma", refuse: []string{"mapped-ram", "rdma"}},
	{name: "rdma-pin-all over tcp", caps: []string{"rdma-pin-all"}, transport: "tcp", refuse: []string{"rdma-pin-all", "tcp"}},
	{name: "rdma-pin-all over rdma", caps: []string{"rdma-pin-all"}, transport: "rdma"},
	{name: "plain rdma", transport: "rdma"},
	// §4.4 transport checks.
	{name: "mapped-ram over tcp", caps: []string{"mapped-ram"}, transport: "tcp", refuse: []string{"mapped-ram", "tcp:127.0.0.1:4444"}},
	{name: "mapped-ram over file", caps: []string{"mapped-ram"}, transport: "file"},
	{name: "mapped-ram before a transport is known", caps: []string{"mapped-ram"}},
	{name: "multifd over fd", caps: []string{"multifd"}, transport: "fd", refuse: []string{"multifd", "fd:3"}},
	{name: "multifd over exec", caps: []string{"multifd"}, transport: "exec", refuse: []string{"multifd"}},
	{name: "multifd over tcp", caps: []string{"multifd"}, transport: "tcp"},
	{name: "multifd over unix", caps: []string{"multifd"}, transport: "unix"},
	{name: "multifd over file without mapped-ram", caps: []string{"multifd"}, transport: "file", refuse: []string{"multifd", "file"}},
	{name: "multifd + mapped-ram over file", caps: []string{"multifd", "mapped-ram"}, transport: "file"},
	{name: "postcopy-preempt over exec", caps: []string{"postcopy-preempt", "postcopy-ram"}, transport: "exec", refuse: []string{"postcopy-preempt"}},
	{name: "direct-io over file", caps: []string{"multifd", "mapped-ram"}, params: map[string]string{"direct-io": "true"}, transport: "file"},
	// An fd: endpoint is judged by what its descriptor is (Endpoint.Props,
	// from transport.Probe): a regular file is seekable and takes extra
	// descriptors, as file:; a socket is neither; unprobed, the spec's fd:
	// declaration (a socket) applies.
	{name: "mapped-ram over fd on a regular file", caps: []string{"mapped-ram"}, transport: "fd", props: regularFileProps},
	{name: "mapped-ram over fd on a socket", caps: []string{"mapped-ram"}, transport: "fd", props: socketProps, refuse: []string{"mapped-ram", "seekable", "fd:3"}},
	{name: "mapped-ram over fd, not probed", caps: []string{"mapped-ram"}, transport: "fd", refuse: []string{"mapped-ram", "seekable", "fd:3"}},
	{name: "multifd + mapped-ram over fd on a regular file", caps: []string{"multifd", "mapped-ram"}, transport: "fd", props: regularFileProps},
	{name: "multifd over fd on a regular file without mapped-ram", caps: []string{"multifd"}, transport: "fd", props: regularFileProps, refuse: []string{"multifd", "switch mapped-ram on", "fd:3"}},
	{name: "multifd over fd on a socket", caps: []string{"multifd"}, transport: "fd", props: socketProps, refuse: []string{"multifd", "one channel", "fd:3"}},
	{name: "direct-io over fd on a regular file", caps: []string{"multifd", "mapped-ram"}, params: map[string]string{"direct-io": "true"}, transport: "fd", props: regularFileProps},
	{name: "return-path over fd on a pipe", caps: []string{"return-path"}, transport: "fd", props: map[string]bool{"streamable": true}, refuse: []string{"return-path", "fd:3"}},
	{name: "return-path over fd on a socket", caps: []string{"return-path"}, transport: "fd", props: socketProps},
	{name: "cpr-transfer over file", params: map[string]string{"mode": "cpr-transfer"}, transport: "file", refuse: []string{"cpr-transfer"}},
	{name: "cpr-transfer over unix", params: map[string]string{"mode": "cpr-transfer"}, transport: "unix"},
	// §3 cross-parameter checks and §4.5.
	{name: "max-cpu-throttle below initial", params: map[string]string{"cpu-throttle-initial": "50", "max-cpu-throttle": "40"}, refuse: []string{"max-cpu-throttle", "cpu-throttle-initial"}},
	{name: "max-cpu-throttle equal to initial", params: map[string]string{"cpu-throttle-initial": "50", "max-cpu-throttle": "50"}},
	{name: "mapped-ram + compression", caps: []string{"mapped-ram", "multifd"}, params: map[string]string{"multifd-compression": "zlib"}, refuse: []string{"mapped-ram", "compression"}},
	{name: "mapped-ram + TLS", caps: []string{"mapped-ram"}, params: map[string]string{"tls-creds": "tls0"}, refuse: []string{"mapped-ram", "TLS"}},
	{name: "multifd + compression without mapped-ram", caps: []string{"multifd"}, params: map[string]string{"multifd-compression": "zlib"}, transport: "tcp"},
	// migctl's own limits: judged when a migration starts, not on set.
	{name: "xbzrle at migrate (not implemented)", caps: []string{"xbzrle"}, transport: "tcp", trigger: "migrate", refuse: []string{"xbzrle", "does not implement"}},
	{name: "mapped-ram at migrate over file (implemented)", caps: []string{"mapped-ram"}, transport: "file", trigger: "migrate"},
	{name: "mapped-ram at connect over file (implemented)", side: spec.Incoming, state: "listening", caps: []string{"mapped-ram"}, transport: "file", trigger: "connect",
		peer: &guards.Peer{Caps: map[string]bool{"mapped-ram": true}}},
	{name: "multifd at migrate (implemented)", caps: []string{"multifd"}, transport: "tcp", trigger: "migrate"},
	{name: "multifd with qatzip (no accelerator)", caps: []string{"multifd"}, params: map[string]string{"multifd-compression": "qatzip"}, transport: "tcp", trigger: "migrate", refuse: []string{"qatzip", "hardware"}},
	{name: "TLS at migrate-incoming over tcp (implemented)", side: spec.Incoming, params: map[string]string{"tls-creds": "tls0"}, transport: "tcp", trigger: "incoming"},
	{name: "TLS at migrate over unix (implemented)", params: map[string]string{"tls-creds": "tls0", "tls-hostname": "dst"}, transport: "unix", trigger: "migrate"},
	// TLS needs the peer's answers: a one-way transport is refused, as is
	// rdma:, which QEMU would run in the clear.
	{name: "TLS at migrate over exec", params: map[string]string{"tls-creds": "tls0"}, transport: "exec", trigger: "migrate", refuse: []string{"TLS", "tls-creds", "both ways", "exec"}},
	{name: "TLS at migrate-incoming over file", side: spec.Incoming, params: map[string]string{"tls-creds": "tls0"}, transport: "file", trigger: "incoming", refuse: []string{"TLS", "both ways", "file"}},
	{name: "TLS at migrate over rdma", params: map[string]string{"tls-creds": "tls0"}, transport: "rdma", trigger: "migrate", refuse: []string{"TLS", "tls-creds", "rdma", "in the clear"}},
	{name: "events and return-path at migrate", caps: []string{"events", "return-path"}, transport: "tcp", trigger: "migrate"},
	// The seed: a peer announcing mapped-ram to a destination listening on rdma.
	{name: "peer announces mapped-ram on rdma", side: spec.Incoming, state: "listening", transport: "rdma",
		peer: &guards.Peer{Caps: map[string]bool{"mapped-ram": true}}, refuse: []string{"mapped-ram", "rdma:0.0.0.0:4444", "source has it on", "destination has it off"}},
	// Issue 10's scenario (b): a must-match capability only connect can see
	// differs; the refusal names the capability and the rdma: listener.
	{name: "peer return-path differs on rdma", side: spec.Incoming, state: "listening", transport: "rdma",
		peer: &guards.Peer{Caps: map[string]bool{"return-path": true}}, refuse: []string{"return-path", "source has it on", "listening on rdma:0.0.0.0:4444"}},
	{name: "rdma-pin-all at migrate over rdma (implemented)", caps: []string{"rdma-pin-all"}, transport: "rdma", trigger: "migrate"},
	{name: "rdma-pin-all at migrate over tcp", caps: []string{"rdma-pin-all"}, transport: "tcp", trigger: "migrate", refuse: []string{"rdma-pin-all", "tcp"}},
	{name: "peer agrees on tcp", side: spec.Incoming, state: "listening", transport: "tcp", caps: []string{"multifd"},
		peer: &guards.Peer{Caps: map[string]bool{"multifd": true, "mapped-ram": false}, Params: map[string]string{"multifd-channels": "2"}}},
	{name: "peer multifd-channels differ", side: spec.Incoming, state: "listening", transport: "tcp", caps: []string{"multifd"},
		peer: &guards.Peer{Caps: map[string]bool{"multifd": true}, Params: map[string]string{"multifd-channels": "8"}}, refuse: []string{"multifd-channels", "8", "2"}},
}

func TestRules(t *testing.T) {
	s := defaultSpec(t)
	tc := guards.Default()[guards.TransportCompatible]
	for _, c := range ruleCases {
		t.Run(c.name, func(t *testing.T) {
			err := tc(c.input(s))
			if c.refuse == nil {
				if err != nil {
					t.Fatalf("want allowed, got refused: %v", err)
				}
				return
			}
			var re *guards.RefusedError
			if !errors.As(err, &re) {
				t.Fatalf("want a refusal naming %q, got %v", c.refuse, err)
			}
			for _, want := range c.refuse {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("refusal does not name %q:\n%v", want, err)
				}
			}
			for _, r := range re.Refusals {
				if r.Guard != guards.TransportCompatible || r.Rule == "" {
					t.Errorf("refusal %+v lacks its guard or rule name", r)
				}
			}
		})
	}
}

// Background-snapshot conflicts with a long list of capabilities (§4.2 #6).
func TestBackgroundSnapshotConflicts(t *testing.T) {
	s := defaultSpec(t)
	tc := guards.Default()[guards.TransportCompatible]
	for _, other := range []string{"postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
		"return-path", "multifd", "pause-before-switchover", "auto-converge", "release-ram", "rdma-pin-all",
		"xbzrle", "x-colo", "validate-uuid", "zero-copy-send"} {
		c := ruleCase{caps: []string{"background-snapshot", other}, features: allFeatures}
		err := tc(c.input(s))
		if err == nil || !strings.Contains(err.Error(), other) || !strings.Contains(err.Error(), "background-snapshot") {
			t.Errorf("background-snapshot + %s: want a refusal naming both, got %v", other, err)
		}
	}
}

func TestConfigMutable(t *testing.T) {
	s := defaultSpec(t)
	cm := guards.Default()[guards.ConfigMutable]
	for _, sideName := range spec.SideNames {
		sd := s.Side(sideName)
		for _, st := range sd.States {
			for _, ch := range []*guards.Change{
				{Caps: map[string]bool{"xbzrle": true}},
				{Params: map[string]string{"multifd-channels": "4"}},
				{Params: map[string]string{"max-bandwidth": "1000"}},
			} {
				in := &guards.Input{Spec: s, Side: sideName, State: st.Name, Change: ch}
				err := cm(in)
				// max-bandwidth is live in QEMU (changes apply during a
				// migration); the intended mutability of each state is
				// intent.Mutable, written by hand.
				live := ch.Params["max-bandwidth"] != ""
				mutable, known := intent.Mutable[sideName][st.Name]
				if !known {
					t.Errorf("%s/%s: state not in intent.Mutable: add its intended mutability", sideName, st.Name)
				}
				want := mutable || live
				if (err == nil) != want {
					t.Errorf("%s/%s change %+v: allowed=%v, want %v (%v)", sideName, st.Name, ch, err == nil, want, err)
				}
				if err != nil && !strings.Contains(err.Error(), st.Name) {
					t.Errorf("refusal does not name the state %s: %v", st.Name, err)
				}
			}
		}
	}
}

func TestEvaluateListsEveryRule(t *testing.T) {
	s := defaultSpec(t)
	in := ruleCase{caps: []string{"mapped-ram"}, transport: "tcp"}.input(s)
	vs := guards.Evaluate(in)
	if len(vs) != len(s.Rules()) {
		t.Fatalf("Evaluate returned %d verdicts for %d rules", len(vs), len(s.Rules()))
	}
	refused := 0
	for _, v := range vs {
		if !v.OK {
			refused++
			if v.Reason == "" {
				t.Errorf("rule %s refused without a reason", v.Rule.Name)
			}
		}
	}
	if refused == 0 {
		t.Fatal("mapped-ram over tcp: no rule refused")
	}
}
