package proc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
)

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// A source guest process seen through its Client: the same ID and page
// content as an in-process guest built from the same Config (the memfds
// really are shared), and a migration through the proxy — every page
// copied while its writers run, the dirty pages after Stop, the devices —
// ends with a local destination whose checksum equals the guest process's.
// A DIRTY_SYNC that lost pages, a device proxy that lost state or a digest
// computed elsewhere than the guest's RAM would make the checksums differ.
func TestSourceProcessMigrates(t *testing.T) {
	cfg := guest.Config{Size: 8 * mib, DirtyRate: 64 * mib, Writers: 2, Seed: 11, ZeroFraction: 0.1}
	_, c := start(t, Config{Guest: cfg, Role: RoleSource, Readers: 1})
	local, err := guest.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	if c.ID() != local.ID() {
		t.Fatalf("ID %q, want %q", c.ID(), local.ID())
	}
	if len(c.Blocks()) != len(local.Blocks()) {
		t.Fatalf("%d blocks, want %d", len(c.Blocks()), len(local.Blocks()))
	}
	for i, b := range c.Blocks() {
		if !bytes.Equal(b.Mem, local.Blocks()[i].Mem) {
			t.Fatalf("block %s: mapped bytes differ from the pattern of the same Config", b.Name)
		}
	}
	if _, err := c.Userfault(); err == nil {
		t.Fatal("a source guest process offered a userfaultfd")
	}

	dst, err := guest.NewDestination(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	ctx := ctxT(t, 60*time.Second)
	c.StartDirtyLog()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	for i, b := range c.Blocks() { // pass 1 while the writers run
		copy(dst.Blocks()[i].Mem, b.Mem)
	}
	for passes := 1; ; passes++ { // let the writers dirty something
		if err := c.WaitReaders(ctx, passes, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		st, err := c.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Guest.PagesWritten > 0 {
			break
		}
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	dirty := guest.NewBitmaps(c.Blocks())
	c.SyncDirty(dirty)
	c.StopDirtyLog()
	if err := c.Err(); err != nil {
		t.Fatal(err)
	}
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for i, b := range c.Blocks() {
		d := guest.Bitmap(dirty[i])
		n += d.Count()
		for p := d.Next(0); p >= 0; p = d.Next(p + 1) {
			copy(dst.Blocks()[i].Page(p), b.Page(p))
		}
	}
	if n == 0 || uint64(n) > st.Guest.PagesWritten {
		t.Fatalf("%d dirty pages reported for %d pages written", n, st.Guest.PagesWritten)
	}
	for i, d := range c.Devices() {
		s, err := d.Save()
		if err != nil {
			t.Fatal(err)
		}
		if err := dst.Devices()[i].Load(s); err != nil {
			t.Fatal(err)
		}
	}
	want, err := c.Checksum(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := dst.Checksum()
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("destination checksum %#x, guest process %#x", got, want)
	}
	if err := c.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	if st.LostReads != 0 {
		t.Fatalf("readers found %d lost pages on a source", st.LostReads)
	}
}

// A device state the guest refuses comes back as guest.ErrDeviceState, a
// digest of a running guest as ErrState, and the session stays usable.
func TestRemoteErrors(t *testing.T) {
	_, c := start(t, Config{Guest: guest.Config{Size: 1 * mib, Seed: 1}, Role: RoleSource})
	ctx := ctxT(t, 30*time.Second)
	if err := c.Devices()[0].Load([]byte{1, 2, 3}); !errors.Is(err, guest.ErrDeviceState) {
		t.Fatalf("Load of 3 bytes into the timer: %v, want ErrDeviceState", err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Digest(ctx); !errors.Is(err, ErrState) {
		t.Fatalf("Digest of a running guest: %v, want ErrState", err)
	}
	if err := c.WaitReaders(ctx, 1, time.Second); !errors.Is(err, ErrState) {
		t.Fatalf("WaitReaders without readers: %v, want ErrState", err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("session unusable after error replies: %v", err)
	}
}

// rawDial connects to a guest process's socket without the Client.
func rawDial(t *testing.T, socket string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func rawHello(lo, hi uint16) []byte {
	return binary.LittleEndian.AppendUint16(binary.LittleEndian.AppendUint16(nil, lo), hi)
}

// One client at a time: a second gets ERROR busy. A client that offers no
// version the guest process speaks gets ERROR version. A client that says
// nothing after HELLO is dropped after IdleTimeout (its connection reads
// EOF), and the next one attaches. Garbage instead of HELLO ends that
// connection and nothing else.
func TestSessions(t *testing.T) {
	cfg := Config{Guest: guest.Config{Size: 1 * mib, Seed: 2}, Role: RoleSource, IdleTimeout: 300 * time.Millisecond}
	p, c := start(t, cfg)
	ctx := ctxT(t, 30*time.Second)
	if _, err := Attach(ctx, p.Socket, AttachOptions{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("second Attach: %v, want ErrBusy", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	v := rawDial(t, p.Socket)
	if err := writeFrame(v, msgHello, rawHello(90, 99), nil, time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	f, err := readFrame(v, time.Now().Add(10*time.Second), 0, maxJSON, 0)
	if err != nil || f.typ != msgError {
		t.Fatalf("HELLO 90..99: %v %v", f.typ, err)
	}
	if err := decodeError(msgHello, f.payload); !errors.Is(err, ErrVersion) {
		t.Fatalf("HELLO 90..99: %v, want ErrVersion", err)
	}

	g := rawDial(t, p.Socket)
	if _, err := g.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := readFrame(g, time.Now().Add(10*time.Second), 0, maxJSON, 0); err == nil {
		// an ERROR frame is a fine answer too; then the connection ends
		if _, err := readFrame(g, time.Now().Add(10*time.Second), 0, maxJSON, 0); !errors.Is(err, io.EOF) {
			t.Fatalf("after garbage: %v, want EOF", err)
		}
	}

	idle := rawDial(t, p.Socket)
	if err := writeFrame(idle, msgHello, rawHello(1, 1), nil, time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	f, err = readFrame(idle, time.Now().Add(10*time.Second), 0, maxJSON, maxFDs)
	if err != nil || f.typ != msgHello|replyBit {
		t.Fatalf("raw HELLO: %v %v", f.typ, err)
	}
	closeFDs(f.fds)
	if _, err := readFrame(idle, time.Now().Add(20*time.Second), 0, maxJSON, 0); !errors.Is(err, io.EOF) {
		t.Fatalf("idle session: %v, want EOF once IdleTimeout passed", err)
	}
	c2, err := Attach(ctx, p.Socket, AttachOptions{})
	if err != nil {
		t.Fatalf("attach after the idle client was dropped: %v", err)
	}
	if c2.Hello().Attaches < 2 {
		t.Fatalf("Attaches = %d, want the earlier sessions counted", c2.Hello().Attaches)
	}
	t.Cleanup(func() { finish(t, p, c2) })
}

// With nobody attaching, the guest process gives up after AttachTimeout and
// exits with status 3, removing its socket.
func TestAttachTimeoutExits(t *testing.T) {
	p, err := Spawn(SpawnOptions{Config: Config{Guest: guest.Config{Size: 1 * mib}, Role: RoleSource, AttachTimeout: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	err = p.Wait(ctxT(t, 30*time.Second))
	var ee interface{ ExitCode() int }
	if !errors.As(err, &ee) || ee.ExitCode() != ExitAttachTimeout {
		p.Kill()
		p.Wait(context.Background())
		t.Fatalf("exit: %v, want status %d", err, ExitAttachTimeout)
	}
	if _, err := os.Stat(p.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket %s left behind: %v", p.Socket, err)
	}
}

// Every wait of the client ends on cancel: an attach to a socket nobody
// answers, and Process.Wait.
func TestClientCancellation(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "mute.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close() // never accepts: the HELLO reply never comes
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := Attach(ctx, sock, AttachOptions{Timeout: time.Hour}); errc <- err }()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Attach: %v", err)
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer dcancel()
	if _, err := Attach(dctx, sock, AttachOptions{Timeout: time.Hour}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Attach past its deadline: %v", err)
	}

	p, c := start(t, Config{Guest: guest.Config{Size: 1 * mib}, Role: RoleSource})
	wctx, wcancel := context.WithCancel(context.Background())
	wcancel()
	if err := p.Wait(wctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait with a cancelled context: %v", err)
	}
	_ = c
}

func TestChildEnv(t *testing.T) {
	got := childEnv([]string{"A=1", "GODEBUG=gctrace=1,asyncpreemptoff=1,x=2", EnvVar + "=old"})
	want := []string{"A=1", "GODEBUG=gctrace=1,x=2"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("childEnv: %q, want %q", got, want)
	}
}

// watchedCtx tells when a request has arranged for its cancellation
// (context.AfterFunc calls the AfterFunc method of a context that has one;
// Value hides the embedded cancelCtx, which the context package would
// otherwise use directly).
type watchedCtx struct {
	context.Context
	once       sync.Once
	registered chan struct{}
}

func (c *watchedCtx) Value(any) any { return nil }

func (c *watchedCtx) AfterFunc(f func()) func() bool {
	stop := context.AfterFunc(c.Context, f)
	c.once.Do(func() { close(c.registered) })
	return stop
}

// A request blocked in the guest process (WAIT_READERS while the only
// reader waits on a page nobody serves) ends as soon as its context is
// cancelled; the session is then broken on the client side, and the guest
// process, which watched the connection during the wait, is free at once
// for a new client — within the busy grace, long before the 10-minute wait
// would have ended.
func TestRequestCancelMidFlight(t *testing.T) {
	p, c := start(t, Config{Guest: guest.Config{Size: 1 * mib, Seed: 4}, Role: RoleDestination, Readers: 1})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	wctx := &watchedCtx{Context: ctx, registered: make(chan struct{})}
	errc := make(chan error, 1)
	go func() { errc <- c.WaitReaders(wctx, 1, 10*time.Minute) }()
	select {
	case <-wctx.registered:
	case <-time.After(20 * time.Second):
		t.Fatal("WaitReaders never arranged for its cancellation")
	}
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled WaitReaders: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("cancel did not reach the blocked request")
	}
	if err := c.Ping(ctxT(t, 5*time.Second)); err == nil {
		t.Fatal("the session still answers after a request was cut off")
	}
	c.Close()
	c2, err := Attach(ctxT(t, 20*time.Second), p.Socket, AttachOptions{})
	if err != nil {
		t.Fatalf("attach after the cancelled request: %v", err)
	}
	t.Cleanup(func() { finish(t, p, c2) })
	if st, err := c2.Stats(ctxT(t, 5*time.Second)); err != nil || st.LostReads != 0 || st.ReaderPasses[0] != 0 {
		t.Fatalf("stats %+v, %v", st, err)
	}
}

// A binary that does not call Main first exits without serving: Start
// reports how it exited and names the missing hook, instead of waiting for
// its whole timeout.
func TestStartWithoutHook(t *testing.T) {
	bin, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no true(1) on this machine to stand for a binary without the hook")
	}
	_, _, err = Start(ctxT(t, 60*time.Second), SpawnOptions{Path: bin, Config: Config{Guest: guest.Config{Size: mib}, Role: RoleSource}}, AttachOptions{Timeout: 50 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "proc.Main") {
		t.Fatalf("Start of a binary without the hook: %v", err)
	}
}

// When the guest process cannot be asked, SyncDirty reports every page of
// every block dirty — never a bit past a block's last page — so the engine
// re-sends everything rather than miss a write, and Err says why.
func TestSyncDirtyFallback(t *testing.T) {
	cfg := guest.Config{Size: 1*mib + 3*4096, Seed: 5, VRAM: 5 * 4096}
	p, c := start(t, Config{Guest: cfg, Role: RoleSource})
	p.Kill()
	if err := p.Wait(ctxT(t, 20*time.Second)); err == nil {
		t.Fatal("killed guest process exited cleanly")
	}
	dst := guest.NewBitmaps(c.Blocks())
	c.SyncDirty(dst)
	if c.Err() == nil {
		t.Fatal("no error kept after a failed SyncDirty")
	}
	for i, b := range c.Blocks() {
		d := guest.Bitmap(dst[i])
		if d.Count() != b.Pages() || d.Next(b.Pages()) != -1 {
			t.Fatalf("block %s: %d bits set for %d pages (next past the end: %d)", b.Name, d.Count(), b.Pages(), d.Next(b.Pages()))
		}
	}
}

// SIGTERM ends a guest process that has a client attached (status 0), and a
// client that sends half a frame header and stalls is cut off after
// OpTimeout, freeing the guest process for the next one.
func TestTerminateAndStalledFrame(t *testing.T) {
	p, c := start(t, Config{Guest: guest.Config{Size: mib}, Role: RoleSource, OpTimeout: 300 * time.Millisecond})
	c.Close()
	raw := rawDial(t, p.Socket)
	if err := writeFrame(raw, msgHello, rawHello(1, 1), nil, time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	f, err := readFrame(raw, time.Now().Add(10*time.Second), 0, maxJSON, maxFDs)
	if err != nil {
		t.Fatal(err)
	}
	closeFDs(f.fds)
	if _, err := raw.Write(encodeHeader(msgPing, 0)[:4]); err != nil { // half a header, then nothing
		t.Fatal(err)
	}
	if _, err := readFrame(raw, time.Now().Add(20*time.Second), 0, maxJSON, 0); !errors.Is(err, io.EOF) {
		t.Fatalf("stalled frame: %v, want the guest process to hang up", err)
	}
	c2, err := Attach(ctxT(t, 20*time.Second), p.Socket, AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(ctxT(t, 20*time.Second)); err != nil {
		t.Fatalf("exit after SIGTERM: %v, want status 0", err)
	}
}
