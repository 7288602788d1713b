package qmp

import (
	"encoding/json"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/guards"
)

// Object commands: QEMU's object-add and object-del for the object types
// migctl implements (tls-creds-x509, authz-list, authz-simple; package
// creds), and qom-list on /objects, QEMU's listing of them.

var _ = addCommands(map[string]command{
	"object-add": {run: cmdObjectAdd},
	"object-del": {run: cmdObjectDel},
	"qom-list":   {run: cmdQOMList},
})

// ObjectsPath is the only QOM path migctl has: the container of the
// objects added with object-add, as in QEMU.
const ObjectsPath = "/objects"

// GuardObjects adapts an object registry for machine.Options.Objects, so
// that the guards (tls-objects) see the objects the server's clients add.
// Give the controller and the server (Options.Objects) the same registry.
func GuardObjects(o *creds.Objects) func() map[string]guards.Object {
	return func() map[string]guards.Object {
		list := o.List()
		out := make(map[string]guards.Object, len(list))
		for _, in := range list {
			out[in.ID] = guards.Object{Type: in.Type, Endpoint: string(in.Endpoint), VerifyPeer: in.VerifyPeer}
		}
		return out
	}
}

// Objects returns the server's object registry (Options.Objects, or the
// one the server made).
func (s *Server) Objects() *creds.Objects { return s.objs }

// cmdObjectAdd is QMP object-add with QEMU's flat arguments: qom-type, id
// and the type's properties side by side ({"qom-type":"tls-creds-x509",
// "id":"tls0","dir":…,"endpoint":"server"}). A client of an
// unauthenticated TCP socket may not add tls-creds-x509: its dir is a path
// the server reads with its own rights.
func cmdObjectAdd(s *Server, cl *client, a *args) (any, func(), error) {
	typ, _ := a.str("qom-type", true)
	a.str("id", true)
	if a.err != nil {
		return nil, nil, a.err
	}
	for k := range a.m {
		a.used[k] = true // the properties are the type's to check (package creds)
	}
	if typ == creds.TypeX509 && cl.priv < Owner {
		return nil, nil, genericf("object-add of %s is refused on this connection: its dir is a path the server reads with its own rights, and %s; add it over the unix control socket, or from a TLS client with a certificate (serve --qmp-tls-creds)", creds.TypeX509, localUserWhy)
	}
	raw, err := json.Marshal(a.m)
	if err != nil {
		return nil, nil, genericf("object-add: %v", err)
	}
	if err := s.objs.Add(raw); err != nil {
		return nil, nil, genericf("%s", err.Error())
	}
	return struct{}{}, nil, nil
}

// cmdObjectDel is QMP object-del {"id": ID}. Migrations already under way
// keep what they loaded; new ones no longer find the object.
func cmdObjectDel(s *Server, _ *client, a *args) (any, func(), error) {
	id, _ := a.str("id", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if err := s.objs.Del(id); err != nil {
		return nil, nil, genericf("%s", err.Error())
	}
	return struct{}{}, nil, nil
}

// ObjectProperty is one element of qom-list's answer (QEMU's
// ObjectPropertyInfo): on /objects, each object as a child<TYPE> property
// named by its id, after the container's own type property.
type ObjectProperty struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

// ClassDeviceNotFound is QEMU's error class for a QOM path that does not
// exist.
const ClassDeviceNotFound = "DeviceNotFound"

func cmdQOMList(s *Server, _ *client, a *args) (any, func(), error) {
	path, _ := a.str("path", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if path != ObjectsPath && path != ObjectsPath+"/" {
		return nil, nil, &Error{Class: ClassDeviceNotFound, Desc: "Device '" + path + "' not found (migctl's QOM tree has only " + ObjectsPath + ")"}
	}
	out := []ObjectProperty{{Name: "type", Type: "string"}}
	for _, in := range s.objs.List() {
		out = append(out, ObjectProperty{Name: in.ID, Type: "child<" + in.Type + ">"})
	}
	return out, nil, nil
}
