package engine_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
)

// The fault matrix's postcopy rows (issue 11): TestPostcopyCutAtPackage
// (recover_test.go) cuts the link at postcopy's commit point; the tests
// here cut it at the run command and at the first page request. After the
// commit point a cut never fails either side and never resumes the
// source's guest: both sides pause, a recovery completes the migration,
// and no page is lost or read as zeros.

// entryHold holds the goroutine that moves one side into one state, the
// first time, until release (bounded by holdBound): a state-entry hook
// (machine.Options.OnEnter), as the fault matrix's serve --x-hold.
type entryHold struct {
	side    string
	state   machine.State
	once    sync.Once
	entered chan struct{} // closed when the side entered the state
	release chan struct{} // closed by the test to let it go on
}

// holdBound bounds a hold the test forgets to release.
const holdBound = time.Minute

func newEntryHold(side string, state machine.State) *entryHold {
	return &entryHold{side: side, state: state, entered: make(chan struct{}), release: make(chan struct{})}
}

func (h *entryHold) onEnter(_ machine.Trigger, o machine.Outcome) {
	if o.Side != h.side || o.To != h.state {
		return
	}
	h.once.Do(func() {
		close(h.entered)
		select {
		case <-h.release:
		case <-time.After(holdBound):
		}
	})
}

// newHeldSource is newEnd for a source whose controller runs h's hook.
func newHeldSource(t *testing.T, cfg guest.Config, h *entryHold) *end {
	t.Helper()
	g, err := guest.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c, err := machine.New(defaultSpec(t), machine.Options{
		Facts:   map[string]string{"page-size": "4096", "guest": g.ID()},
		OnEnter: h.onEnter,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); g.Close() })
	if err := g.Start(); err != nil {
		t.Fatal(err)
	}
	return &end{c: c, g: g}
}

// rpCutter reads a destination's return path frame by frame (be16 type,
// be16 length, data) and cuts the relay instead of passing on the first
// frame of one of types: that message, and everything after it, is lost.
type rpCutter struct {
	r       *relay
	from    net.Conn
	types   []stream.RPType
	pending []byte
}

func (c *rpCutter) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		var h [4]byte
		if _, err := io.ReadFull(c.from, h[:]); err != nil {
			return 0, err
		}
		if slices.Contains(c.types, stream.RPType(binary.BigEndian.Uint16(h[0:]))) {
			c.r.Cut()
			return 0, io.EOF
		}
		frame := make([]byte, 4+int(binary.BigEndian.Uint16(h[2:])))
		copy(frame, h[:])
		if _, err := io.ReadFull(c.from, frame[4:]); err != nil {
			return 0, err
		}
		c.pending = frame
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// newRPRelay is a relay whose first connection's return path goes
// through an rpCutter: the link breaks just as the destination sends the
// first message of one of types.
func newRPRelay(t *testing.T, target string, types ...stream.RPType) *relay {
	t.Helper()
	r := &relay{target: target}
	r.backFirst = func(from net.Conn) io.Reader { return &rpCutter{r: r, from: from, types: types} }
	return startRelay(t, r)
}

// recoverAndComplete runs migrate-recover on the destination and migrate
// resume=true on the source after both paused, and checks the migration
// completes with every page equal and none read as zeros.
func recoverAndComplete(ctx context.Context, t *testing.T, in *loaders.Incoming, m *engine.Migration, src *end, dst *pcEnd) {
	t.Helper()
	ruri := "unix:" + filepath.Join(t.TempDir(), "recover.sock")
	if err := in.Recover(ctx, ruri); err != nil {
		t.Fatalf("migrate-recover: %v", err)
	}
	if err := src.c.SetParameters(ctx, map[string]any{"max-postcopy-bandwidth": 0}); err != nil {
		t.Fatal(err)
	}
	if err := m.Resume(ctx, ruri, nil); err != nil {
		t.Fatalf("migrate resume=true: %v", err)
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sr.Err != nil || dr.Err != nil {
		t.Fatalf("after the recovery: source %v (%s), destination %v (%s)", sr.Err, sr.State, dr.Err, dr.State)
	}
	checkDest(t, dst, src.g)
}

// postcopyCutSetup is the guest and pacing of the cut tests: a guest
// dirtying as fast as the link, the background stream held to 1 MiB/s so
// the cut finds most pages still at the source.
func postcopyCutSetup() (guest.Config, map[string]bool, map[string]any) {
	return guest.Config{Size: 32 << 20, DirtyRate: 32 << 20, Seed: 15, ZeroFraction: 0.1},
		map[string]bool{"postcopy-ram": true, "events": true},
		map[string]any{"max-bandwidth": 16 << 20, "max-postcopy-bandwidth": 1 << 20}
}

// A cut at the run command: the source entered postcopy-active (its
// commit point: it will never resume its guest) and is held there before
// POSTCOPY_RUN goes out; the link is cut, then the source goes on. The
// destination loaded the package but never got RUN, so its guest never
// started; both sides pause (neither fails), and the recovery sends RUN
// again and completes.
func TestPostcopyCutAtRun(t *testing.T) {
	cfg, caps, params := postcopyCutSetup()
	h := newEntryHold(spec.Outgoing, machine.StatePostcopyActive)
	src := newHeldSource(t, cfg, h)
	setCaps(t, src.c, caps, params)
	dst := newPostcopyDest(t, cfg, 1, caps)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := newRelay(t, strings.TrimPrefix(in.Addr().String(), "tcp:"), 0)
	ssub := src.c.Subscribe(256)
	defer ssub.Close()
	dsub := dst.c.Subscribe(256)
	defer dsub.Close()
	m := startPostcopyRun(ctx, t, src, in, r.uri())
	t.Cleanup(func() { close(h.release) }) // runs first: a held Fire must go on before the runs are stopped
	m.StartPostcopy()
	select {
	case <-h.entered:
	case <-ctx.Done():
		st, _ := src.c.Status(spec.Outgoing, 0)
		t.Fatalf("the source never entered postcopy-active (it is %s)", st.State)
	}
	if src.g.Running() {
		t.Fatal("the source's guest runs in postcopy-active")
	}
	r.Cut()
	h.release <- struct{}{} // the held Fire goes on: POSTCOPY_RUN meets the cut
	if got := waitAny(ctx, t, src.c, ssub, spec.Outgoing, "postcopy-paused", "failed", "completed"); got != "postcopy-paused" {
		t.Fatalf("source after a cut past its commit point: %s, want postcopy-paused", got)
	}
	if got := waitAny(ctx, t, dst.c, dsub, spec.Incoming, "postcopy-paused", "failed", "completed"); got != "postcopy-paused" {
		t.Fatalf("destination after a cut once it loaded the package: %s, want postcopy-paused", got)
	}
	if src.g.Running() {
		t.Fatal("the source resumed its guest after its commit point")
	}
	if slices.Contains(history(t, dst.c, spec.Guest), "running") {
		t.Fatalf("the destination started its guest without POSTCOPY_RUN: guest states %v", history(t, dst.c, spec.Guest))
	}
	recoverAndComplete(ctx, t, in, m, src, dst)
}

// A cut at the first page request: the destination's guest runs (RUN
// arrived) and its reader faults; the link breaks just as the first
// REQ_PAGES(_ID) leaves, so that request is lost. Both sides pause; the
// reader stays blocked on its page (never reads zeros) until the
// recovery, which asks again for what is missing, completes.
func TestPostcopyCutAtFirstRequest(t *testing.T) {
	for _, preempt := range []bool{false, true} {
		t.Run(map[bool]string{false: "preempt=false", true: "preempt=true"}[preempt], func(t *testing.T) {
			cfg, caps, params := postcopyCutSetup()
			if preempt {
				caps["postcopy-preempt"] = true
			}
			src := newEnd(t, false, cfg)
			setCaps(t, src.c, caps, params)
			dst := newPostcopyDest(t, cfg, 1, caps)
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			in, err := loaders.Listen(ctx, dst.c, dst.g, "tcp:127.0.0.1:0", loaders.Options{})
			if err != nil {
				t.Fatal(err)
			}
			r := newRPRelay(t, strings.TrimPrefix(in.Addr().String(), "tcp:"), stream.RPReqPagesID, stream.RPReqPages)
			ssub := src.c.Subscribe(256)
			defer ssub.Close()
			dsub := dst.c.Subscribe(256)
			defer dsub.Close()
			m := startPostcopyRun(ctx, t, src, in, r.uri())
			m.StartPostcopy()
			if got := waitAny(ctx, t, src.c, ssub, spec.Outgoing, "postcopy-paused", "failed", "completed"); got != "postcopy-paused" {
				t.Fatalf("source after the first page request was cut: %s, want postcopy-paused", got)
			}
			if got := waitAny(ctx, t, dst.c, dsub, spec.Incoming, "postcopy-paused", "failed", "completed"); got != "postcopy-paused" {
				t.Fatalf("destination after its first page request was cut: %s, want postcopy-paused", got)
			}
			if src.g.Running() {
				t.Fatal("the source resumed its guest after its commit point")
			}
			if !slices.Contains(history(t, dst.c, spec.Guest), "running") {
				t.Fatalf("the destination asked for a page without running its guest: guest states %v", history(t, dst.c, spec.Guest))
			}
			recoverAndComplete(ctx, t, in, m, src, dst)
		})
	}
}
