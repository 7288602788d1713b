package qmp

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migctl/migctl/creds/credstest"
)

func jstr(s string) string { b, _ := json.Marshal(s); return string(b) }

// object-add and object-del with QEMU's flat arguments and errors, and
// qom-list /objects.
func TestObjectCommands(t *testing.T) {
	n := newNode(t, nodeOpts{dest: true})
	cl := n.client(t)
	ca := credstest.NewCA(t, "migration CA")
	srvDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1"), nil)
	for _, args := range []string{
		`{"qom-type":"tls-creds-x509","id":"tls0","dir":` + jstr(srvDir) + `,"endpoint":"server","verify-peer":true}`,
		`{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"C=GB,CN=src","policy":"allow"}]}`,
		`{"qom-type":"authz-simple","id":"auth1","identity":"C=GB,CN=src"}`,
	} {
		run(t, cl, "object-add", json.RawMessage(args))
	}
	var list []ObjectProperty
	if err := json.Unmarshal(run(t, cl, "qom-list", map[string]any{"path": "/objects"}), &list); err != nil {
		t.Fatal(err)
	}
	want := []ObjectProperty{{"type", "string"}, {"auth0", "child<authz-list>"}, {"auth1", "child<authz-simple>"}, {"tls0", "child<tls-creds-x509>"}}
	if len(list) != len(want) {
		t.Fatalf("qom-list /objects: %+v", list)
	}
	for i := range want {
		if list[i] != want[i] {
			t.Fatalf("qom-list /objects: %+v, want %+v", list, want)
		}
	}
	for _, c := range []struct {
		cmd, args, want string
	}{
		{"object-add", `{"qom-type":"tls-creds-psk","id":"psk0","dir":"/x","endpoint":"client","username":"u"}`,
			"object type tls-creds-psk is not supported: Go's crypto/tls has no external pre-shared-key (PSK) support"},
		{"object-add", `{"qom-type":"authz-simple","id":"auth1","identity":"x"}`, "attempt to add duplicate property 'auth1' to object (type 'container')"},
		{"object-add", `{"qom-type":"memory-backend-ram","id":"m0","size":1}`, "Parameter 'qom-type' does not accept value 'memory-backend-ram'"},
		{"object-add", `{"id":"x"}`, "Parameter 'qom-type' is missing"},
		{"object-add", `{"qom-type":"authz-simple"}`, "Parameter 'id' is missing"},
		{"object-add", `{"qom-type":"authz-simple","id":"a2","identity":"x","bogus":1}`, "Parameter 'bogus' is unexpected"},
		{"object-del", `{"id":"nope"}`, "object 'nope' not found"},
		{"object-del", `{"id":"auth0","x":1}`, "Parameter 'x' is unexpected"},
		{"qom-list", `{"path":"/machine"}`, "Device '/machine' not found"},
	} {
		e := fails(t, cl, c.cmd, json.RawMessage(c.args))
		if !strings.Contains(e.Desc, c.want) {
			t.Errorf("%s %s: %q, want %q", c.cmd, c.args, e.Desc, c.want)
		}
	}
	if e := fails(t, cl, "qom-list", map[string]any{"path": "/machine"}); e.Class != ClassDeviceNotFound {
		t.Errorf("qom-list of another path: class %s", e.Class)
	}
	run(t, cl, "object-del", map[string]any{"id": "auth0"})
	if got := strings.Join(n.s.Objects().IDs(), ","); got != "auth1,tls0" {
		t.Fatalf("objects after object-del: %s", got)
	}
}

// The controller's guards see the server's objects: migrate-incoming with
// tls-creds naming no object, or credentials for the wrong end, is
// refused before anything listens; with the right object it is judged by
// the rules alone.
func TestObjectsReachTheGuards(t *testing.T) {
	ca := credstest.NewCA(t, "migration CA")
	srvDir := credstest.Dir(t, []*credstest.CA{ca}, ca.Server(t, "127.0.0.1"), nil)
	cliDir := credstest.Dir(t, []*credstest.CA{ca}, nil, ca.Client(t, "CN", "src"))
	n := newNode(t, nodeOpts{dest: true})
	cl := n.client(t)
	run(t, cl, "migrate-set-parameters", map[string]any{"tls-creds": "tls0"})
	e := fails(t, cl, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"})
	if !strings.Contains(e.Desc, "No TLS credentials with id 'tls0'") {
		t.Fatalf("migrate-incoming without the object: %q", e.Desc)
	}
	run(t, cl, "object-add", json.RawMessage(`{"qom-type":"tls-creds-x509","id":"tls0","dir":`+jstr(cliDir)+`}`))
	e = fails(t, cl, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0"})
	if !strings.Contains(e.Desc, "Expected TLS credentials for a server endpoint: tls-creds 'tls0' has endpoint=client") {
		t.Fatalf("migrate-incoming with client credentials: %q", e.Desc)
	}
	run(t, cl, "object-del", map[string]any{"id": "tls0"})
	run(t, cl, "object-add", json.RawMessage(`{"qom-type":"tls-creds-x509","id":"tls0","dir":`+jstr(srvDir)+`,"endpoint":"server"}`))
	run(t, cl, "migrate-incoming", map[string]any{"uri": "tcp:127.0.0.1:0", "exit-on-error": false})
	// While listening, tls-authz must name an authorization object.
	if e := fails(t, cl, "migrate-set-parameters", map[string]any{"tls-authz": "auth0"}); !strings.Contains(e.Desc, "Cannot find QAuthZ object ID auth0") {
		t.Fatalf("tls-authz naming nothing while listening: %q", e.Desc)
	}
	run(t, cl, "object-add", json.RawMessage(`{"qom-type":"authz-simple","id":"auth0","identity":"CN=src"}`))
	run(t, cl, "migrate-set-parameters", map[string]any{"tls-authz": "auth0"})

	// TLS needs a two-way channel: a destination reading a file refuses
	// tls-creds (rule migctl/tls-needs-two-way).
	d := newNode(t, nodeOpts{dest: true})
	dc := d.client(t)
	run(t, dc, "object-add", json.RawMessage(`{"qom-type":"tls-creds-x509","id":"tls0","dir":`+jstr(srvDir)+`,"endpoint":"server"}`))
	run(t, dc, "migrate-set-parameters", map[string]any{"tls-creds": "tls0"})
	if e := fails(t, dc, "migrate-incoming", map[string]any{"uri": "file:" + filepath.Join(t.TempDir(), "none")}); !strings.Contains(e.Desc, "needs a channel that carries bytes both ways") {
		t.Fatalf("tls-creds over file: %q", e.Desc)
	}
}

// A client of an unauthenticated TCP socket may add authorization objects
// but not credentials, whose dir the server would read with its rights.
func TestObjectAddOverTCP(t *testing.T) {
	ts := newTrustServer(t, Options{})
	remote := dialQMP(t, ts.tcp)
	e := fails(t, remote, "object-add", json.RawMessage(`{"qom-type":"tls-creds-x509","id":"t","dir":"/root"}`))
	if !strings.Contains(e.Desc, "object-add of tls-creds-x509 is refused on this connection") {
		t.Fatalf("tls-creds-x509 over TCP: %q", e.Desc)
	}
	run(t, remote, "object-add", json.RawMessage(`{"qom-type":"authz-simple","id":"a","identity":"CN=x"}`))
	if ids := ts.s.Objects().IDs(); len(ids) != 1 || ids[0] != "a" {
		t.Fatalf("objects: %v", ids)
	}
}
