package creds

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/migctl/migctl/creds/credstest"
)

// List shows each object's type, and a tls-creds-x509's endpoint and
// verify-peer as object-add set them.
func TestObjectsList(t *testing.T) {
	w := newWorld(t)
	srvDir := credstest.Dir(t, []*credstest.CA{w.ca}, w.server, nil)
	cliDir := credstest.Dir(t, []*credstest.CA{w.ca}, nil, w.client)
	o := NewObjects()
	for _, args := range []string{
		`{"qom-type":"tls-creds-x509","id":"tls1","dir":` + jstr(cliDir) + `,"verify-peer":false}`,
		`{"qom-type":"tls-creds-x509","id":"tls0","dir":` + jstr(srvDir) + `,"endpoint":"server"}`,
		`{"qom-type":"authz-simple","id":"auth1","identity":"CN=a"}`,
		`{"qom-type":"authz-list","id":"auth0"}`,
	} {
		if err := o.Add(json.RawMessage(args)); err != nil {
			t.Fatal(err)
		}
	}
	want := []Info{
		{ID: "auth0", Type: "authz-list"},
		{ID: "auth1", Type: "authz-simple"},
		{ID: "tls0", Type: "tls-creds-x509", Endpoint: "server", VerifyPeer: true},
		{ID: "tls1", Type: "tls-creds-x509", Endpoint: "client", VerifyPeer: false},
	}
	if got := o.List(); !slices.Equal(got, want) {
		t.Fatalf("List:\n got %+v\nwant %+v", got, want)
	}
	if err := o.Del("tls0"); err != nil {
		t.Fatal(err)
	}
	if got := o.List(); len(got) != 3 || got[2].ID != "tls1" {
		t.Fatalf("List after object-del: %+v", got)
	}
}
