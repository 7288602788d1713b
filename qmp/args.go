package qmp

import (
	"bytes"
	"encoding/json"
	"maps"
	"slices"
	"strconv"
)

// args reads a command's arguments the way QEMU's input visitor does:
// typed accessors that report the first wrong type or missing member, and
// done, which also reports members nobody asked for. Handlers read every
// argument and call done before any side effect, so a bad request changes
// nothing. An args belongs to the goroutine running the command.
type args struct {
	m    map[string]json.RawMessage
	used map[string]bool
	err  *Error
}

func newArgs(m map[string]json.RawMessage) *args {
	return &args{m: m, used: map[string]bool{}}
}

func (a *args) fail(e *Error) {
	if a.err == nil {
		a.err = e
	}
}

// get returns a member's raw value; ok is false when absent.
func (a *args) get(name string) (json.RawMessage, bool) {
	a.used[name] = true
	v, ok := a.m[name]
	return v, ok
}

func missing(name string) *Error { return genericf("Parameter '%s' is missing", name) }

func wrongType(name, want string) *Error {
	return genericf("Invalid parameter type for '%s', expected: %s", name, want)
}

// str reads a string member.
func (a *args) str(name string, required bool) (string, bool) {
	raw, ok := a.get(name)
	if !ok {
		if required {
			a.fail(missing(name))
		}
		return "", false
	}
	s, err := decodeString(raw)
	if err != nil {
		a.fail(wrongType(name, "string"))
		return "", false
	}
	return s, true
}

// boolean reads a bool member, def when absent.
func (a *args) boolean(name string, def bool) bool {
	raw, ok := a.get(name)
	if !ok {
		return def
	}
	b, err := decodeBool(raw)
	if err != nil {
		a.fail(wrongType(name, "boolean"))
		return def
	}
	return b
}

// integer reads a non-negative integer member.
func (a *args) integer(name string, def uint64) uint64 {
	raw, ok := a.get(name)
	if !ok {
		return def
	}
	n, err := decodeUint(raw)
	if err != nil {
		a.fail(wrongType(name, "integer"))
		return def
	}
	return n
}

// done reports the first error, or the first unexpected member.
func (a *args) done() *Error {
	if a.err != nil {
		return a.err
	}
	for _, k := range slices.Sorted(maps.Keys(a.m)) {
		if !a.used[k] {
			return genericf("Parameter '%s' is unexpected", k)
		}
	}
	return nil
}

func decodeString(raw json.RawMessage) (string, error) {
	if !isString(raw) {
		return "", errNotType
	}
	var s string
	err := json.Unmarshal(raw, &s)
	return s, err
}

func decodeBool(raw json.RawMessage) (bool, error) {
	switch string(bytes.TrimSpace(raw)) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, errNotType
}

// decodeUint accepts a JSON integer literal that fits uint64.
func decodeUint(raw json.RawMessage) (uint64, error) {
	return strconv.ParseUint(string(bytes.TrimSpace(raw)), 10, 64)
}

// isNumber reports whether raw is a JSON number.
func isNumber(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && (raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9'))
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

func isArray(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '['
}

type typeErr struct{}

func (typeErr) Error() string { return "wrong JSON type" }

var errNotType error = typeErr{}

// decodeObject splits a JSON object member into its members, or fails
// naming the member.
func decodeObject(name string, raw json.RawMessage) (map[string]json.RawMessage, *Error) {
	if !isObject(raw) {
		return nil, wrongType(name, "object")
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, wrongType(name, "object")
	}
	if m == nil {
		m = map[string]json.RawMessage{}
	}
	return m, nil
}

// decodeArray splits a JSON array member into its elements.
func decodeArray(name string, raw json.RawMessage) ([]json.RawMessage, *Error) {
	if !isArray(raw) {
		return nil, wrongType(name, "array")
	}
	var l []json.RawMessage
	if err := json.Unmarshal(raw, &l); err != nil {
		return nil, wrongType(name, "array")
	}
	return l, nil
}
