package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/internal/safe"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// handler runs one command. It reads every argument through a and checks
// a.done() before any side effect. It may return a func to run after the
// reply was queued (qmp_capabilities, quit).
type handler func(s *Server, cl *client, a *args) (ret any, after func(), err error)

type command struct {
	run handler
	oob bool // allow-oob, as in QEMU's schema
}

// commands is the command table; filled in init (it refers to handlers
// that refer back to it through query-commands).
var commands map[string]command

func init() {
	commands = map[string]command{
		"qmp_capabilities":           {run: cmdCapabilities},
		"query-version":              {run: cmdQueryVersion},
		"query-commands":             {run: cmdQueryCommands},
		"query-status":               {run: cmdQueryStatus},
		"quit":                       {run: cmdQuit},
		"migrate":                    {run: cmdMigrate},
		"migrate-incoming":           {run: cmdMigrateIncoming},
		"migrate-set-capabilities":   {run: cmdSetCapabilities},
		"query-migrate-capabilities": {run: cmdQueryCapabilities},
		"migrate-set-parameters":     {run: cmdSetParameters},
		"query-migrate-parameters":   {run: cmdQueryParameters},
		"query-migrate":              {run: cmdQueryMigrate},
		"migrate_cancel":             {run: cmdCancel},
		"migrate-cancel":             {run: cmdCancel}, // the spelling ARCHITECTURE.md uses; QEMU's is migrate_cancel
		"migrate-continue":           {run: cmdContinue},
		"stop":                       {run: cmdStop},
		"cont":                       {run: cmdCont},
		"migrate-start-postcopy":     {run: cmdStartPostcopy},
		"migrate-pause":              {run: cmdPause, oob: true},
		"migrate-recover":            {run: cmdRecover, oob: true},
		"query-migctl-machine":       {run: cmdQueryMachine},
	}
	maps.Copy(commands, extraCommands)
}

// extraCommands holds the commands defined in other files (objects.go,
// fds.go, …), added by addCommands from package-level initializers, which
// run before init.
var extraCommands = map[string]command{}

func addCommands(m map[string]command) bool {
	maps.Copy(extraCommands, m)
	return true
}

// Commands returns the names of every command the server accepts, sorted.
func Commands() []string { return slices.Sorted(maps.Keys(commands)) }

// dispatch runs one framed request and returns the encoded reply, a func
// to run once it is queued, and, for a successful qmp_capabilities, the
// negotiation to apply together with queueing it.
func (s *Server) dispatch(cl *client, raw []byte) ([]byte, func(), *negotiation) {
	req, e := decodeRequest(raw)
	if e != nil {
		var id json.RawMessage
		if req != nil {
			id = req.ID
		}
		return encodeError(e, id), nil, nil
	}
	if !cl.negotiated.Load() {
		if req.Execute != "qmp_capabilities" {
			return encodeError(&Error{Class: ClassCommandNotFound, Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"}, req.ID), nil, nil
		}
	} else if req.Execute == "qmp_capabilities" {
		return encodeError(&Error{Class: ClassCommandNotFound, Desc: "Capabilities negotiation is already complete, command ignored"}, req.ID), nil, nil
	}
	cmd, ok := commands[req.Execute]
	if !ok {
		return encodeError(&Error{Class: ClassCommandNotFound, Desc: fmt.Sprintf("The command %s has not been found", req.Execute)}, req.ID), nil, nil
	}
	if req.OOB {
		if !cl.oob.Load() {
			return encodeError(genericf("Out-of-band execution was not enabled: negotiate with {\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}} or use 'execute'"), req.ID), nil, nil
		}
		if !cmd.oob {
			return encodeError(genericf("The command %s does not support OOB", req.Execute), req.ID), nil, nil
		}
	}
	ret, after, err := cmd.run(s, cl, newArgs(req.Args))
	var neg *negotiation
	if errors.As(err, &neg) {
		return encodeReply(ret, req.ID), nil, neg
	}
	if err != nil {
		return encodeError(s.qmpError(err), req.ID), nil, nil
	}
	return encodeReply(ret, req.ID), after, nil
}

// qmpError turns a handler's error into the QMP error to send: QEMU's
// wording where QEMU has one, followed by migctl's detail, which names
// what to change.
func (s *Server) qmpError(err error) *Error {
	var qe *Error
	if errors.As(err, &qe) {
		return qe
	}
	var np *machine.NotPermittedError
	if errors.As(err, &np) {
		if np.Reason != "" {
			return genericf("%s", np.Reason)
		}
		return genericf("%s", notPermittedText(s.c.Spec(), np))
	}
	var ge *machine.GuardError
	if errors.As(err, &ge) {
		if (ge.Trigger == machine.TriggerSetCapabilities || ge.Trigger == machine.TriggerSetParameters) && slices.Contains(ge.Guards, guards.ConfigMutable) {
			return genericf("There's a migration process in progress: %s", ge.Reason())
		}
		return genericf("%s", ge.Reason())
	}
	if errors.Is(err, machine.ErrClosed) {
		return genericf("migctl is shutting down")
	}
	return genericf("%s", err.Error())
}

// notPermittedText words a trigger refused for want of an edge, in QEMU's
// words where QEMU has them.
func notPermittedText(sp *spec.Spec, np *machine.NotPermittedError) string {
	sd := sp.Side(np.Side)
	from := statesAccepting(sd, string(np.Trigger))
	detail := fmt.Sprintf("the %s side is in state %s; %s is accepted only in %s", np.Side, np.State, np.Trigger, strings.Join(from, ", "))
	switch {
	case np.Side == spec.Outgoing && np.Trigger == machine.TriggerMigrate && !sd.Terminal(string(np.State)):
		return "There's a migration process in progress (" + detail + ")"
	case np.Side == spec.Incoming && np.Trigger == machine.TriggerIncoming:
		return "The incoming migration has already been started (" + detail + ")"
	}
	return fmt.Sprintf("%s is not possible now: %s", np.Trigger, detail)
}

func statesAccepting(sd *spec.Side, trigger string) []string {
	var out []string
	for _, t := range sd.Transitions {
		if t.On == trigger && (t.Kind == "" || t.Kind == spec.KindPermit) && !slices.Contains(out, t.From) {
			out = append(out, t.From)
		}
	}
	if len(out) == 0 {
		out = []string{"no state"}
	}
	return out
}

func cmdCapabilities(_ *Server, cl *client, a *args) (any, func(), error) {
	oob := false
	if raw, ok := a.get("enable"); ok {
		list, e := decodeArray("enable", raw)
		if e != nil {
			return nil, nil, e
		}
		for i, el := range list {
			v, err := decodeString(el)
			if err != nil {
				return nil, nil, wrongType(fmt.Sprintf("enable[%d]", i), "string")
			}
			if v != "oob" {
				return nil, nil, genericf("Parameter 'enable[%d]' does not accept value '%s' (the only QMP capability is oob)", i, v)
			}
			oob = true
		}
	}
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	// serveStream switches the client to command mode together with
	// queueing the reply (see Server.emitNegotiated).
	return struct{}{}, nil, &negotiation{oob: oob}
}

// negotiation is how qmp_capabilities asks serveStream to switch the
// client to command mode. It is returned in the handler's error slot and
// dispatch takes it out before errors are turned into replies; it never
// reaches a client as an error.
type negotiation struct{ oob bool }

func (*negotiation) Error() string { return "negotiation" }

func cmdQueryVersion(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return newVersion(s.opts.Package), nil, nil
}

func cmdQueryCommands(_ *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	type info struct {
		Name string `json:"name"`
	}
	var out []info
	for _, n := range Commands() {
		out = append(out, info{Name: n})
	}
	return out, nil, nil
}

// RunState is query-status's result (QEMU's StatusInfo).
type RunState struct {
	// Status is the guest graph's QMP status: QEMU's RunState (running,
	// paused, inmigrate, finish-migrate, postmigrate, prelaunch).
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

func cmdQueryStatus(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	st, err := s.c.Status(spec.Guest, 0)
	if err != nil {
		return nil, nil, err
	}
	return RunState{Status: st.QMPStatus, Running: st.State == machine.GuestRunning}, nil, nil
}

func cmdStop(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.Stop(s.ctx)
}

func cmdCont(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.Cont(s.ctx)
}

func cmdQuit(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, func() { s.quitOnce.Do(func() { close(s.quit) }) }, nil
}

// migrationURI reads the uri xor channels arguments of migrate and
// migrate-incoming and returns the URI of the main channel, the channel
// types given (nil for a plain uri) and every address (for the trust
// policy). Whether a channel type may be used is the spec's rules' call
// (migctl/no-cpr-channel), not this parser's.
func migrationURI(cmd string, a *args) (string, []string, []transport.Addr, *Error) {
	uri, hasURI := a.str("uri", false)
	rawCh, hasCh := a.get("channels")
	if a.err != nil {
		return "", nil, nil, a.err
	}
	switch {
	case hasURI && hasCh:
		return "", nil, nil, genericf("'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should be present in '%s' qmp command", cmd)
	case !hasURI && !hasCh:
		return "", nil, nil, genericf("One of 'uri' or 'channels' arguments should be present in '%s' qmp command", cmd)
	case hasURI:
		addr, err := transport.Parse(uri)
		if err != nil {
			return "", nil, nil, genericf("%s", err.Error())
		}
		return uri, nil, []transport.Addr{addr}, nil
	}
	list, e := decodeArray("channels", rawCh)
	if e != nil {
		return "", nil, nil, e
	}
	if len(list) == 0 {
		return "", nil, nil, genericf("Channel list is empty: give one channel of type main")
	}
	if cmd == "migrate-incoming" && len(list) > 1 {
		return "", nil, nil, genericf("Channel list must have only one entry, for type 'main'")
	}
	var types []string
	var addrs []transport.Addr
	main := ""
	for i, el := range list {
		typ, addr, e := decodeChannel(fmt.Sprintf("channels[%d]", i), el)
		if e != nil {
			return "", nil, nil, e
		}
		if slices.Contains(types, typ) {
			return "", nil, nil, genericf("Channel list has more than one %s entry", typ)
		}
		types = append(types, typ)
		addrs = append(addrs, addr)
		if typ == "main" || len(list) == 1 {
			main = addr.String()
		}
	}
	if main == "" {
		return "", nil, nil, genericf("Channel list has no main entry")
	}
	return main, types, addrs, nil
}

// decodeChannel decodes a MigrationChannel strictly, naming the member at
// fault, and returns its type and address.
func decodeChannel(name string, raw json.RawMessage) (string, transport.Addr, *Error) {
	m, e := decodeObject(name, raw)
	if e != nil {
		return "", transport.Addr{}, e
	}
	ca := newArgs(m)
	typ, _ := ca.str("channel-type", true)
	rawAddr, hasAddr := ca.get("addr")
	if ca.err == nil && !hasAddr {
		ca.fail(missing("addr"))
	}
	if e := ca.done(); e != nil {
		return "", transport.Addr{}, prefixed(name, e)
	}
	if !slices.Contains(channelTypes, typ) {
		return "", transport.Addr{}, genericf("Parameter '%s.channel-type' does not accept value '%s' (want %s)", name, typ, strings.Join(channelTypes, " or "))
	}
	ma, e := decodeAddress(name+".addr", rawAddr)
	if e != nil {
		return "", transport.Addr{}, e
	}
	addr, err := transport.FromChannel(ma)
	if err != nil {
		return "", transport.Addr{}, genericf("%s", err.Error())
	}
	return typ, addr, nil
}

// channelTypes is QEMU's MigrationChannelType.
var channelTypes = []string{"main", "cpr"}

// prefixed rewrites an args error about member X into one about
// PREFIX.X, as QEMU names nested members.
func prefixed(prefix string, e *Error) *Error {
	d := e.Desc
	for _, lead := range []string{"Parameter '", "Invalid parameter type for '"} {
		if strings.HasPrefix(d, lead) {
			return genericf("%s%s.%s", lead, prefix, d[len(lead):])
		}
	}
	return e
}

// addressMembers are the JSON members of transport.MigrationAddress.
var addressMembers = func() map[string]bool {
	out := map[string]bool{}
	t := reflect.TypeFor[transport.MigrationAddress]()
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name != "" && name != "-" {
			out[name] = true
		}
	}
	return out
}()

func decodeAddress(name string, raw json.RawMessage) (transport.MigrationAddress, *Error) {
	m, e := decodeObject(name, raw)
	if e != nil {
		return transport.MigrationAddress{}, e
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if !addressMembers[k] {
			return transport.MigrationAddress{}, genericf("Parameter '%s.%s' is unexpected", name, k)
		}
	}
	var ma transport.MigrationAddress
	if err := json.Unmarshal(raw, &ma); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return transport.MigrationAddress{}, wrongType(name+"."+te.Field, jsonKind(te.Type))
		}
		return transport.MigrationAddress{}, genericf("Parameter '%s': %v", name, err)
	}
	if _, ok := m["transport"]; !ok {
		return transport.MigrationAddress{}, missing(name + ".transport")
	}
	return ma, nil
}

func jsonKind(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Slice:
		return "array"
	case reflect.Struct, reflect.Map:
		return "object"
	}
	return "integer"
}

func cmdMigrate(s *Server, cl *client, a *args) (any, func(), error) {
	uri, channels, addrs, e := migrationURI("migrate", a)
	a.boolean("detach", false) // accepted and ignored, as in QEMU
	resume := a.boolean("resume", false)
	if e == nil {
		e = a.done()
	}
	if e != nil {
		return nil, nil, e
	}
	if e := s.checkMigration(cl, "migrate", addrs); e != nil {
		return nil, nil, e
	}
	if resume {
		return struct{}{}, nil, s.h.Resume(s.ctx, uri, channels)
	}
	return struct{}{}, nil, s.h.Migrate(s.ctx, uri, channels)
}

func cmdMigrateIncoming(s *Server, cl *client, a *args) (any, func(), error) {
	uri, channels, addrs, e := migrationURI("migrate-incoming", a)
	exitOnError := a.boolean("exit-on-error", true)
	if e == nil {
		e = a.done()
	}
	if e != nil {
		return nil, nil, e
	}
	if e := s.checkMigration(cl, "migrate-incoming", addrs); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.Incoming(s.ctx, uri, channels, exitOnError)
}

func cmdSetCapabilities(s *Server, _ *client, a *args) (any, func(), error) {
	raw, ok := a.get("capabilities")
	if !ok {
		a.fail(missing("capabilities"))
	}
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	list, e := decodeArray("capabilities", raw)
	if e != nil {
		return nil, nil, e
	}
	caps := map[string]bool{}
	for i, el := range list {
		name := fmt.Sprintf("capabilities[%d]", i)
		m, e := decodeObject(name, el)
		if e != nil {
			return nil, nil, e
		}
		ca := newArgs(m)
		capName, _ := ca.str("capability", true)
		raw, hasState := ca.get("state")
		if ca.err == nil && !hasState {
			ca.fail(missing("state"))
		}
		if e := ca.done(); e != nil {
			return nil, nil, prefixed(name, e)
		}
		state, err := decodeBool(raw)
		if err != nil {
			return nil, nil, wrongType(name+".state", "boolean")
		}
		if s.c.Spec().Capability(capName) == nil {
			return nil, nil, genericf("Parameter '%s.capability' does not accept value '%s' (query-migrate-capabilities lists the capabilities)", name, capName)
		}
		caps[capName] = state
	}
	return struct{}{}, nil, s.c.SetCapabilities(s.ctx, caps)
}

// CapabilityStatus is one element of query-migrate-capabilities.
type CapabilityStatus struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

func cmdQueryCapabilities(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	cfg := s.c.Config()
	out := make([]CapabilityStatus, 0, len(s.c.Spec().Capabilities))
	for _, c := range s.c.Spec().Capabilities {
		out = append(out, CapabilityStatus{Capability: c.Name, State: cfg.Caps[c.Name]})
	}
	return out, nil, nil
}

// Parameters whose QEMU type is not a scalar; migctl's spec keeps them as
// text.
const (
	paramBitmapMapping = "block-bitmap-mapping" // QEMU: [BitmapMigrationNodeAlias]; here its JSON text
	paramCPRExec       = "cpr-exec-command"     // QEMU: [str]; here the words joined by spaces
)

// tlsParams accept null (QEMU's StrOrNull), meaning "".
var tlsParams = map[string]bool{"tls-creds": true, "tls-hostname": true, "tls-authz": true}

func cmdSetParameters(s *Server, _ *client, a *args) (any, func(), error) {
	sp := s.c.Spec()
	vals := map[string]any{}
	for _, k := range slices.Sorted(maps.Keys(a.m)) {
		p := sp.Parameter(k)
		if p == nil {
			continue // reported by done
		}
		raw, _ := a.get(k)
		v, e := paramValue(p, raw)
		if e != nil {
			return nil, nil, e
		}
		vals[k] = v
	}
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.c.SetParameters(s.ctx, vals)
}

// paramValue checks one migrate-set-parameters member's JSON type and
// returns the value for Controller.SetParameters.
func paramValue(p *spec.Parameter, raw json.RawMessage) (any, *Error) {
	switch {
	case p.Name == paramBitmapMapping:
		if !isArray(raw) {
			return nil, wrongType(p.Name, "array")
		}
		var b bytes.Buffer
		if err := json.Compact(&b, raw); err != nil {
			return nil, wrongType(p.Name, "array")
		}
		return b.String(), nil
	case p.Name == paramCPRExec:
		var words []string
		if !isArray(raw) || json.Unmarshal(raw, &words) != nil {
			return nil, wrongType(p.Name, "array of strings")
		}
		return strings.Join(words, " "), nil
	case tlsParams[p.Name] && isNull(raw):
		return "", nil
	}
	switch p.Type {
	case spec.TypeBool:
		b, err := decodeBool(raw)
		if err != nil {
			return nil, wrongType(p.Name, "boolean")
		}
		return b, nil
	case spec.TypeString:
		v, err := decodeString(raw)
		if err != nil {
			return nil, wrongType(p.Name, "string")
		}
		return v, nil
	case spec.TypeEnum:
		v, err := decodeString(raw)
		if err != nil {
			return nil, wrongType(p.Name, "string")
		}
		if !slices.Contains(p.Values, v) {
			return nil, genericf("Parameter '%s' does not accept value '%s' (want %s)", p.Name, v, p.Range())
		}
		return v, nil
	}
	if !isNumber(raw) {
		return nil, wrongType(p.Name, "integer")
	}
	n, err := decodeUint(raw)
	if err != nil {
		return nil, genericf("Parameter '%s' expects a non-negative integer (%s), got %s", p.Name, p.Range(), bytes.TrimSpace(raw))
	}
	return n, nil
}

// orderedObject marshals as a JSON object with its members in order.
type orderedObject []member

type member struct {
	key string
	val any
}

func (o orderedObject) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(m.key)
		b.Write(k)
		b.WriteByte(':')
		v, err := json.Marshal(m.val)
		if err != nil {
			return nil, err
		}
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func cmdQueryParameters(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	cfg := s.c.Config()
	var out orderedObject
	for i := range s.c.Spec().Parameters {
		p := &s.c.Spec().Parameters[i]
		text := cfg.Params[p.Name]
		var v any
		switch {
		case p.Name == paramBitmapMapping:
			if text == "" {
				continue // QEMU shows it only once set
			}
			if json.Valid([]byte(text)) {
				v = json.RawMessage(text)
			} else {
				v = text
			}
		case p.Name == paramCPRExec:
			v = append([]string{}, strings.Fields(text)...)
		case p.Type == spec.TypeBool:
			v = text == "true"
		case p.Type == spec.TypeString || p.Type == spec.TypeEnum:
			v = text
		default:
			v = json.Number(text)
			if text == "" {
				v = json.Number("0")
			}
		}
		out = append(out, member{p.Name, v})
	}
	return out, nil, nil
}

func cmdQueryMigrate(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	in, err := s.c.Status(spec.Incoming, 0)
	if err != nil {
		return nil, nil, err
	}
	out, err := s.c.Status(spec.Outgoing, 0)
	if err != nil {
		return nil, nil, err
	}
	info := migrationInfo(in, out, time.Now())
	if in.Report != spec.ReportNone && s.opts.PrepareTime > 0 {
		info.XMigctlPrepareMs = ms(s.opts.PrepareTime)
	}
	return info, nil, nil
}

func cmdCancel(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.Cancel(s.ctx)
}

// migrationStatuses is QEMU's MigrationStatus enum, in order.
var migrationStatuses = []string{
	"none", "setup", "cancelling", "cancelled", "active", "postcopy-device",
	"postcopy-active", "postcopy-paused", "postcopy-recover-setup",
	"postcopy-recover", "completed", "failed", "colo", "pre-switchover",
	"device", "wait-unplug", "failing",
}

func cmdContinue(s *Server, _ *client, a *args) (any, func(), error) {
	state, _ := a.str("state", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if !slices.Contains(migrationStatuses, state) {
		return nil, nil, genericf("Parameter 'state' does not accept value '%s' (want a MigrationStatus such as pre-switchover)", state)
	}
	return struct{}{}, nil, s.h.Continue(s.ctx, state)
}

func cmdStartPostcopy(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.StartPostcopy(s.ctx)
}

func cmdPause(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.Pause(s.ctx)
}

func cmdRecover(s *Server, cl *client, a *args) (any, func(), error) {
	uri, _ := a.str("uri", true)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	addr, err := transport.Parse(uri)
	if err != nil {
		return nil, nil, genericf("%s", err.Error())
	}
	if e := s.checkMigration(cl, "migrate-recover", []transport.Addr{addr}); e != nil {
		return nil, nil, e
	}
	return struct{}{}, nil, s.h.Recover(s.ctx, uri)
}

// MachineInfo is query-migctl-machine's result: what the controller knows
// of each side, beyond QEMU's query-migrate.
type MachineInfo struct {
	Incoming SideInfo `json:"incoming"`
	Outgoing SideInfo `json:"outgoing"`
}

// SideInfo describes one side's state machine.
type SideInfo struct {
	// State is the machine's state (migctl's name); Status is QEMU's
	// MigrationStatus for it.
	State  string `json:"state"`
	Status string `json:"status"`
	// Permitted lists the triggers the state accepts (configuration
	// triggers aside).
	Permitted []string `json:"permitted"`
	// ConfigMutable: capabilities and non-live parameters may change.
	ConfigMutable bool   `json:"config-mutable"`
	Terminal      bool   `json:"terminal"`
	Transport     string `json:"transport,omitempty"`
	URI           string `json:"uri,omitempty"`
	ErrorDesc     string `json:"error-desc,omitempty"`
	// History holds the most recent transitions, oldest first.
	History []Transition `json:"history"`
}

// Transition is one entry of a side's history.
type Transition struct {
	Time    string `json:"time"` // RFC 3339 with nanoseconds
	From    string `json:"from"`
	To      string `json:"to"`
	Trigger string `json:"trigger"`
	Detail  string `json:"detail,omitempty"`
}

// maxHistory bounds query-migctl-machine's history argument, which keeps
// replies well under the 64 KiB some clients can read in one line.
const maxHistory = 32

func cmdQueryMachine(s *Server, _ *client, a *args) (any, func(), error) {
	n := a.integer("history", 16)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if n > maxHistory {
		return nil, nil, genericf("Parameter 'history' must be at most %d", maxHistory)
	}
	var out MachineInfo
	for _, side := range spec.SideNames {
		st, err := s.c.Status(side, int(n))
		if err != nil {
			return nil, nil, err
		}
		si := SideInfo{
			State:         string(st.State),
			Status:        st.QMPStatus,
			Permitted:     []string{},
			ConfigMutable: st.Mutable,
			Terminal:      st.Terminal,
			ErrorDesc:     peerDesc(st.Error),
			History:       []Transition{},
		}
		for _, t := range st.Permitted {
			si.Permitted = append(si.Permitted, string(t))
		}
		if st.Endpoint != nil {
			si.Transport, si.URI = st.Endpoint.Transport, st.Endpoint.URI
		}
		for _, r := range st.History {
			si.History = append(si.History, Transition{Time: r.Time.Format(time.RFC3339Nano), From: string(r.From), To: string(r.To), Trigger: string(r.Trigger), Detail: safe.Printable(r.Detail, 256)})
		}
		if side == spec.Incoming {
			out.Incoming = si
		} else {
			out.Outgoing = si
		}
	}
	return out, nil, nil
}
