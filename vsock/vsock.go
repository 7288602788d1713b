// Package vsock opens vsock:CID:PORT migration addresses (AF_VSOCK, the
// host–guest socket family of virtual machines), which the standard
// library's net package does not wrap. It registers the scheme with
// package transport when linked in (import it for its side effect, as
// migctl's command does), as package rdma registers rdma:.
//
// A vsock channel is a stream socket like tcp:'s: one connection, a return
// path on it, deadlines through the runtime's poller. migctl's
// multi-channel features (multifd) are judged by the spec's transport
// properties for vsock.
package vsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/transport"
)

func init() { transport.Register(transport.SchemeVsock, scheme{}) }

type scheme struct{}

// Dial connects to a's CID and port. ctx bounds the connection attempt.
func (scheme) Dial(ctx context.Context, a transport.Addr, _ *transport.Config) (transport.Conn, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w (is the vsock module loaded?)", err)
	}
	f := os.NewFile(uintptr(fd), a.String())
	if err := connect(ctx, f, &unix.SockaddrVM{CID: a.CID, Port: uint32(a.Port)}); err != nil {
		f.Close()
		return nil, err
	}
	return transport.NewSocketConn(f, a), nil
}

// connect starts a non-blocking connect and waits, through the poller,
// until it completes or ctx ends.
func connect(ctx context.Context, f *os.File, sa unix.Sockaddr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	if err := rc.Control(func(fd uintptr) { cerr = unix.Connect(int(fd), sa) }); err != nil {
		return err
	}
	if cerr == nil {
		return nil
	}
	if !errors.Is(cerr, unix.EINPROGRESS) {
		return fmt.Errorf("vsock connect: %w", cerr)
	}
	if d, ok := ctx.Deadline(); ok {
		_ = f.SetWriteDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	var soErr int
	werr := rc.Write(func(fd uintptr) bool {
		soErr, cerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if cerr != nil || soErr != 0 {
			return true // the connect failed
		}
		// A vsock socket may poll writable while it still connects:
		// done only once it has a peer.
		_, perr := unix.Getpeername(int(fd))
		return perr == nil
	})
	_ = f.SetWriteDeadline(time.Time{})
	switch {
	case werr != nil && ctx.Err() != nil:
		return fmt.Errorf("vsock connect: %w", context.Cause(ctx))
	case werr != nil && errors.Is(werr, os.ErrDeadlineExceeded):
		// The context's deadline, seen by the poller a moment before
		// the context itself.
		return fmt.Errorf("vsock connect: %w", context.DeadlineExceeded)
	case werr != nil:
		return fmt.Errorf("vsock connect: %w", werr)
	case cerr != nil:
		return fmt.Errorf("vsock connect: %w", cerr)
	case soErr != 0:
		return fmt.Errorf("vsock connect: %w", syscall.Errno(soErr))
	}
	return nil
}

// Listen binds a's port on a's CID (the host's own, or any: QEMU's
// vsock:CID:PORT with the listener's CID) and listens.
func (scheme) Listen(_ context.Context, a transport.Addr, _ *transport.Config) (transport.Listener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w (is the vsock module loaded?)", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: a.CID, Port: uint32(a.Port)}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock bind %s: %w", a, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock listen %s: %w", a, err)
	}
	bound := a
	if sa, err := unix.Getsockname(fd); err == nil {
		if vm, ok := sa.(*unix.SockaddrVM); ok {
			bound.CID, bound.Port = vm.CID, int(vm.Port)
		}
	}
	return &listener{f: os.NewFile(uintptr(fd), bound.String()), addr: bound}, nil
}

// listener accepts vsock connections through the runtime's poller.
type listener struct {
	f      *os.File
	addr   transport.Addr
	closed atomic.Bool
}

func (l *listener) Addr() transport.Addr { return l.addr }

func (l *listener) Close() error {
	l.closed.Store(true)
	return l.f.Close()
}

// Accept waits for the next connection; ctx ends the wait at once.
func (l *listener) Accept(ctx context.Context) (transport.Conn, error) {
	rc, err := l.f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("accept on %s: %w", l.addr, net.ErrClosed)
	}
	stop := context.AfterFunc(ctx, func() { _ = l.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var nfd int
	var aerr error
	rerr := rc.Read(func(fd uintptr) bool {
		nfd, _, aerr = unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		return !errors.Is(aerr, unix.EAGAIN)
	})
	if ctx.Err() != nil {
		_ = l.f.SetReadDeadline(time.Time{})
		if rerr == nil && aerr == nil {
			unix.Close(nfd)
		}
		return nil, ctx.Err()
	}
	switch {
	case rerr != nil && (l.closed.Load() || errors.Is(rerr, os.ErrClosed)):
		return nil, fmt.Errorf("accept on %s: %w", l.addr, net.ErrClosed)
	case rerr != nil:
		return nil, fmt.Errorf("accept on %s: %w", l.addr, rerr)
	case aerr != nil:
		return nil, fmt.Errorf("accept on %s: %w", l.addr, aerr)
	}
	return transport.NewSocketConn(os.NewFile(uintptr(nfd), l.addr.String()), l.addr), nil
}
