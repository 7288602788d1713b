package qmp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"github.com/migctl/migctl/internal/safe"
)

// Error classes, as QEMU names them. Almost every error is GenericError;
// CommandNotFound is for unknown commands and for commands sent before (or
// qmp_capabilities sent after) capabilities negotiation.
const (
	ClassGenericError    = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
)

// DefaultMaxRequest bounds one request (one JSON value sent by a client).
// A longer request is answered with an error and the client is dropped.
const DefaultMaxRequest = 1 << 20

// Error is a QMP error reply: {"error":{"class":…,"desc":…}}. The server's
// handlers return it for errors of their own; the client returns it for
// error replies. Desc is meant for people: clients must not parse it.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Desc }

// genericf builds a GenericError.
func genericf(format string, args ...any) *Error {
	return &Error{Class: ClassGenericError, Desc: fmt.Sprintf(format, args...)}
}

// Timestamp is an event's wall-clock time since the Unix epoch.
type Timestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// NewTimestamp converts t.
func NewTimestamp(t time.Time) Timestamp {
	us := t.UnixMicro()
	return Timestamp{Seconds: us / 1e6, Microseconds: us % 1e6}
}

// Time converts the timestamp back (the zero time for QEMU's -1/-1).
func (ts Timestamp) Time() time.Time {
	if ts.Seconds < 0 {
		return time.Time{}
	}
	return time.Unix(ts.Seconds, ts.Microseconds*1000)
}

// Event is an asynchronous QMP event.
type Event struct {
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp Timestamp       `json:"timestamp"`
}

// Event names migctl emits.
const (
	EventMigration     = "MIGRATION"      // data {"status": MigrationStatus}
	EventMigrationPass = "MIGRATION_PASS" // data {"pass": N}
	EventStop          = "STOP"           // the guest stopped (no data)
	EventResume        = "RESUME"         // the guest runs (no data)
)

// Version is the shape of QEMU's query-version result.
type Version struct {
	QEMU struct {
		Micro int `json:"micro"`
		Minor int `json:"minor"`
		Major int `json:"major"`
	} `json:"qemu"`
	Package string `json:"package"`
}

// Greeting is the first message a server sends.
type Greeting struct {
	QMP struct {
		Version      Version  `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
}

// QEMUMajor, QEMUMinor and QEMUMicro are the QEMU version whose QMP surface
// migctl follows (the greeting and query-version report it).
const (
	QEMUMajor = 10
	QEMUMinor = 2
	QEMUMicro = 0
)

func newVersion(pkg string) Version {
	var v Version
	v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro = QEMUMajor, QEMUMinor, QEMUMicro
	v.Package = pkg
	return v
}

func newGreeting(pkg string) Greeting {
	var g Greeting
	g.QMP.Version = newVersion(pkg)
	g.QMP.Capabilities = []string{"oob"}
	return g
}

// reply is one server message to a request.
type reply struct {
	Return any             `json:"return,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	ID     json.RawMessage `json:"id,omitempty"`
}

// encodeLine marshals v as one CRLF-terminated line. json.Marshal never
// emits raw newlines (they are escaped inside strings), so the result is
// one line; HTML escaping is off so that desc texts stay readable.
func encodeLine(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		// Only our own types are encoded; this is a bug, but never crash
		// the server for it.
		b.Reset()
		fmt.Fprintf(&b, `{"error":{"class":"GenericError","desc":%q}}`+"\n", "internal error: "+err.Error())
	}
	out := b.Bytes()
	out = out[:len(out)-1] // Encode's '\n'
	return append(out, '\r', '\n')
}

func encodeReply(ret any, id json.RawMessage) []byte {
	if ret == nil {
		ret = struct{}{}
	}
	return encodeLine(&reply{Return: ret, ID: safeID(id)})
}

// MaxDesc bounds an error reply's desc in bytes. Every desc is made
// printable and cut to this length (internal/safe), since it may quote
// what a peer sent; go-qemu, for one, cannot read a reply line longer than
// 64 KiB.
const MaxDesc = 8 << 10

func encodeError(e *Error, id json.RawMessage) []byte {
	out := &Error{Class: e.Class, Desc: safe.Printable(e.Desc, MaxDesc)}
	return encodeLine(&reply{Error: out, ID: safeID(id)})
}

// request is a decoded QMP request.
type request struct {
	Execute string
	OOB     bool // sent as exec-oob
	Args    map[string]json.RawMessage
	ID      json.RawMessage // compact; nil when absent
}

// decodeRequest checks one framed value against the QMP request shape. On
// failure it returns the error to send and the id if one could be read.
func decodeRequest(raw []byte) (*request, *Error) {
	if err := checkJSON(raw); err != nil { // strict.go: QEMU's rules, not encoding/json's
		return nil, genericf("%s", err)
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return nil, genericf("QMP input must be a JSON object")
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, genericf("JSON parse error, %v", err)
	}
	req := &request{}
	if id, ok := obj["id"]; ok {
		var b bytes.Buffer
		if err := json.Compact(&b, id); err == nil {
			req.ID = b.Bytes()
		}
	}
	for k := range obj {
		switch k {
		case "execute", "exec-oob", "arguments", "id":
		default:
			return req, genericf("QMP input member '%s' is unexpected", k)
		}
	}
	cmd, hasExec := obj["execute"]
	oob, hasOOB := obj["exec-oob"]
	switch {
	case hasExec && hasOOB:
		return req, genericf("QMP input must not have both 'execute' and 'exec-oob'")
	case hasOOB:
		cmd, req.OOB = oob, true
	case !hasExec:
		return req, genericf("QMP input lacks member 'execute'")
	}
	member := "execute"
	if req.OOB {
		member = "exec-oob"
	}
	if err := json.Unmarshal(cmd, &req.Execute); err != nil || !isString(cmd) {
		return req, genericf("QMP input member '%s' must be a string", member)
	}
	if a, ok := obj["arguments"]; ok {
		if !isObject(a) {
			return req, genericf("QMP input member 'arguments' must be an object")
		}
		if err := json.Unmarshal(a, &req.Args); err != nil {
			return req, genericf("QMP input member 'arguments' must be an object")
		}
	}
	if req.Args == nil {
		req.Args = map[string]json.RawMessage{}
	}
	return req, nil
}

func isString(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '"'
}

func isObject(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '{'
}
