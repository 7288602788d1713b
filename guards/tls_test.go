package guards_test

import (
	"strings"
	"testing"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/spec"
)

// TestTLSObjects: the tls-objects guard against a table of objects and
// TLS parameters, with QEMU's messages (migration/tls.c, authz/base.c).
func TestTLSObjects(t *testing.T) {
	s := defaultSpec(t)
	objects := map[string]guards.Object{
		"cli":         {Type: "tls-creds-x509", Endpoint: "client", VerifyPeer: true},
		"cli-noverif": {Type: "tls-creds-x509", Endpoint: "client"},
		"srv":         {Type: "tls-creds-x509", Endpoint: "server", VerifyPeer: true},
		"srv-noverif": {Type: "tls-creds-x509", Endpoint: "server"},
		"az":          {Type: "authz-list"},
		"as":          {Type: "authz-simple"},
	}
	type tc struct {
		name      string
		side      string
		transport string            // "" = idle (no migration)
		params    map[string]string // tls-*
		change    map[string]string // a configuration change, if any
		refuse    string            // "" = allowed
	}
	out, inc := spec.Outgoing, spec.Incoming
	cases := []tc{
		{"no TLS", out, "tcp", nil, nil, ""},
		{"idle side, unknown creds", out, "", map[string]string{"tls-creds": "nope"}, nil, ""},
		{"source, unknown creds", out, "tcp", map[string]string{"tls-creds": "nope"}, nil,
			"No TLS credentials with id 'nope': add them with object-add (qom-type tls-creds-x509, endpoint=client) before the migration starts"},
		{"source, authz as creds", out, "tcp", map[string]string{"tls-creds": "az"}, nil,
			"Object with id 'az' is not TLS credentials (its qom-type is authz-list)"},
		{"source, server creds", out, "tcp", map[string]string{"tls-creds": "srv"}, nil,
			"Expected TLS credentials for a client endpoint: tls-creds 'srv' has endpoint=server"},
		{"source, client creds over tcp", out, "tcp", map[string]string{"tls-creds": "cli"}, nil, ""},
		{"source, client creds over rdma", out, "rdma", map[string]string{"tls-creds": "cli"}, nil, ""},
		{"source, unix without tls-hostname", out, "unix", map[string]string{"tls-creds": "cli"}, nil,
			"No hostname available for TLS: a unix: address has no host name"},
		{"source, fd with tls-hostname", out, "fd", map[string]string{"tls-creds": "cli", "tls-hostname": "dst.example"}, nil, ""},
		{"source, unix, no verify-peer", out, "unix", map[string]string{"tls-creds": "cli-noverif"}, nil, ""},
		{"source ignores tls-authz", out, "tcp", map[string]string{"tls-creds": "cli", "tls-authz": "nope"}, nil, ""},
		{"destination, server creds", inc, "tcp", map[string]string{"tls-creds": "srv"}, nil, ""},
		{"destination, client creds", inc, "unix", map[string]string{"tls-creds": "cli"}, nil,
			"Expected TLS credentials for a server endpoint: tls-creds 'cli' has endpoint=client"},
		{"destination, unknown authz", inc, "tcp", map[string]string{"tls-creds": "srv", "tls-authz": "nope"}, nil,
			"Cannot find QAuthZ object ID nope"},
		{"destination, creds as authz", inc, "tcp", map[string]string{"tls-creds": "srv", "tls-authz": "cli"}, nil,
			"Object 'cli' is not a QAuthZ subclass (its qom-type is tls-creds-x509)"},
		{"destination, authz without verify-peer", inc, "tcp", map[string]string{"tls-creds": "srv-noverif", "tls-authz": "az"}, nil,
			"tls-authz 'az' needs verify-peer=on in tls-creds 'srv-noverif'"},
		{"destination, authz-list", inc, "tcp", map[string]string{"tls-creds": "srv", "tls-authz": "az"}, nil, ""},
		{"destination, authz-simple", inc, "tcp", map[string]string{"tls-creds": "srv", "tls-authz": "as"}, nil, ""},
		{"destination, authz without creds", inc, "tcp", map[string]string{"tls-authz": "nope"}, nil, ""},
		{"listening, unrelated change", inc, "tcp", map[string]string{"tls-creds": "nope"}, map[string]string{"downtime-limit": "300"}, ""},
		{"listening, tls-creds changed", inc, "tcp", map[string]string{"tls-creds": "nope"}, map[string]string{"tls-creds": "nope"},
			"No TLS credentials with id 'nope'"},
		{"listening, tls-authz changed", inc, "tcp", map[string]string{"tls-creds": "srv", "tls-authz": "nope"}, map[string]string{"tls-authz": "nope"},
			"Cannot find QAuthZ object ID nope"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := &guards.Input{Spec: s, Side: c.side, State: "none", Trigger: "test", Config: guards.DefaultConfig(s), Objects: objects}
			for k, v := range c.params {
				in.Config.Params[k] = v
			}
			if c.transport != "" {
				in.Transport = &guards.Endpoint{Transport: c.transport, URI: c.transport + ":x"}
			}
			if c.change != nil {
				in.Change = &guards.Change{Params: c.change}
			}
			in.Previous = in.Config
			err := guards.Default().Run(guards.TLSObjects, in)
			switch {
			case c.refuse == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.refuse != "" && err == nil:
				t.Fatalf("allowed, want a refusal containing %q", c.refuse)
			case c.refuse != "" && !strings.Contains(err.Error(), c.refuse):
				t.Fatalf("refusal %q does not contain %q", err, c.refuse)
			}
		})
	}
	// A process without an object registry has no TLS credentials.
	noReg := &guards.Input{Spec: s, Side: out, Config: guards.DefaultConfig(s), Transport: &guards.Endpoint{Transport: "tcp"}}
	noReg.Config.Params["tls-creds"] = "cli"
	if err := guards.Default().Run(guards.TLSObjects, noReg); err == nil || !strings.Contains(err.Error(), "No TLS credentials with id 'cli'") {
		t.Fatalf("no registry: %v", err)
	}
}
