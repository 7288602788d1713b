package qmp

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
	"github.com/migctl/migctl/vmm"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func testSpec(t testing.TB) *spec.Spec {
	t.Helper()
	s, err := migctl.Spec()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// testGuest is the built-in guest every test migrates: 16 MiB, lightly
// dirtied, no video RAM block.
func testGuest() guest.Config {
	return guest.Config{Size: 16 << 20, DirtyRate: 4 << 20, Seed: 7, ZeroFraction: 0.1, VRAM: -1}
}

// node is one migctl serve in process: controller, guest, host, server
// listening on a unix socket.
type node struct {
	c    *machine.Controller
	g    *guest.Builtin
	h    *vmm.VMM
	s    *Server
	sock string
	exit chan error // Exit calls (exit-on-error)
	// close shuts the node down (server, host, controller, guest); it
	// also runs at the end of the test.
	close func()
}

type nodeOpts struct {
	dest   bool
	host   vmm.Options
	server Options
	guest  *guest.Config
	spec   *spec.Spec // default: the repository's
	// holds, when set, are given to the controller (OnEnter) and the
	// server, as migctl serve --x-hold does.
	holds *Holds
}

func newNode(t testing.TB, o nodeOpts) *node {
	t.Helper()
	cfg := testGuest()
	if o.guest != nil {
		cfg = *o.guest
	}
	var g *guest.Builtin
	var err error
	if o.dest {
		g, err = guest.NewDestination(cfg)
	} else {
		g, err = guest.New(cfg)
	}
	if err != nil {
		t.Fatal(err)
	}
	sp := o.spec
	if sp == nil {
		sp = testSpec(t)
	}
	// As migctl serve wires them: one object registry for the server and
	// the guards, one descriptor table for the server and the transports.
	if o.server.Objects == nil {
		o.server.Objects = creds.NewObjects()
	}
	if o.server.FDs == nil {
		o.server.FDs = NewFDTable()
	}
	tc := &transport.Config{Descriptors: o.server.FDs}
	if o.host.Engine.Dial == nil {
		o.host.Engine.Dial = tc.Dial
	}
	if o.host.Loader.Listen == nil {
		o.host.Loader.Listen = tc.Listen
	}
	mo := machine.Options{Facts: map[string]string{"page-size": "4096", "guest": g.ID()}, Incoming: o.dest,
		Objects: GuardObjects(o.server.Objects)}
	if o.holds != nil {
		mo.OnEnter = o.holds.Enter
		o.server.Holds = o.holds
	}
	c, err := machine.New(sp, mo)
	if err != nil {
		g.Close()
		t.Fatal(err)
	}
	if !o.dest {
		if err := g.Start(); err != nil {
			t.Fatal(err)
		}
	}
	n := &node{c: c, g: g, exit: make(chan error, 1)}
	if o.host.Exit == nil {
		o.host.Exit = func(err error) { n.exit <- err }
	}
	n.h = vmm.New(c, g, o.host)
	n.s = NewServer(c, n.h, o.server)
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	n.sock = filepath.Join(dir, "qmp.sock")
	n.close = sync.OnceFunc(func() {
		if o.holds != nil {
			o.holds.Close()
		}
		n.s.Close()
		n.h.Close()
		c.Close()
		g.Close()
		os.RemoveAll(dir)
	})
	t.Cleanup(n.close)
	if _, err := n.s.Listen("unix:" + n.sock); err != nil {
		t.Fatal(err)
	}
	return n
}

// client connects a negotiated Client, closed at the end of the test.
func (n *node) client(t testing.TB) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := DialAddr(ctx, "unix:"+n.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

const testTimeout = 30 * time.Second

// run executes a command that must succeed.
func run(t testing.TB, cl *Client, cmd string, args any) json.RawMessage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	ret, err := cl.Execute(ctx, cmd, args)
	if err != nil {
		t.Fatalf("%s %v: %v", cmd, args, err)
	}
	return ret
}

// fails executes a command that must fail with a QMP error.
func fails(t testing.TB, cl *Client, cmd string, args any) *Error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	_, err := cl.Execute(ctx, cmd, args)
	qe, ok := err.(*Error)
	if !ok {
		t.Fatalf("%s %v: want a QMP error, got %v", cmd, args, err)
	}
	return qe
}

func queryMigrate(t testing.TB, cl *Client) MigrationInfo {
	t.Helper()
	var info MigrationInfo
	if err := json.Unmarshal(run(t, cl, "query-migrate", nil), &info); err != nil {
		t.Fatal(err)
	}
	return info
}

func queryStatus(t testing.TB, cl *Client) RunState {
	t.Helper()
	var rs RunState
	if err := json.Unmarshal(run(t, cl, "query-status", nil), &rs); err != nil {
		t.Fatal(err)
	}
	return rs
}

func caps(kv ...any) map[string]any {
	var list []map[string]any
	for i := 0; i < len(kv); i += 2 {
		list = append(list, map[string]any{"capability": kv[i], "state": kv[i+1]})
	}
	return map[string]any{"capabilities": list}
}

// waitStatus reads MIGRATION events until one has status want, returning
// every status seen on the way (want included).
func waitStatus(t testing.TB, cl *Client, want string) []string {
	t.Helper()
	var seen []string
	timer := time.NewTimer(testTimeout)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-cl.Events():
			if !ok {
				t.Fatalf("connection closed while waiting for MIGRATION %s (seen %v)", want, seen)
			}
			if ev.Event != EventMigration {
				continue
			}
			var d struct{ Status string }
			if err := json.Unmarshal(ev.Data, &d); err != nil {
				t.Fatal(err)
			}
			seen = append(seen, d.Status)
			if d.Status == want {
				return seen
			}
		case <-timer.C:
			t.Fatalf("no MIGRATION %s within %s (seen %v)", want, testTimeout, seen)
		}
	}
}

// listen starts migrate-incoming on dst (tcp on loopback, port chosen by
// the kernel) and returns the URI the source must use.
func listen(t testing.TB, cl *Client, extra map[string]any) string {
	t.Helper()
	args := map[string]any{"uri": "tcp:127.0.0.1:0"}
	for k, v := range extra {
		args[k] = v
	}
	run(t, cl, "migrate-incoming", args)
	info := queryMigrate(t, cl)
	if len(info.SocketAddress) != 1 {
		t.Fatalf("query-migrate on a listening destination: want one socket-address, got %+v", info)
	}
	uri := info.SocketAddress[0].URI()
	if uri == "tcp:127.0.0.1:0" {
		t.Fatalf("socket-address shows port 0, not the bound port: %+v", info.SocketAddress)
	}
	return uri
}
