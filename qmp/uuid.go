package qmp

// query-uuid, as QEMU has it: the guest's UUID (QEMU's -uuid; migctl
// serve --guest uuid=…), all zeros when none was set.

var _ = addCommands(map[string]command{
	"query-uuid": {run: cmdQueryUUID},
})

// ZeroUUID is what query-uuid shows for a guest without a UUID, as QEMU
// does without -uuid.
const ZeroUUID = "00000000-0000-0000-0000-000000000000"

// UUIDInfo is query-uuid's result (QEMU's UuidInfo).
type UUIDInfo struct {
	UUID string `json:"UUID"`
}

func cmdQueryUUID(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	u := s.opts.UUID
	if u == "" {
		u = ZeroUUID
	}
	return UUIDInfo{UUID: u}, nil, nil
}
