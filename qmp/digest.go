package qmp

import (
	"errors"
	"fmt"
)

// x-migctl-query-digest: the hosted guest's digest (for the built-in guest,
// a CRC-32C per RAM block and device state folded into 64 bits), so that
// an operator or a test compares a source and a destination across
// processes after a migration, as `migctl demo` does inside one run. The
// guest must be stopped (a running guest rewrites its pages): a source in
// postmigrate, a destination that was told to stay paused (stop before
// migrate-incoming), or one never started. The x- prefix marks it
// unstable, as QEMU's x- commands are.

var _ = addCommands(map[string]command{
	"x-migctl-query-digest": {run: cmdQueryDigest},
})

// DigestInfo is x-migctl-query-digest's result.
type DigestInfo struct {
	// Digest is the guest's digest as 16 hex digits.
	Digest string `json:"digest"`
}

func cmdQueryDigest(s *Server, _ *client, a *args) (any, func(), error) {
	if e := a.done(); e != nil {
		return nil, nil, e
	}
	if s.opts.Digest == nil {
		return nil, nil, errors.New("x-migctl-query-digest: this server's guest has no digest")
	}
	d, err := s.opts.Digest()
	if err != nil {
		return nil, nil, fmt.Errorf("x-migctl-query-digest: %w (a running guest has none: stop it first)", err)
	}
	return DigestInfo{Digest: fmt.Sprintf("%016x", d)}, nil, nil
}
