package creds

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/migctl/migctl/internal/safe"
)

// Object types, as QEMU names them in object-add's qom-type.
const (
	TypeX509       = "tls-creds-x509"
	TypePSK        = "tls-creds-psk"
	TypeAnon       = "tls-creds-anon"
	TypeAuthzList  = "authz-list"
	TypeAuthzSimp  = "authz-simple"
	TypeAuthzFile  = "authz-listfile"
	TypeAuthzPAM   = "authz-pam"
	maxObjects     = 1024
	maxObjectBytes = 1 << 20
)

// ErrPSK is the refusal of tls-creds-psk: Go's crypto/tls implements no
// external pre-shared keys, and migctl does not write TLS cryptography of
// its own. It wraps ErrUnsupported.
var ErrPSK error = &UnsupportedError{
	What:   "object type " + TypePSK,
	Reason: "Go's crypto/tls has no external pre-shared-key (PSK) support, and migctl does not implement TLS cryptography itself; use tls-creds-x509 with certificates (both sides can share one CA)",
}

// Objects holds the objects added with object-add that migctl knows:
// tls-creds-x509, authz-list and authz-simple, by id. It is safe for
// concurrent use; the objects themselves are immutable.
type Objects struct {
	mu sync.Mutex
	m  map[string]any // *X509, *List or *Simple
}

// NewObjects returns an empty set.
func NewObjects() *Objects { return &Objects{m: map[string]any{}} }

// Add creates an object from object-add's arguments: {"qom-type": TYPE,
// "id": ID, PROPERTIES…}, as QMP's object-add takes them. Types migctl
// does not implement are refused with the reason ([ErrPSK] for
// tls-creds-psk); an unknown property is refused as QEMU refuses it. The
// arguments are expected to have passed the QMP layer's strict JSON check
// (no duplicate keys).
func (o *Objects) Add(args json.RawMessage) error {
	if len(args) > maxObjectBytes {
		return fmt.Errorf("object-add arguments larger than %d bytes", maxObjectBytes)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(args, &m); err != nil || m == nil {
		return errors.New("object-add arguments must be a JSON object")
	}
	var typ, id string
	if err := str(m, "qom-type", &typ, true); err != nil {
		return err
	}
	if err := str(m, "id", &id, true); err != nil {
		return err
	}
	if id == "" || !validID(id) {
		return fmt.Errorf("Parameter 'id' expects an identifier: letters, digits, '-', '.', '_', starting with a letter")
	}
	delete(m, "qom-type")
	delete(m, "id")
	var obj any
	var err error
	switch typ {
	case TypeX509:
		obj, err = decodeX509(id, m)
	case TypeAuthzList:
		obj, err = decodeList(id, m)
	case TypeAuthzSimp:
		obj, err = decodeSimple(id, m)
	case TypePSK:
		return ErrPSK
	case TypeAnon:
		return &UnsupportedError{What: "object type " + TypeAnon, Reason: "anonymous TLS authenticates nobody, and Go's crypto/tls offers no anonymous key exchange; use tls-creds-x509"}
	case TypeAuthzFile:
		return &UnsupportedError{What: "object type " + TypeAuthzFile, Reason: "give the rules inline with authz-list"}
	case TypeAuthzPAM:
		return &UnsupportedError{What: "object type " + TypeAuthzPAM, Reason: "migctl authorizes TLS peers by certificate name: use authz-list"}
	default:
		return fmt.Errorf("Parameter 'qom-type' does not accept value '%s' (migctl implements %s, %s and %s)", safe.Printable(typ, maxShown), TypeX509, TypeAuthzList, TypeAuthzSimp)
	}
	if err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, dup := o.m[id]; dup {
		return fmt.Errorf("attempt to add duplicate property '%s' to object (type 'container'): object-del it first", id)
	}
	if len(o.m) >= maxObjects {
		return fmt.Errorf("too many objects (%d): object-del some first", maxObjects)
	}
	o.m[id] = obj
	return nil
}

// Del removes an object (object-del). Connections already made with it
// are not affected; new ones are.
func (o *Objects) Del(id string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.m[id]; !ok {
		return fmt.Errorf("object '%s' not found", id)
	}
	delete(o.m, id)
	return nil
}

// IDs returns the ids of the objects, sorted.
func (o *Objects) IDs() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Sorted(maps.Keys(o.m))
}

// Creds returns the TLS credentials named by tls-creds for the given
// endpoint, with QEMU's errors (migration/tls.c).
func (o *Objects) Creds(id string, want Endpoint) (*X509, error) {
	o.mu.Lock()
	obj, ok := o.m[id]
	o.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("No TLS credentials with id '%s'", id)
	}
	c, ok := obj.(*X509)
	if !ok {
		return nil, fmt.Errorf("Object with id '%s' is not TLS credentials", id)
	}
	if c.endpoint != want {
		return nil, fmt.Errorf("Expected TLS credentials for a %s endpoint: tls-creds '%s' has endpoint=%s", want, id, c.endpoint)
	}
	return c, nil
}

// Authz returns the authorization object named by tls-authz, with QEMU's
// errors (authz/base.c).
func (o *Objects) Authz(id string) (Authorizer, error) {
	o.mu.Lock()
	obj, ok := o.m[id]
	o.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("Cannot find QAuthZ object ID %s", id)
	}
	a, ok := obj.(Authorizer)
	if !ok {
		return nil, fmt.Errorf("Object '%s' is not a QAuthZ subclass", id)
	}
	return a, nil
}

func validID(id string) bool {
	if len(id) > 128 {
		return false
	}
	for i, c := range []byte(id) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case i > 0 && (c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_'):
		default:
			return false
		}
	}
	return true
}

// str reads a string member and removes it from m.
func str(m map[string]json.RawMessage, name string, out *string, required bool) error {
	raw, ok := m[name]
	if !ok {
		if required {
			return fmt.Errorf("Parameter '%s' is missing", name)
		}
		return nil
	}
	delete(m, name)
	if !bytes.HasPrefix(bytes.TrimSpace(raw), []byte(`"`)) || json.Unmarshal(raw, out) != nil {
		return fmt.Errorf("Invalid parameter type for '%s', expected: string", name)
	}
	return nil
}

func boolean(m map[string]json.RawMessage, name string) (*bool, error) {
	raw, ok := m[name]
	if !ok {
		return nil, nil
	}
	delete(m, name)
	var b bool
	switch string(bytes.TrimSpace(raw)) {
	case "true":
		b = true
	case "false":
	default:
		return nil, fmt.Errorf("Invalid parameter type for '%s', expected: boolean", name)
	}
	return &b, nil
}

// unexpected refuses the first member nobody read.
func unexpected(m map[string]json.RawMessage) error {
	for _, k := range slices.Sorted(maps.Keys(m)) {
		return fmt.Errorf("Parameter '%s' is unexpected", k)
	}
	return nil
}

func decodeX509(id string, m map[string]json.RawMessage) (*X509, error) {
	o := X509Options{ID: id}
	var ep string
	for _, f := range []struct {
		name string
		out  *string
	}{{"dir", &o.Dir}, {"endpoint", &ep}, {"priority", &o.Priority}, {"passwordid", &o.PasswordID}} {
		if err := str(m, f.name, f.out, false); err != nil {
			return nil, err
		}
	}
	o.Endpoint = Endpoint(ep)
	var err error
	if o.VerifyPeer, err = boolean(m, "verify-peer"); err != nil {
		return nil, err
	}
	if o.SanityCheck, err = boolean(m, "sanity-check"); err != nil {
		return nil, err
	}
	if _, ok := m["loaded"]; ok {
		return nil, &UnsupportedError{What: "tls-creds-x509 property 'loaded'", Reason: "QEMU deprecated it; credentials load when the object is added"}
	}
	if err := unexpected(m); err != nil {
		return nil, err
	}
	return LoadX509(o)
}

func decodeList(id string, m map[string]json.RawMessage) (*List, error) {
	var policy string
	if err := str(m, "policy", &policy, false); err != nil {
		return nil, err
	}
	var rules []Rule
	if raw, ok := m["rules"]; ok {
		delete(m, "rules")
		var list []map[string]json.RawMessage
		if err := json.Unmarshal(raw, &list); err != nil {
			return nil, errors.New("Invalid parameter type for 'rules', expected: array of objects")
		}
		for i, rm := range list {
			var r Rule
			var p, f string
			if err := str(rm, "match", &r.Match, true); err != nil {
				return nil, fmt.Errorf("rules[%d]: %w", i, err)
			}
			if err := str(rm, "policy", &p, true); err != nil {
				return nil, fmt.Errorf("rules[%d]: %w", i, err)
			}
			if err := str(rm, "format", &f, false); err != nil {
				return nil, fmt.Errorf("rules[%d]: %w", i, err)
			}
			if err := unexpected(rm); err != nil {
				return nil, fmt.Errorf("rules[%d]: %w", i, err)
			}
			r.Policy, r.Format = Policy(p), Format(f)
			rules = append(rules, r)
		}
	}
	if err := unexpected(m); err != nil {
		return nil, err
	}
	return NewList(id, Policy(policy), rules)
}

func decodeSimple(id string, m map[string]json.RawMessage) (*Simple, error) {
	s := &Simple{ID: id}
	if err := str(m, "identity", &s.Identity, true); err != nil {
		return nil, err
	}
	if err := unexpected(m); err != nil {
		return nil, err
	}
	return s, nil
}
