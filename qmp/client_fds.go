package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// write sends one request, with oob as its control message (SCM_RIGHTS)
// when there is one; that needs a unix socket.
func (c *Client) write(b, oob []byte) error {
	if len(oob) == 0 {
		_, err := c.conn.Write(b)
		return err
	}
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return errors.New("descriptors can be passed only over a unix socket")
	}
	n, oobn, err := uc.WriteMsgUnix(b, oob, nil)
	if err == nil && (n != len(b) || oobn != len(oob)) {
		err = fmt.Errorf("short write: %d of %d bytes, %d of %d control bytes", n, len(b), oobn, len(oob))
	}
	return err
}

// GetFD registers f with the server under name (QMP getfd): the
// descriptor travels with the request's bytes (SCM_RIGHTS), so the client
// must be connected over a unix socket. The server keeps its own copy; f
// stays the caller's. Use the name as fd:NAME in migrate or
// migrate-incoming (once), or forget it with closefd.
func (c *Client) GetFD(ctx context.Context, name string, f *os.File) error {
	return c.ExecuteWithFDs(ctx, "getfd", map[string]any{"fdname": name}, f)
}

// ExecuteWithFDs runs a command as Execute does, with the descriptors of
// files attached to its bytes (SCM_RIGHTS). As os.File.Fd does, it puts
// the files in blocking mode.
func (c *Client) ExecuteWithFDs(ctx context.Context, cmd string, arguments any, files ...*os.File) error {
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	id := "migctl-" + strconv.FormatUint(c.nextID.Add(1), 10)
	req := map[string]any{"execute": cmd, "id": id}
	if arguments != nil {
		req["arguments"] = arguments
	}
	raw, err := json.Marshal(req)
	if err != nil {
		return err
	}
	idJSON, _ := json.Marshal(id)
	line, err := c.roundTrip(ctx, raw, string(idJSON), unix.UnixRights(fds...))
	runtime.KeepAlive(files) // their descriptors must stay open until sent
	if err != nil {
		return err
	}
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		return fmt.Errorf("%s: malformed reply %.200q: %w", cmd, line, err)
	}
	if m.Error != nil {
		return m.Error
	}
	return nil
}
