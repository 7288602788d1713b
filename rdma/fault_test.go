package rdma

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/migctl/migctl/rdma/fault"
	"github.com/migctl/migctl/rdma/soft"
	"github.com/migctl/migctl/rdma/verbs"
)

const pairSize = 16 << 20

type pair struct {
	s        *Source
	d        *Dest
	src, dst []byte
}

// dense fills b with non-zero bytes.
func dense(b []byte) {
	for i := range b {
		b[i] = byte(i) | 1
	}
}

// connect makes a source and a destination with one 16 MiB block "ram".
// The destination's memory starts as 0xAA.
func connect(t *testing.T, srcP, dstP verbs.Provider, sopts, dopts Options) *pair {
	t.Helper()
	ctx := testCtx(t)
	pr := &pair{src: mapMem(t, pairSize), dst: mapMem(t, pairSize)}
	dense(pr.src)
	fill(pr.dst, 0xAA)
	l, err := Listen(ctx, dstP, loopback(t, "tcp4"), dopts)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type res struct {
		d   *Dest
		err error
	}
	ch := make(chan res, 1)
	go func() {
		d, err := l.Accept(ctx, []Block{{Name: "ram", Mem: pr.dst}})
		ch <- res{d, err}
	}()
	sopts.Blocks = []Block{{Name: "ram", Mem: pr.src}}
	s, serr := Dial(ctx, srcP, l.Addr().String(), sopts)
	r := <-ch
	if r.err != nil {
		if s != nil {
			_ = s.Close()
		}
		t.Fatalf("accept: %v", r.err)
	}
	pr.d = r.d
	t.Cleanup(func() { _ = pr.d.Close() })
	if serr != nil {
		t.Fatalf("dial: %v", serr)
	}
	pr.s = s
	t.Cleanup(func() { _ = pr.s.Close() })
	return pr
}

// writeChunks writes chunks [0, n) of the block, one WriteRAM per chunk,
// then Syncs; it returns the first error.
func (pr *pair) writeChunks(ctx context.Context, n int) error {
	for c := 0; c < n; c++ {
		if err := pr.s.WriteRAM(ctx, "ram", uint64(c)<<20, pr.src[c<<20:(c+1)<<20]); err != nil {
			return err
		}
	}
	return pr.s.Sync(ctx)
}

// destErr waits for the destination's channel to fail and returns why.
func (pr *pair) destErr(t *testing.T) error {
	t.Helper()
	_, err := pr.d.ReadContext(testCtx(t), make([]byte, 1))
	if err == nil {
		t.Fatal("destination: Read returned data; want the channel failed")
	}
	return err
}

func TestWriteOutsideRegisteredRegion(t *testing.T) {
	for _, pinAll := range []bool{false, true} {
		t.Run(map[bool]string{false: "on-demand", true: "pin-all"}[pinAll], func(t *testing.T) {
			// The third WRITE (chunk 2) is aimed 2 MiB further, into chunk 4:
			// outside the chunk its key registers; with pin-all it is aimed
			// past the end of the block.
			shift := uint64(2 << 20)
			if pinAll {
				shift = pairSize
			}
			fp := fault.Wrap(softProvider(), fault.Config{CorruptWrite: 3, Shift: shift})
			pr := connect(t, fp, softProvider(), Options{PinAll: pinAll}, Options{})
			err := pr.writeChunks(testCtx(t), 8)
			if !errors.Is(err, verbs.ErrRemoteAccess) || !strings.Contains(err.Error(), "destination refused an RDMA WRITE") {
				t.Fatalf("source: %v; want the destination's refusal (verbs.ErrRemoteAccess)", err)
			}
			derr := pr.destErr(t)
			if !errors.Is(derr, verbs.ErrRemoteAccess) || !strings.Contains(derr.Error(), "refused an RDMA WRITE from the source") {
				t.Fatalf("destination: %v; want verbs.ErrRemoteAccess", derr)
			}
			var ae *verbs.AccessError
			if !errors.As(derr, &ae) || ae.Len != 1<<20 {
				t.Fatalf("destination error %v does not say which write", derr)
			}
			// Nothing of the refused write, nor of any later one, landed.
			for _, c := range []int{2, 4, 7} {
				if pr.dst[c<<20] != 0xAA || pr.dst[(c+1)<<20-1] != 0xAA {
					t.Errorf("chunk %d was written after the refusal", c)
				}
			}
			if pr.dst[0] != pr.src[0] || pr.dst[2<<20-1] != pr.src[2<<20-1] {
				t.Errorf("chunks 0 and 1, written before the refusal, did not land")
			}
		})
	}
}

func TestFailedRegistrationAtDestination(t *testing.T) {
	// Registrations at the destination: 1 the control arena, 2 chunk 0,
	// 3 chunk 1 (fails).
	fp := fault.Wrap(softProvider(), fault.Config{FailRegister: 3})
	pr := connect(t, softProvider(), fp, Options{}, Options{})
	err := pr.writeChunks(testCtx(t), 4)
	if !errors.Is(err, ErrPeerFailed) || !strings.Contains(err.Error(), "registering chunks 1..1") || !strings.Contains(err.Error(), "fault injected") {
		t.Fatalf("source: %v; want the destination's failure with its reason", err)
	}
	if derr := pr.destErr(t); !errors.Is(derr, fault.ErrInjected) {
		t.Fatalf("destination: %v; want the injected registration failure", derr)
	}
}

func TestFailedRegistrationAtSource(t *testing.T) {
	// At the source: 1 the control arena, 2 local chunk 0, 3 local chunk 1.
	fp := fault.Wrap(softProvider(), fault.Config{FailRegister: 3})
	pr := connect(t, fp, softProvider(), Options{}, Options{})
	if err := pr.writeChunks(testCtx(t), 4); !errors.Is(err, fault.ErrInjected) {
		t.Fatalf("source: %v; want the injected registration failure", err)
	}
	derr := pr.destErr(t)
	if !errors.Is(derr, ErrPeerFailed) || !strings.Contains(derr.Error(), "registering chunk 1 of source block") {
		t.Fatalf("destination: %v; want the source's failure with its reason", derr)
	}
}

func TestFailedPinAllRegistration(t *testing.T) {
	// With pin-all the destination registers the whole block while it
	// answers RAM_BLOCKS_REQUEST (registration 2): Dial must fail.
	ctx := testCtx(t)
	fp := fault.Wrap(softProvider(), fault.Config{FailRegister: 2})
	l, err := Listen(ctx, fp, loopback(t, "tcp4"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dch := make(chan *Dest, 1)
	go func() {
		d, _ := l.Accept(ctx, []Block{{Name: "ram", Mem: mapMem(t, pairSize)}})
		dch <- d
	}()
	s, err := Dial(ctx, softProvider(), l.Addr().String(), Options{PinAll: true, Blocks: []Block{{Name: "ram", Mem: mapMem(t, pairSize)}}})
	d := <-dch
	if d == nil {
		t.Fatal("destination did not accept")
	}
	defer d.Close()
	if err == nil {
		_ = s.Close()
		t.Fatal("Dial succeeded although the destination could not pin the block")
	}
	if !errors.Is(err, ErrPeerFailed) || !strings.Contains(err.Error(), "pin-all") {
		t.Fatalf("source: %v", err)
	}
	if derr := pr(d); !errors.Is(derr, fault.ErrInjected) {
		t.Fatalf("destination: %v", derr)
	}
}

func pr(d *Dest) error {
	_, err := d.ReadContext(context.Background(), make([]byte, 1))
	return err
}

func TestDroppedWriteCompletion(t *testing.T) {
	fp := fault.Wrap(softProvider(), fault.Config{DropCompletion: 2, DropOp: verbs.OpWrite})
	pr := connect(t, fp, softProvider(), Options{}, Options{})
	err := pr.writeChunks(testCtx(t), 6)
	var lce *LostCompletionError
	if !errors.As(err, &lce) || lce.Queue != "send" {
		t.Fatalf("source: %v; want a lost send completion", err)
	}
	if fp.Dropped() != 1 {
		t.Fatalf("%d completions dropped, want 1", fp.Dropped())
	}
	if derr := pr.destErr(t); !errors.Is(derr, ErrPeerFailed) || !strings.Contains(derr.Error(), "was lost") {
		t.Fatalf("destination: %v; want the source's failure", derr)
	}
}

func TestDroppedReceiveCompletion(t *testing.T) {
	// The destination's receives: 4 READYs (the source's credits), the
	// RAM_BLOCKS_REQUEST, then the stream's QEMU_FILE messages: drop the
	// first of those.
	fp := fault.Wrap(softProvider(), fault.Config{DropCompletion: 6, DropOp: verbs.OpRecv})
	pr := connect(t, softProvider(), fp, Options{}, Options{})
	ctx := testCtx(t)
	_, err := pr.s.Write(make([]byte, 3*32<<10))
	if err == nil {
		err = pr.s.Sync(ctx)
	}
	if err == nil {
		_, err = pr.s.ReadContext(ctx, make([]byte, 1))
	}
	if !errors.Is(err, ErrPeerFailed) || !strings.Contains(err.Error(), "receive work request") {
		t.Fatalf("source: %v; want the destination's lost-completion failure", err)
	}
	var lce *LostCompletionError
	if derr := pr.destErr(t); !errors.As(derr, &lce) || lce.Queue != "receive" {
		t.Fatalf("destination: %v; want a lost receive completion", derr)
	}
}

func TestCutMidWrite(t *testing.T) {
	// Setup traffic is a few hundred bytes; 8 MiB + 12345 bytes into the
	// connection is inside the eighth 1 MiB WRITE's payload.
	cut := soft.New(soft.Options{WrapConn: fault.CutAfter(8<<20 + 12345)})
	pr := connect(t, cut, softProvider(), Options{}, Options{})
	if err := pr.writeChunks(testCtx(t), 16); !errors.Is(err, verbs.ErrConnLost) && !errors.Is(err, ErrPeerClosed) {
		t.Fatalf("source: %v; want the connection lost", err)
	}
	derr := pr.destErr(t)
	if !errors.Is(derr, verbs.ErrConnLost) || !strings.Contains(derr.Error(), "byte RDMA WRITE") {
		t.Fatalf("destination: %v; want the connection lost inside an RDMA WRITE", derr)
	}
}

func TestTimeoutFailsBothSides(t *testing.T) {
	// The destination never reads: after its 4 credits the source's stream
	// has no credit, and the wait is bounded by Options.Timeout.
	pr := connect(t, softProvider(), softProvider(), Options{Timeout: 300e6}, Options{})
	_, err := pr.s.Write(make([]byte, 1<<20))
	var te *TimeoutError
	if !errors.As(err, &te) {
		t.Fatalf("source: %v; want a TimeoutError", err)
	}
	// The destination learns through ERROR (which needs no credit); its
	// buffered stream is still readable, then the failure shows.
	for {
		_, err = pr.d.ReadContext(testCtx(t), make([]byte, 64<<10))
		if err != nil {
			break
		}
	}
	if !errors.Is(err, ErrPeerFailed) || !strings.Contains(err.Error(), "no answer from the peer") {
		t.Fatalf("destination: %v; want the source's timeout", err)
	}
}

func TestCancelAccept(t *testing.T) {
	l, err := Listen(testCtx(t), softProvider(), loopback(t, "tcp4"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := l.Accept(ctx, []Block{{Name: "ram", Mem: make([]byte, 4096)}})
		errc <- err
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Accept: %v; want context.Canceled", err)
	}
}

func TestCancelDial(t *testing.T) {
	// A TCP peer that accepts and never answers the connection request.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_, _ = io.ReadFull(c, make([]byte, 8)) // the request is on its way
			cancel()
			_, _ = io.Copy(io.Discard, c)
			_ = c.Close()
		}
	}()
	_, err = Dial(ctx, softProvider(), ln.Addr().String(), Options{Blocks: []Block{{Name: "ram", Mem: make([]byte, 4096)}}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial: %v; want context.Canceled", err)
	}
}

func TestCancelReads(t *testing.T) {
	pr := connect(t, softProvider(), softProvider(), Options{}, Options{})
	for name, read := range map[string]func(context.Context, []byte) (int, error){
		"destination": pr.d.ReadContext, "source": pr.s.ReadContext,
	} {
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { _, err := read(ctx, make([]byte, 1)); errc <- err }()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Errorf("%s ReadContext: %v; want context.Canceled", name, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := pr.d.WaitSync(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitSync: %v; want context.Canceled", err)
	}
	// The channel still works after cancelled reads.
	if _, err := pr.s.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := pr.s.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := pr.d.ReadContext(testCtx(t), make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
}

func TestCancelRegistrationWait(t *testing.T) {
	fp := fault.Wrap(softProvider(), fault.Config{})
	pr := connect(t, softProvider(), fp, Options{}, Options{})
	fp.Stall() // the destination stops handling messages
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- pr.s.WriteRAM(ctx, "ram", 0, pr.src[:4096]) }()
	// The request has left when the source's channel waits for its reply;
	// cancel then.
	waitFor(t, func() bool { return pr.s.e.replyWanted() })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("WriteRAM: %v; want context.Canceled", err)
	}
	if pr.s.Err() == nil {
		t.Fatal("a cancelled registration left the source's channel usable; its reply could still arrive")
	}
}

func TestCancelSync(t *testing.T) {
	fp := fault.Wrap(softProvider(), fault.Config{})
	pr := connect(t, fp, softProvider(), Options{}, Options{})
	if err := pr.s.WriteRAM(testCtx(t), "ram", 0, pr.src[:1<<20]); err != nil {
		t.Fatal(err)
	}
	fp.Stall() // the source's completions stop
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- pr.s.Sync(ctx) }()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Sync: %v; want context.Canceled", err)
	}
}

func TestCloseUnblocksWrite(t *testing.T) {
	// The destination never reads: the source's Write waits for a credit
	// until Close.
	pr := connect(t, softProvider(), softProvider(), Options{}, Options{})
	errc := make(chan error, 1)
	go func() { _, err := pr.s.Write(make([]byte, 1<<20)); errc <- err }()
	waitFor(t, func() bool { return pr.s.e.creditsLeft() == 0 })
	_ = pr.s.Close()
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("Write: %v; want ErrClosed", err)
	}
}

// waitFor polls cond on every change of the channel state (no sleeping).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	ctx := testCtx(t)
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatal("condition never held")
		default:
		}
		runtimeGosched()
	}
}
