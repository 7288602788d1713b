package creds

import (
	"cmp"
	"slices"
)

// Info describes one object of a set: what QMP's qom-list shows of it and
// what the tls-objects guard needs to judge the migration parameters that
// name it (tls-creds, tls-authz).
type Info struct {
	ID   string
	Type string // qom-type: TypeX509, TypeAuthzList or TypeAuthzSimp
	// Endpoint and VerifyPeer are a tls-creds-x509's; empty and false for
	// the other types.
	Endpoint   Endpoint
	VerifyPeer bool
}

// List returns every object, sorted by id. It holds the set's lock only
// to copy, so it may be called under other locks (the controller's).
func (o *Objects) List() []Info {
	o.mu.Lock()
	out := make([]Info, 0, len(o.m))
	for id, obj := range o.m {
		in := Info{ID: id}
		switch v := obj.(type) {
		case *X509:
			in.Type, in.Endpoint, in.VerifyPeer = TypeX509, v.endpoint, v.verifyPeer
		case *List:
			in.Type = TypeAuthzList
		case *Simple:
			in.Type = TypeAuthzSimp
		}
		out = append(out, in)
	}
	o.mu.Unlock()
	slices.SortFunc(out, func(a, b Info) int { return cmp.Compare(a.ID, b.ID) })
	return out
}
