package rdma

import (
	"errors"
	"strings"
	"testing"
)

// A destination that refuses its source while the source waits for the
// held RAM_BLOCKS_RESULT: the source learns the reason (ERROR), not just
// that the connection closed.
func TestHeldRefusalReachesSource(t *testing.T) {
	pr := connect(t, softProvider(), softProvider(), Options{LazyBlocks: true}, Options{HoldRAM: true})
	errc := make(chan error, 1)
	go func() { errc <- pr.s.WriteRAM(testCtx(t), "ram", 0, pr.src[:4096]) }()
	waitFor(t, func() bool { return pr.s.e.replyWanted() })
	pr.d.Fail(errors.New("connect refused: return-path differs"))
	_ = pr.d.Close()
	err := <-errc
	if !errors.Is(err, ErrPeerFailed) || !strings.Contains(err.Error(), "return-path differs") {
		t.Fatalf("source: %v; want the destination's reason", err)
	}
}
