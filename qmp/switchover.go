package qmp

import (
	"encoding/json"
	"slices"

	"github.com/migctl/migctl/spec"
)

// Commands of the switchover commit protocol and of hung channels:
//
//   - x-migctl-resolve-switchover (migctl extension): the operator says how
//     a switchover whose outcome is unknown ended. On a source
//     (x-migctl-unknown-outcome on the outgoing side) with destination-gone:
//     true the guest runs here again and the migration fails; false: the
//     destination runs it and the migration completed. On a destination
//     with source-gone: true the guest starts there; false: what was loaded
//     is discarded.
//   - yank and query-yank (QEMU's): the migration instance exists while a
//     migration runs on either side; yanking it aborts its channels at once
//     (failed before the switchover commit, x-migctl-unknown-outcome after).
var _ = addCommands(map[string]command{
	"x-migctl-resolve-switchover": {run: cmdResolveSwitchover},
	"yank":                        {run: cmdYank, oob: true},
	"query-yank":                  {run: cmdQueryYank, oob: true},
})

func cmdResolveSwitchover(s *Server, _ *client, a *args) (any, func(), error) {
	_, hasDest := a.get("destination-gone")
	destGone := a.boolean("destination-gone", false)
	_, hasSrc := a.get("source-gone")
	srcGone := a.boolean("source-gone", false)
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	switch {
	case hasDest == hasSrc:
		return nil, nil, genericf("x-migctl-resolve-switchover takes exactly one of destination-gone (on a source) and source-gone (on a destination)")
	case hasDest:
		return struct{}{}, nil, s.h.Resolve(s.ctx, spec.Outgoing, destGone)
	default:
		return struct{}{}, nil, s.h.Resolve(s.ctx, spec.Incoming, srcGone)
	}
}

// YankInstance is QEMU's YankInstance (a flat union on type); migctl has
// only the migration instance.
type YankInstance struct {
	Type string `json:"type"`
}

// yankMigration is the migration instance's type.
const yankMigration = "migration"

// migrationRunning reports whether a migration runs on either side (QEMU
// registers the migration yank instance for that time).
func (s *Server) migrationRunning() (bool, error) {
	for _, side := range spec.SideNames {
		st, err := s.c.Status(side, 0)
		if err != nil {
			return false, err
		}
		if !st.Initial && !st.Terminal {
			return true, nil
		}
	}
	return false, nil
}

func cmdQueryYank(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	out := []YankInstance{}
	running, err := s.migrationRunning()
	if err != nil {
		return nil, nil, err
	}
	if running {
		out = append(out, YankInstance{Type: yankMigration})
	}
	return out, nil, nil
}

func cmdYank(s *Server, _ *client, a *args) (any, func(), error) {
	raw, ok := a.get("instances")
	if !ok {
		a.fail(missing("instances"))
	}
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	var list []map[string]json.RawMessage
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, nil, wrongType("instances", "array of YankInstance")
	}
	yankMig := false
	for _, inst := range list {
		typ, err := decodeString(inst["type"])
		if err != nil {
			return nil, nil, genericf("Parameter 'instances' members need a string 'type' (block-node, chardev or migration)")
		}
		if !slices.Contains([]string{"block-node", "chardev", yankMigration}, typ) {
			return nil, nil, genericf("Parameter 'type' does not accept value '%s'", typ)
		}
		running, err := s.migrationRunning()
		if err != nil {
			return nil, nil, err
		}
		if typ != yankMigration || !running {
			// QEMU's words when the instance is not registered.
			return nil, nil, &Error{Class: ClassDeviceNotFound, Desc: "Instance not found"}
		}
		if len(inst) != 1 {
			return nil, nil, genericf("Parameter 'instances': the migration instance has no member but 'type'")
		}
		yankMig = true
	}
	if yankMig {
		return struct{}{}, nil, s.h.Yank(s.ctx)
	}
	return struct{}{}, nil, nil
}
