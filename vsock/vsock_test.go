package vsock

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/transport"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// needVsock skips when this kernel has no AF_VSOCK at all.
func needVsock(t *testing.T) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Skipf("AF_VSOCK sockets are not available on this kernel (%v): load the vsock module", err)
	}
	unix.Close(fd)
}

func parse(t *testing.T, s string) transport.Addr {
	t.Helper()
	a, err := transport.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// anyPort is VMADDR_PORT_ANY: the kernel picks a free port.
const anyPort = "4294967295"

// TestRegistered: transport opens vsock: through this package once it is
// linked, as rdma:.
func TestRegistered(t *testing.T) {
	needVsock(t)
	ln, err := transport.Listen(context.Background(), parse(t, "vsock:4294967295:"+anyPort))
	if err != nil {
		t.Fatalf("transport.Listen(vsock:) with the scheme registered: %v", err)
	}
	defer ln.Close()
	if a := ln.Addr(); a.Scheme != transport.SchemeVsock || a.Port == 0 || uint32(a.Port) == unix.VMADDR_PORT_ANY {
		t.Fatalf("bound address %v: want the port the kernel chose", a)
	}
}

// TestAcceptEnds: a waiting Accept ends at once when its context ends, and
// when the listener is closed.
func TestAcceptEnds(t *testing.T) {
	needVsock(t)
	ln, err := scheme{}.Listen(context.Background(), parse(t, "vsock:4294967295:"+anyPort), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := ln.Accept(ctx); done <- err }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Accept after cancel: %v", err)
		}
	case <-time.After(10 * time.Second): // a hang guard, not a timing
		t.Fatal("Accept ignored its context")
	}
	go func() { _, err := ln.Accept(context.Background()); done <- err }()
	ln.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept ignored Close")
	}
}

// TestDialBounded: a connection attempt ends with its context: to CID 1
// (the local loopback transport), which on a host without vsock_loopback
// never answers (the kernel's own timeout is 2 s), or at once when the
// loopback refuses. Either way Dial returns by the context's deadline
// and says why.
func TestDialBounded(t *testing.T) {
	needVsock(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	c, err := scheme{}.Dial(ctx, parse(t, "vsock:1:1"), nil)
	if err == nil {
		c.Close()
		t.Fatal("a connection to a port nobody listens on succeeded")
	}
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, unix.ECONNRESET) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("Dial: %v", err)
	}
}

// TestMigrationChannel moves bytes both ways over a real vsock connection
// through the loopback transport, with half-close and deadlines as tcp:
// has them. It needs vsock_loopback, which this machine may lack.
func TestMigrationChannel(t *testing.T) {
	needVsock(t)
	ln, err := scheme{}.Listen(context.Background(), parse(t, "vsock:4294967295:"+anyPort), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().Port
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := scheme{}.Dial(ctx, transport.Addr{Scheme: transport.SchemeVsock, CID: unix.VMADDR_CID_LOCAL, Port: port}, nil)
	if err != nil {
		t.Skipf("no vsock loopback here (%v): `modprobe vsock_loopback` to run this test", err)
	}
	defer c.Close()
	s, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := c.Write([]byte("QEVM")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	n, _ := s.Read(buf)
	if string(buf[:n]) != "QEVM" || !c.ReturnPath() {
		t.Fatalf("read %q", buf[:n])
	}
	_ = s.SetDeadline(time.Now().Add(10 * time.Millisecond))
	if _, err := s.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) && err == nil {
		t.Fatalf("read past the deadline: %v", err)
	}
}
