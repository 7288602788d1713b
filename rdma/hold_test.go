package rdma

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/rdma/fault"
)

// A destination that refuses its source while the source waits for the
// held RAM_BLOCKS_RESULT: the source learns the reason (ERROR), not just
// that the connection closed, although Close follows Fail at once.
func TestHeldRefusalReachesSource(t *testing.T) {
	pr := connect(t, softProvider(), softProvider(), Options{LazyBlocks: true}, Options{HoldRAM: true})
	errc := make(chan error, 1)
	go func() { errc <- pr.s.WriteRAM(testCtx(t), "ram", 0, pr.src[:4096]) }()
	waitFor(t, func() bool { return pr.s.e.waiters() > 0 })
	pr.d.Fail(errors.New("connect refused: return-path differs"))
	_ = pr.d.Close()
	err := <-errc
	if !errors.Is(err, ErrPeerFailed) || !strings.Contains(err.Error(), "return-path differs") {
		t.Fatalf("source: %v; want the destination's reason", err)
	}
}

// HoldRAM: until OpenRAM the source's first RAM write waits, nothing is
// registered at the destination (not even with pin-all) and its memory is
// untouched, while stream bytes written before flow. After OpenRAM the
// write lands.
func TestHoldRAMUntilOpen(t *testing.T) {
	for _, pinAll := range []bool{false, true} {
		t.Run(fmt.Sprintf("pin-all=%v", pinAll), func(t *testing.T) {
			dfp := fault.Wrap(softProvider(), fault.Config{})
			pr := connect(t, softProvider(), dfp, Options{LazyBlocks: true, PinAll: pinAll}, Options{HoldRAM: true})
			ctx := testCtx(t)
			if _, err := pr.s.Write([]byte("QEVM")); err != nil {
				t.Fatal(err)
			}
			if err := pr.s.Flush(); err != nil {
				t.Fatal(err)
			}
			head := make([]byte, 4)
			if _, err := pr.d.ReadContext(ctx, head); err != nil || string(head) != "QEVM" {
				t.Fatalf("destination read %q, %v", head, err)
			}
			errc := make(chan error, 1)
			go func() {
				err := pr.s.WriteRAM(ctx, "ram", 0, pr.src[:1<<20])
				if err == nil {
					err = pr.s.Sync(ctx)
				}
				errc <- err
			}()
			// The request reached the destination and is held there (or,
			// were RAM not held, the write completes).
			waitFor(t, func() bool { return pr.d.holding() || len(errc) > 0 })
			if n := dfp.Registrations(); n != 1 {
				t.Errorf("%d registrations at the destination before OpenRAM, want 1 (its control arena)", n)
			}
			if !bytes.Equal(pr.dst[:1<<20], bytes.Repeat([]byte{0xAA}, 1<<20)) {
				t.Error("the destination's memory changed before OpenRAM")
			}
			select {
			case err := <-errc:
				t.Fatalf("the RAM write returned before OpenRAM: %v", err)
			default:
			}
			if err := pr.d.OpenRAM(); err != nil {
				t.Fatal(err)
			}
			if err := <-errc; err != nil {
				t.Fatalf("after OpenRAM: %v", err)
			}
			if !bytes.Equal(pr.dst[:1<<20], pr.src[:1<<20]) {
				t.Error("the write did not land after OpenRAM")
			}
			// Arena, then the block (pin-all) or chunk 0 (on demand).
			if n := dfp.Registrations(); n != 2 {
				t.Errorf("%d registrations at the destination, want 2", n)
			}
		})
	}
}

// holding reports whether a RAM_BLOCKS_REQUEST is held (tests).
func (d *Dest) holding() bool {
	d.ramMu.Lock()
	defer d.ramMu.Unlock()
	return d.held != nil
}

// LazyBlocks: a layout mismatch is found by the first RAM write, and fails
// both sides naming the block.
func TestLazyBlocksLayoutMismatch(t *testing.T) {
	ctx := testCtx(t)
	p := softProvider()
	l, err := Listen(ctx, p, loopback(t, "tcp4"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dch := make(chan *Dest, 1)
	go func() {
		d, _ := l.Accept(ctx, []Block{{Name: "ram", Mem: mapMem(t, 2<<20)}})
		dch <- d
	}()
	s, err := Dial(ctx, p, l.Addr().String(), Options{LazyBlocks: true, Blocks: []Block{{Name: "ram", Mem: mapMem(t, 4<<20)}}})
	if err != nil {
		t.Fatalf("Dial with LazyBlocks: %v; the layout is not known yet", err)
	}
	defer s.Close()
	d := <-dch
	if d == nil {
		t.Fatal("destination did not accept")
	}
	defer d.Close()
	err = s.WriteRAM(ctx, "ram", 0, make([]byte, 4096))
	var le *LayoutError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), `block "ram" is 4194304 bytes here and 2097152`) {
		t.Fatalf("first WriteRAM: %v; want a LayoutError", err)
	}
	if derr := pr(d); !errors.Is(derr, ErrPeerFailed) || !strings.Contains(derr.Error(), "differ") {
		t.Fatalf("destination: %v", derr)
	}
}

// A stream may idle far longer than Options.Timeout (a source paused
// before switchover): a Read waiting for bytes does not time out, and the
// channel stays healthy. Options.Timeout still bounds waits for the peer.
func TestIdleReadNotTimedOut(t *testing.T) {
	pr := connect(t, softProvider(), softProvider(), Options{}, Options{Timeout: time.Nanosecond})
	got := make(chan error, 1)
	buf := make([]byte, 5)
	go func() { _, err := pr.d.ReadContext(testCtx(t), buf); got <- err }()
	// The reader is blocked (or, were its wait bounded by the 1 ns
	// Timeout, has failed).
	waitFor(t, func() bool { return pr.d.e.waiters() > 0 || len(got) > 0 })
	if _, err := pr.s.Write([]byte("later")); err != nil {
		t.Fatal(err)
	}
	if err := pr.s.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil || string(buf) != "later" {
		t.Fatalf("idle Read: %q, %v", buf, err)
	}
	if err := pr.d.Err(); err != nil {
		t.Fatalf("the channel failed: %v", err)
	}
}
