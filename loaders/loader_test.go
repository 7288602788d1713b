package loaders_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	migctl "github.com/migctl/migctl"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newDest(t *testing.T) (*machine.Controller, *guest.Builtin) {
	t.Helper()
	theSpec, err := migctl.Spec()
	if err != nil {
		t.Fatal(err)
	}
	g, err := guest.NewDestination(guest.Config{Size: 4 << 20, Seed: 9, VRAM: -1})
	if err != nil {
		t.Fatal(err)
	}
	c, err := machine.New(theSpec, machine.Options{Facts: map[string]string{"page-size": "4096", "guest": g.ID()}, Incoming: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); g.Close() })
	return c, g
}

// hostile builds a stream for the destination guest g and lets mutate
// damage it.
type hostile struct {
	name   string
	build  func(t *testing.T, g *guest.Builtin) []byte
	reason string // substring of the destination's error
}

func header(t *testing.T, g *guest.Builtin, blocks map[string]uint64) (*stream.Encoder, *bytes.Buffer) {
	var buf bytes.Buffer
	enc := stream.NewEncoder(&buf)
	if err := enc.WriteHeader(g.ID()); err != nil {
		t.Fatal(err)
	}
	if blocks == nil {
		blocks = map[string]uint64{}
		for _, b := range g.Blocks() {
			blocks[b.Name] = uint64(len(b.Mem))
		}
	}
	h := &stream.Handshake{Protocol: stream.HandshakeProtocol, Side: stream.SideSource, PageSize: 4096, GuestID: g.ID(),
		Capabilities: map[string]bool{}, Parameters: map[string]string{"multifd-channels": "2", "multifd-compression": "none"}, RAMBlocks: blocks}
	if err := enc.WriteHandshake(h); err != nil {
		t.Fatal(err)
	}
	var sb []stream.Block
	for name, size := range blocks {
		sb = append(sb, stream.Block{Name: name, Size: size})
	}
	if err := enc.StartRAM(4096, sb); err != nil {
		t.Fatal(err)
	}
	if err := enc.Flush(); err != nil {
		t.Fatal(err)
	}
	return enc, &buf
}

func page(fill byte) []byte { return bytes.Repeat([]byte{fill}, 4096) }

var hostiles = []hostile{
	{"block bigger than the destination's RAM", func(t *testing.T, g *guest.Builtin) []byte {
		_, buf := header(t, g, map[string]uint64{"pc.ram": 64 << 20})
		return buf.Bytes()
	}, "pc.ram"},
	{"unknown block", func(t *testing.T, g *guest.Builtin) []byte {
		_, buf := header(t, g, map[string]uint64{"rom": 1 << 20})
		return buf.Bytes()
	}, "rom"},
	{"page outside its block", func(t *testing.T, g *guest.Builtin) []byte {
		enc, buf := header(t, g, nil)
		enc.BeginRAMPart()
		enc.PutPage("pc.ram", 0, page(1))
		enc.CloseRAMSection()
		enc.Flush()
		b := buf.Bytes()
		// The page record's be64 address word follows the EOS of the START
		// section; corrupt its top byte so the offset lands far outside.
		i := bytes.LastIndex(b, []byte("\x06pc.ram"))
		if i < 8 {
			t.Fatal("page record not found")
		}
		b[i-8] = 0x40
		return b
	}, "outside"},
	{"truncated stream", func(t *testing.T, g *guest.Builtin) []byte {
		enc, buf := header(t, g, nil)
		enc.BeginRAMPart()
		enc.PutPage("pc.ram", 4096, page(2))
		enc.CloseRAMSection()
		enc.Flush()
		return buf.Bytes()[:buf.Len()-100]
	}, ""},
	{"unknown device", func(t *testing.T, g *guest.Builtin) []byte {
		enc, _ := header(t, g, nil)
		var buf bytes.Buffer
		enc2 := stream.NewEncoder(&buf)
		_ = enc
		enc2.WriteHeader(g.ID())
		enc2.WriteHandshake(&stream.Handshake{PageSize: 4096, GuestID: g.ID(), Parameters: map[string]string{"multifd-channels": "2", "multifd-compression": "none"}})
		enc2.WriteDevice("gpu", 0, 1, []byte("state"))
		enc2.Close()
		return buf.Bytes()
	}, "gpu"},
	{"wrong magic", func(t *testing.T, g *guest.Builtin) []byte {
		return []byte("GIF89a this is not a migration stream at all")
	}, "magic"},
	{"another guest", func(t *testing.T, g *guest.Builtin) []byte {
		var buf bytes.Buffer
		enc := stream.NewEncoder(&buf)
		enc.WriteHeader("builtin-other")
		enc.WriteHandshake(&stream.Handshake{PageSize: 4096, GuestID: "builtin-other", Parameters: map[string]string{"multifd-channels": "2", "multifd-compression": "none"}})
		enc.Close()
		return buf.Bytes()
	}, "guest differs"},
}

// Hostile bytes make the destination fail with a clear reason, never
// write outside its RAM, and never panic.
func TestHostileStreams(t *testing.T) {
	for _, h := range hostiles {
		t.Run(h.name, func(t *testing.T) {
			c, g := newDest(t)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			sock := filepath.Join(t.TempDir(), "in.sock")
			in, err := loaders.Listen(ctx, c, g, "unix:"+sock, loaders.Options{})
			if err != nil {
				t.Fatal(err)
			}
			conn, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			data := h.build(t, g)
			go func() {
				conn.Write(data)
				conn.(*net.UnixConn).CloseWrite()
			}()
			r, err := in.Wait(ctx)
			conn.Close()
			if err != nil {
				t.Fatal(err)
			}
			if r.State != "failed" || r.Err == nil {
				t.Fatalf("destination ended %s (%v)", r.State, r.Err)
			}
			if !strings.Contains(r.Err.Error(), h.reason) {
				t.Errorf("reason %q does not name %q", r.Err, h.reason)
			}
			st, _ := c.Status(spec.Incoming, 0)
			if st.Error == "" {
				t.Error("error-desc is empty")
			}
			if g.Running() {
				t.Error("a failed destination started its guest")
			}
			t.Logf("%s: %v", h.name, r.Err)
		})
	}
}

// While the loader copies pages, the control plane answers: the loader
// never holds the controller lock around I/O. A source that stalls
// mid-stream leaves the destination active and queryable.
func TestQueriesWhileLoaderBlocked(t *testing.T) {
	c, g := newDest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "in.sock")
	in, err := loaders.Listen(ctx, c, g, "unix:"+sock, loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	enc, buf := header(t, g, nil)
	enc.BeginRAMPart()
	enc.PutPage("pc.ram", 0, page(7))
	enc.Flush()
	conn.Write(buf.Bytes()) // the stream stops mid-section: the loader blocks in a read
	sub := c.Subscribe(16)
	defer sub.Close()
	for {
		if st, _ := c.State(spec.Incoming); st == "active" {
			break
		}
		select {
		case <-sub.C():
		case <-ctx.Done():
			t.Fatal("never became active")
		}
	}
	for range 100 {
		done := make(chan struct{})
		go func() { c.Status(spec.Incoming, 1); c.Config(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("a query waited behind the loader")
		}
	}
	if err := c.SetParameters(ctx, map[string]any{"downtime-limit": 100}); err != nil {
		t.Fatalf("live parameter while loading: %v", err)
	}
	var ge *machine.GuardError
	if err := c.SetCapabilities(ctx, map[string]bool{"xbzrle": true}); !errors.As(err, &ge) {
		t.Fatalf("capability change while loading: %v", err)
	}
	conn.Close()
	r, _ := in.Wait(ctx)
	if r.State != "failed" {
		t.Fatalf("destination ended %s", r.State)
	}
}

// migrate_cancel aborts a destination at once in every state before its
// guest runs: waiting for a source, with a source connected that sent
// nothing, and in the middle of a page. It ends cancelled (not failed),
// its guest never ran, and nothing waits for the stalled source.
func TestCancelBeforeTheGuestRuns(t *testing.T) {
	for _, tc := range []struct {
		name  string
		send  func(t *testing.T, g *guest.Builtin) []byte // nil: do not connect
		state string                                      // the state to cancel in
	}{
		{"listening", nil, "listening"},
		{"connected, nothing sent", func(*testing.T, *guest.Builtin) []byte { return nil }, "listening"},
		{"half a page", func(t *testing.T, g *guest.Builtin) []byte {
			enc, buf := header(t, g, nil)
			enc.BeginRAMPart()
			enc.PutPage("pc.ram", 0, page(7))
			enc.Flush()
			return buf.Bytes()[:buf.Len()-2048]
		}, "active"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, g := newDest(t)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			sub := c.Subscribe(64)
			defer sub.Close()
			sock := filepath.Join(t.TempDir(), "in.sock")
			in, err := loaders.Listen(ctx, c, g, "unix:"+sock, loaders.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if tc.send != nil {
				conn, err := net.Dial("unix", sock)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if data := tc.send(t, g); len(data) > 0 {
					if _, err := conn.Write(data); err != nil {
						t.Fatal(err)
					}
				}
			}
			waitIncoming(t, ctx, c, sub, tc.state)
			if err := in.Cancel(ctx, "operator"); err != nil {
				t.Fatal(err)
			}
			r, err := in.Wait(ctx)
			if err != nil {
				t.Fatalf("the loader did not end after cancel: %v", err)
			}
			if r.State != "cancelled" || !errors.Is(r.Err, loaders.ErrCancelled) {
				t.Fatalf("destination ended %s (%v), want cancelled", r.State, r.Err)
			}
			if g.Running() || len(g.RunLog()) != 0 {
				t.Fatal("a cancelled destination ran its guest")
			}
			if err := in.Cancel(ctx, "again"); err != nil {
				t.Fatalf("a second cancel: %v", err)
			}
		})
	}
}

// waitIncoming waits for the incoming side to reach state (it may already
// be there).
func waitIncoming(t *testing.T, ctx context.Context, c *machine.Controller, sub *machine.Subscription, state string) {
	t.Helper()
	st, _ := c.State(spec.Incoming)
	for string(st) != state {
		select {
		case ev := <-sub.C():
			if ev.Side == spec.Incoming && ev.Kind == machine.EventState {
				st = ev.To
			}
		case <-ctx.Done():
			t.Fatalf("the incoming side never reached %s (at %s)", state, st)
		}
	}
}
