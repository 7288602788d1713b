package spec

// Spec is the decoded form of transitions.yaml: the two state graphs, the
// guards their edges name, and the capabilities, parameters, transports and
// compatibility rules the guards enforce.
//
// A Spec returned by Load has been validated: every name it mentions is
// declared, every graph is sound, and Rules() expands the per-capability
// shorthands into plain rules. Treat it as read-only; the controller and the
// guards share one Spec between goroutines without locking.
type Spec struct {
	// Version of the spec format; 1.
	Version int `yaml:"version" validate:"eq=1"`
	// Guards declares every guard name an edge may use, with its meaning. The
	// implementation of each name is looked up in the guard registry handed to
	// Load; a declared name with no implementation is an error.
	Guards []Guard `yaml:"guards" validate:"required,min=1,unique=Name,dive"`
	// Features are host facilities a capability may need (userfaultfd, a KVM
	// dirty ring, ...). The embedder reports which are present.
	Features []Feature `yaml:"features" validate:"unique=Name,dive"`
	// Facts are properties of the two ends that must be equal for a
	// migration to connect (page size, guest identity). The source announces
	// them in its handshake.
	Facts []Fact `yaml:"facts" validate:"unique=Name,dive"`
	// Capabilities are the boolean migration options, in QEMU's enum order.
	Capabilities []Capability `yaml:"capabilities" validate:"required,min=1,unique=Name,dive"`
	// Parameters are the typed migration options, in QEMU's order.
	Parameters []Parameter `yaml:"parameters" validate:"required,min=1,unique=Name,dive"`
	// Transports are the URI schemes with the properties rules test.
	Transports []Transport `yaml:"transports" validate:"required,min=1,unique=Name,dive"`
	// Rules are the compatibility rules that are not a capability shorthand.
	RuleList []Rule `yaml:"rules" validate:"unique=Name,dive"`
	// Incoming is the destination's state graph.
	Incoming Side `yaml:"incoming" validate:"required"`
	// Outgoing is the source's state graph.
	Outgoing Side `yaml:"outgoing" validate:"required"`
	// Guest is the guest's run-state graph (QEMU's RunState): whether it
	// runs, is paused, waits for an incoming migration or has migrated
	// away. Rules may look at it (Cond.GuestStates). It is optional for
	// the spec alone; the controller needs it (see package machine).
	Guest *Side `yaml:"guest" validate:"omitempty"`

	// File is the name errors and diagrams refer to (set by Load).
	File string `yaml:"-"`

	rules []Rule // RuleList plus the expanded shorthands (set by Load)
	ix    *index // positions of the text Load read, for Check; nil when built by hand
}

// Guard declares a guard name.
type Guard struct {
	Name string `yaml:"name" validate:"required,ident"`
	Doc  string `yaml:"doc" validate:"required"`
}

// Feature declares a host facility.
type Feature struct {
	Name string `yaml:"name" validate:"required,ident"`
	Doc  string `yaml:"doc" validate:"required"`
}

// Fact declares a property both ends must agree on.
type Fact struct {
	Name string `yaml:"name" validate:"required,ident"`
	Doc  string `yaml:"doc" validate:"required"`
	// Message, when set, is the refusal when the two ends differ, with
	// {peer} and {local} replaced by the peer's value and this end's
	// (QEMU's wording where QEMU has one); otherwise a generic text names
	// the fact and both values.
	Message string `yaml:"message"`
}

// Capability is one boolean migration option and its compatibility
// shorthands. Each shorthand expands to a Rule named "<capability>/<kind>"
// (see Spec.Rules).
type Capability struct {
	Name string `yaml:"name" validate:"required,ident"`
	Doc  string `yaml:"doc" validate:"required"`
	// Since is the QEMU version that introduced it (documentation only).
	Since string `yaml:"since"`
	// Conflicts lists capabilities that may not be on together with this one.
	Conflicts []string `yaml:"conflicts" validate:"unique,dive,capability"`
	// Requires lists capabilities that must be on when this one is.
	Requires []string `yaml:"requires" validate:"unique,dive,capability"`
	// Transports, when not empty, lists the only transports it may run on.
	Transports []string `yaml:"transports" validate:"unique,dive,transport"`
	// NeedsTransport lists transport properties it needs (seekable,
	// multi-channel, ...).
	NeedsTransport []string `yaml:"needs-transport" validate:"unique,dive,oneof=multi-channel seekable return-path extra-fds streamable"`
	// NeedsKernel lists host features it needs.
	NeedsKernel []string `yaml:"needs-kernel" validate:"unique,dive,feature"`
	// NeedsKernelOn restricts NeedsKernel to one side ("incoming" or
	// "outgoing"); empty means both.
	NeedsKernelOn string `yaml:"needs-kernel-on" validate:"omitempty,excluded_without=NeedsKernel,oneof=incoming outgoing"`
	// MustMatchPeer: source and destination must agree on it; the source
	// announces it and the connect guard compares.
	MustMatchPeer bool `yaml:"must-match-peer"`
	// Effect says what migctl does with the capability when it is on:
	// honoured by the data plane, refused by a rule, or vacuous (accepted,
	// with nothing to apply it to). See the Effect constants.
	Effect string `yaml:"effect" validate:"omitempty,oneof=honoured refused vacuous"`
	// Why explains the effect; required for vacuous.
	Why string `yaml:"why"`
}

// Effects: what migctl does with a capability that is on or a parameter
// that is set. A setting is never accepted and then silently ignored.
const (
	// EffectHonoured: the data plane applies it.
	EffectHonoured = "honoured"
	// EffectRefused: a rule refuses it (the lint checks one names it).
	EffectRefused = "refused"
	// EffectVacuous: accepted, because the guest has nothing it applies
	// to (no NIC for announce-*, no disk for late-block-activate); Why
	// says so. Orchestrators such as libvirt switch some of these on
	// whenever QEMU offers them, so refusing them would break them.
	EffectVacuous = "vacuous"
)

// Parameter types.
const (
	TypeBool   = "bool"
	TypeUint8  = "uint8"
	TypeUint32 = "uint32"
	TypeUint64 = "uint64"
	TypeSize   = "size" // uint64 bytes
	TypeString = "string"
	TypeEnum   = "enum"
)

// Parameter is one typed migration option.
type Parameter struct {
	Name string `yaml:"name" validate:"required,ident"`
	Doc  string `yaml:"doc" validate:"required"`
	// Type is one of bool, uint8, uint32, uint64, size, string, enum.
	Type string `yaml:"type" validate:"required,oneof=bool uint8 uint32 uint64 size string enum"`
	// Unit is documentation: ms, B/s, %, bytes, MB/s.
	Unit string `yaml:"unit"`
	// Values lists the allowed values of an enum.
	Values []string `yaml:"values" validate:"required_if=Type enum,unique"`
	// Default is the value before anyone sets it, in its textual form.
	Default string `yaml:"default"`
	// Validate is a go-playground/validator tag checked against every value
	// (e.g. "min=1,max=255"); empty means any value of the type. Besides
	// the validator's built-in tags, pow2 accepts powers of two.
	Validate string `yaml:"validate"`
	// Live parameters may change while a migration runs; the others freeze
	// with the capabilities.
	Live bool `yaml:"live"`
	// MustMatchPeer: source and destination must agree on it.
	MustMatchPeer bool `yaml:"must-match-peer"`
	// Effect and Why: as Capability's, for a value other than the default.
	Effect string `yaml:"effect" validate:"omitempty,oneof=honoured refused vacuous"`
	Why    string `yaml:"why"`
}

// Transport properties a capability or rule may test.
const (
	PropMultiChannel = "multi-channel"
	PropSeekable     = "seekable"
	PropReturnPath   = "return-path"
	PropExtraFDs     = "extra-fds"
	PropStreamable   = "streamable"
)

// Transport is one URI scheme and its properties.
type Transport struct {
	Name         string `yaml:"name" validate:"required,ident"`
	Doc          string `yaml:"doc" validate:"required"`
	MultiChannel bool   `yaml:"multi-channel"`
	Seekable     bool   `yaml:"seekable"`
	ReturnPath   bool   `yaml:"return-path"`
	ExtraFDs     bool   `yaml:"extra-fds"`
	Streamable   bool   `yaml:"streamable"`
}

// Has reports whether the transport has the named property.
func (t *Transport) Has(prop string) bool {
	switch prop {
	case PropMultiChannel:
		return t.MultiChannel
	case PropSeekable:
		return t.Seekable
	case PropReturnPath:
		return t.ReturnPath
	case PropExtraFDs:
		return t.ExtraFDs
	case PropStreamable:
		return t.Streamable
	}
	return false
}

// Rule is a compatibility rule: whenever When holds, Require must hold too,
// or the configuration is refused with Message. A rule without Require is a
// prohibition: When alone refuses.
type Rule struct {
	// Name identifies the rule in refusals: lower-case kebab-case words
	// joined by '/', e.g. "mapped-ram/no-tls". It may not take a name the
	// shorthand expansion uses (see Spec.Rules).
	Name string `yaml:"name" validate:"required,rulename"`
	// Doc says where the rule comes from (e.g. "QEMU migrate_caps_check #7").
	Doc     string `yaml:"doc"`
	When    Cond   `yaml:"when"`
	Require *Cond  `yaml:"require"`
	// Message is the refusal text. It may use {uri}, {transport}, {side},
	// {state} and {caps} (the capabilities When named); the evaluator
	// appends the live transport when one is known and the text lacks it.
	Message string `yaml:"message" validate:"required"`
}

// Cond is a conjunction of facts about a configuration; an empty Cond holds.
type Cond struct {
	// Caps must all be on.
	Caps []string `yaml:"caps" validate:"unique,dive,capability"`
	// CapsOff must all be off.
	CapsOff []string `yaml:"caps-off" validate:"unique,dive,capability"`
	// AnyCaps: at least one must be on (ignored when empty).
	AnyCaps []string `yaml:"any-caps" validate:"unique,dive,capability"`
	// Enabling: the change under judgement turns all of these on (they were
	// off before). Only a configuration change can match.
	Enabling []string `yaml:"enabling" validate:"unique,dive,capability"`
	// Params compares parameters with values or with other parameters.
	Params map[string]ParamCond `yaml:"params" validate:"dive,keys,parameter,endkeys"`
	// Transports: the transport is one of these (holds only when a transport
	// is known).
	Transports []string `yaml:"transports" validate:"unique,dive,transport"`
	// NotTransports: a transport is known and is none of these.
	NotTransports []string `yaml:"not-transports" validate:"unique,dive,transport"`
	// TransportHas: a transport is known and has all these properties.
	TransportHas []string `yaml:"transport-has" validate:"unique,dive,oneof=multi-channel seekable return-path extra-fds streamable"`
	// TransportLacks: a transport is known and lacks all these properties.
	TransportLacks []string `yaml:"transport-lacks" validate:"unique,dive,oneof=multi-channel seekable return-path extra-fds streamable"`
	// Features: the host has all these.
	Features []string `yaml:"features" validate:"unique,dive,feature"`
	// Side: the side judging is this one ("incoming"/"outgoing") and it is
	// in use. Every configuration change is judged by both sides, each in
	// its own state with its own transport, an edge only by its own side; a
	// side still in its initial state with no transport is not in use, so
	// its rules do not judge configuration changes (see guards.Evaluate).
	Side string `yaml:"side" validate:"omitempty,oneof=incoming outgoing"`
	// States: the side is in one of these states.
	States []string `yaml:"states" validate:"unique,dive,statename"`
	// Triggers: the judgement is for firing one of these triggers (an
	// edge's on:, e.g. migrate or resume, or one of the configuration
	// triggers set-capabilities and set-parameters). This is how a rule
	// that QEMU checks only when a command runs (migrate_prepare's
	// "cpr-exec mode requires cpr-exec-command") is kept from refusing the
	// configuration changes that lead up to it.
	Triggers []string `yaml:"triggers" validate:"unique,dive,ident"`
	// GuestStates: the guest graph is in one of these states (QEMU's
	// runstate checks, e.g. "Guest is waiting for an incoming migration").
	GuestStates []string `yaml:"guest-states" validate:"unique,dive,statename"`
	// Channels: the migration was given every one of these channel types
	// (QMP's channels argument: main, cpr).
	Channels []string `yaml:"channels" validate:"unique,dive,oneof=main cpr"`
}

// ParamCond compares one parameter. Values are in textual form and parsed
// with the parameter's type; *-param forms name another parameter.
type ParamCond struct {
	Eq      *string  `yaml:"eq"`
	Ne      *string  `yaml:"ne"`
	In      []string `yaml:"in"`
	GeParam string   `yaml:"ge-param" validate:"omitempty,parameter"`
	LeParam string   `yaml:"le-param" validate:"omitempty,parameter"`
}

// Configuration mutability of a state.
const (
	ConfigMutable = "mutable"
	ConfigFrozen  = "frozen"
)

// Side is one state graph (incoming or outgoing).
type Side struct {
	// Initial is the state a fresh controller starts in.
	Initial string `yaml:"initial" validate:"required"`
	// Configure lists the guards every configuration change on this side
	// passes (in every state; see Configure* triggers in package machine).
	Configure []string `yaml:"configure" validate:"unique,dive,guard"`
	States    []State  `yaml:"states" validate:"required,min=1,unique=Name,dive"`
	// Transitions are the edges, at most one per (from, on): the
	// alternative of a guarded edge is its Else, never a second edge
	// (Load refuses two).
	Transitions []Transition `yaml:"transitions" validate:"required,min=1,dive"`
}

// What query-migrate reports of an outgoing state (State.Report), after
// QEMU's fill_source_migration_info.
const (
	// ReportNone: nothing; query-migrate shows the destination's status
	// (the source never started).
	ReportNone = "none"
	// ReportStatus: the status and any error, no statistics.
	ReportStatus = "status"
	// ReportProgress: times so far, expected downtime and RAM statistics.
	ReportProgress = "progress"
	// ReportPostcopy: times so far, the measured downtime and RAM
	// statistics.
	ReportPostcopy = "postcopy"
	// ReportFinal: the final times, the measured downtime and RAM
	// statistics.
	ReportFinal = "final"
)

// State is one node of a side's graph.
type State struct {
	Name string `yaml:"name" validate:"required,statename"`
	Doc  string `yaml:"doc"`
	// Status is the name QMP shows for this state: QEMU's MigrationStatus
	// for the migration sides (the destination's listening and connected
	// are QEMU's setup), QEMU's RunState for the guest graph. Empty means
	// the state's own name.
	Status string `yaml:"status" validate:"omitempty,ident"`
	// Report is what query-migrate shows of the state (the Report
	// constants); empty means status.
	Report string `yaml:"report" validate:"omitempty,oneof=none status progress postcopy final"`
	// Config is "mutable" when capabilities and frozen parameters may change
	// in this state, "frozen" otherwise (live parameters always may). The
	// guest graph's states have no configuration of their own.
	Config string `yaml:"config" validate:"omitempty,oneof=mutable frozen"`
	// Terminal marks a state in which a migration has ended.
	Terminal bool `yaml:"terminal"`
	// Outcome is "unknown" for a state in which the side cannot know how
	// the switchover ended (the channel broke after the destination had
	// everything and before it confirmed): the guest must not start or
	// resume on its own until an operator says what happened. The guard
	// outcome-known refuses the guest's cont while any side is in such a
	// state. Empty otherwise.
	Outcome string `yaml:"outcome" validate:"omitempty,oneof=unknown"`
}

// OutcomeUnknown is State.Outcome for a state that waits for the operator
// to say how the switchover ended.
const OutcomeUnknown = "unknown"

// QMPStatus returns the state's QMP name (Status, or Name when empty).
func (st *State) QMPStatus() string {
	if st.Status != "" {
		return st.Status
	}
	return st.Name
}

// Reports returns what query-migrate shows of the state (Report, or
// ReportStatus when empty).
func (st *State) Reports() string {
	if st.Report != "" {
		return st.Report
	}
	return ReportStatus
}

// Transition kinds.
const (
	KindPermit = "permit" // move to To (the default)
	KindIgnore = "ignore" // accept the trigger and stay (a harmless no-op)
	KindRefuse = "refuse" // refuse the trigger with Message (QEMU's wording), stay
)

// Transition is one edge: on trigger On in state From, go to To if every
// guard allows; if a guard refuses and Else is set, go to Else instead (the
// refusal edge); otherwise the trigger fails with the guards' reasons and
// the state is unchanged.
type Transition struct {
	From   string   `yaml:"from" validate:"required"`
	On     string   `yaml:"on" validate:"required,ident"`
	To     string   `yaml:"to"` // required for permit edges (checked in transitionLevel)
	Guards []string `yaml:"guards" validate:"unique,dive,guard"`
	Else   string   `yaml:"else" validate:"excluded_without=Guards"`
	Kind   string   `yaml:"kind" validate:"omitempty,oneof=permit ignore refuse"`
	// Message is what a kind: refuse edge answers (required there, and only
	// there).
	Message string `yaml:"message"`
	Doc     string `yaml:"doc"`
}
