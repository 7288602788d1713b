package reliability

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/internal/fault"
	"github.com/migctl/migctl/qmp"
)

// link is how a cell's source reaches its destination: the URIs each side
// is given and the fault proxy between them.
type link struct {
	srcURI, dstURI string
	proxy          *fault.Proxy // nil for file
	// upstream is where the proxy connects (tcp: learnt once the
	// destination listens).
	upstream atomic.Pointer[string]
	closers  []func()
}

// pipeCommand runs this test binary as an exec: cell's pipe. A race-built
// binary sleeps 1 s at exit by default (GORACE atexit_sleep_ms), which a
// source counts against x-migctl-io-timeout as a command that does not
// exit: the pipe must exit when its copy ends.
func pipeCommand() string { return "GORACE=atexit_sleep_ms=0 " + self }

// proxyOptions: the proxy never cuts a link on its own during a cell.
var proxyOptions = fault.Options{IOTimeout: 10 * time.Minute, DialTimeout: 10 * time.Second}

// newLink prepares the transport of a cell between src and dst (dst nil
// for file). For fd it passes the socket pairs' ends to both processes.
func newLink(dir, transport string, src, dst *proc) (*link, error) {
	l := &link{}
	var err error
	switch transport {
	case "tcp":
		l.dstURI = "tcp:127.0.0.1:0"
		l.proxy, err = fault.Listen("tcp", "127.0.0.1:0", func(ctx context.Context) (net.Conn, error) {
			up := l.upstream.Load()
			if up == nil {
				return nil, errors.New("the destination's port is not known: it never listened")
			}
			var d net.Dialer
			return d.DialContext(ctx, "tcp", *up)
		}, proxyOptions)
		if err == nil {
			l.srcURI = "tcp:" + l.proxy.Addr().String()
		}
	case "unix":
		dstSock := filepath.Join(dir, "dst.mig")
		l.dstURI = "unix:" + dstSock
		l.proxy, err = fault.Listen("unix", filepath.Join(dir, "proxy.sock"), fault.DialAddr("unix", dstSock), proxyOptions)
		if err == nil {
			l.srcURI = "unix:" + l.proxy.Addr().String()
		}
	case "fd":
		var srcEnd, dstEnd net.Conn
		if srcEnd, err = passPair(src, "mig"); err != nil {
			return nil, err
		}
		if dstEnd, err = passPair(dst, "mig"); err != nil {
			srcEnd.Close()
			return nil, err
		}
		l.proxy = fault.New(proxyOptions)
		l.proxy.Link(srcEnd, dstEnd)
		l.srcURI, l.dstURI = "fd:mig", "fd:mig"
	case "exec":
		var ln *net.UnixListener
		ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "x.sock"), Net: "unix"})
		if err != nil {
			return nil, err
		}
		l.closers = append(l.closers, func() { ln.Close() })
		l.dstURI = "exec:" + pipeCommand() + " pipe-recv " + ln.Addr().String()
		l.proxy, err = fault.Listen("unix", filepath.Join(dir, "proxy.sock"), func(ctx context.Context) (net.Conn, error) {
			dl, _ := ctx.Deadline()
			_ = ln.SetDeadline(dl)
			return ln.Accept()
		}, proxyOptions)
		if err == nil {
			l.srcURI = "exec:" + pipeCommand() + " pipe-send " + l.proxy.Addr().String()
		}
	case "file":
		l.srcURI = "file:" + filepath.Join(dir, "save.mig")
		l.dstURI = l.srcURI
	default:
		return nil, fmt.Errorf("no link for transport %s", transport)
	}
	if err != nil {
		l.close()
		return nil, err
	}
	return l, nil
}

// passPair makes a socket pair, gives one end to p as fd:name (getfd over
// its QMP unix socket) and returns the other.
func passPair(p *proc, name string) (net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	theirs := os.NewFile(uintptr(fds[0]), "migration (theirs)")
	ours := os.NewFile(uintptr(fds[1]), "migration (ours)")
	defer theirs.Close() // the server keeps its own copy
	defer ours.Close()   // FileConn dups it
	ctx, cancel := context.WithTimeout(context.Background(), cmdBound)
	defer cancel()
	if err := p.ctl.GetFD(ctx, name, theirs); err != nil {
		return nil, fmt.Errorf("getfd on the %s: %w", p.role, err)
	}
	return net.FileConn(ours)
}

// learnPort sets a tcp link's upstream to the port dst listens on.
func (l *link) learnPort(dst *proc) error {
	if l.proxy == nil || l.dstURI != "tcp:127.0.0.1:0" {
		return nil
	}
	var info qmp.MigrationInfo
	if err := dst.query("query-migrate", nil, &info); err != nil {
		return err
	}
	if len(info.SocketAddress) != 1 {
		return fmt.Errorf("the destination listens on %+v", info.SocketAddress)
	}
	up := net.JoinHostPort(info.SocketAddress[0].Host, info.SocketAddress[0].Port)
	l.upstream.Store(&up)
	return nil
}

func (l *link) close() {
	if l.proxy != nil {
		l.proxy.Close()
	}
	for _, c := range l.closers {
		c()
	}
}
