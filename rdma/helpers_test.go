package rdma

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/rdma/soft"
	"github.com/migctl/migctl/rdma/verbs"
)

// mapMem returns n bytes of anonymous mmap'd memory (as guest RAM is),
// unmapped at the end of the test.
func mapMem(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap %d: %v", n, err)
	}
	t.Cleanup(func() { _ = unix.Munmap(b) })
	return b
}

// pattern fills b with bytes that depend on the block's seed and the
// offset, leaving every chunk whose index is in zeroChunks all zero and
// every 5th page of the other chunks zero too.
func pattern(b []byte, seed byte, zeroChunks map[int]bool) {
	for off := 0; off < len(b); off += 4096 {
		end := min(off+4096, len(b))
		page := off / 4096
		if zeroChunks[off>>20] || page%5 == 3 {
			clear(b[off:end])
			continue
		}
		for i := off; i < end; i++ {
			b[i] = seed ^ byte(i) ^ byte(i>>9) ^ byte(i>>17)
		}
	}
}

func fill(b []byte, v byte) {
	for i := range b {
		b[i] = v
	}
}

// loopback returns the listen address for network "tcp4" or "tcp6", or
// skips when the machine lacks it.
func loopback(t testing.TB, network string) string {
	t.Helper()
	host := "127.0.0.1"
	if network == "tcp6" {
		host = "::1"
	}
	l, err := net.Listen(network, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("no %s loopback on this machine: %v", network, err)
	}
	_ = l.Close()
	return net.JoinHostPort(host, "0")
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func softProvider() verbs.Provider { return soft.New(soft.Options{}) }
