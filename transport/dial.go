package transport

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Config holds the settings of Dial and Listen. The zero Config is ready to
// use and is what the package-level Dial and Listen use. A Config is not
// modified by its methods and may be shared by goroutines.
type Config struct {
	// RAM lists the guest RAM a destination's transport may write into
	// directly (RDMA registers it); transports that carry a byte stream
	// ignore it.
	RAM []RAMBlock

	// ResolveFD maps the name in an fd:NAME address (a descriptor a client
	// registered with QMP's getfd) to a descriptor number. The channel works
	// on a duplicate, so the descriptor returned stays the resolver's: its
	// owner (the getfd table) closes it when it likes; QEMU drops a named
	// descriptor from its table once a migration has taken it. Without a
	// resolver, fd:NAME fails.
	ResolveFD func(name string) (int, error)

	// Descriptors, when set, resolves every fd: address, named or
	// numbered, from the caller's table (see Descriptors); ResolveFD is
	// then not used and no descriptor is taken by number from the
	// process.
	Descriptors Descriptors

	// SocketBuffer sets SO_SNDBUF and SO_RCVBUF on tcp: and unix: sockets,
	// in bytes; the kernel caps it (net.core.wmem_max/rmem_max, 4 MiB on
	// the machines measured). Zero picks what measured best on loopback
	// (BenchmarkCopy): 4 MiB for unix:, whose sockets the kernel never
	// autotunes (about 15% faster than the 208 KiB default), and nothing
	// for tcp:, because a fixed size switches TCP's autotuning off (about
	// 30% slower). A negative value leaves the kernel's defaults everywhere.
	// Set a size for tcp: when a long fat network needs more than
	// autotuning reaches (net.ipv4.tcp_wmem's maximum).
	SocketBuffer int
}

// defaultUnixBuffer is SocketBuffer's zero value for unix: sockets.
const defaultUnixBuffer = 4 << 20

// socketBuffer returns the SO_SNDBUF/SO_RCVBUF size for a socket of the given
// network ("tcp", "tcp4", "tcp6", "unix"), or 0 to leave the kernel's.
func (c *Config) socketBuffer(network string) int {
	switch {
	case c.SocketBuffer > 0:
		return c.SocketBuffer
	case c.SocketBuffer == 0 && network == "unix":
		return defaultUnixBuffer
	}
	return 0
}

// control sets socket buffer sizes on a socket before it connects or listens,
// which is when TCP fixes its window scale. Accepted TCP sockets inherit the
// listener's sizes; accepted unix sockets do not (see netListener.Accept).
func (c *Config) control(network, _ string, rc syscall.RawConn) error {
	n := c.socketBuffer(network)
	if n <= 0 {
		return nil
	}
	return rc.Control(func(fd uintptr) { setBuffers(int(fd), n) })
}

// setBuffers sets SO_SNDBUF and SO_RCVBUF. The kernel clamps oversized values
// instead of failing, so an error would mean a socket without these options;
// buffer sizes are a tuning, not worth failing a migration for.
func setBuffers(fd, n int) {
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, n)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, n)
}

// hostPort is the address Go's net package dials or listens on for a tcp:
// Addr. QEMU's documentation writes the wildcard as "0" (tcp:0:4446), which
// getaddrinfo reads as 0.0.0.0 and Go's resolver does not.
func hostPort(a Addr) string {
	h := a.Host
	if h == "0" {
		h = "0.0.0.0"
	}
	return net.JoinHostPort(h, strconv.Itoa(a.Port))
}

// Dial opens the outgoing channel to a with the zero Config. See
// Config.Dial.
func Dial(ctx context.Context, a Addr) (Conn, error) {
	var c Config
	return c.Dial(ctx, a)
}

// Dial opens the outgoing (source side) channel to a:
//
//	tcp:, unix:  connect; ctx bounds the connection attempt only, as for
//	             net.Dialer, and a Conn once returned is unaffected by ctx
//	fd:          take over the descriptor: a connected socket, a pipe, or a
//	             file open for writing (a listening socket is refused)
//	file:        without an offset, write to a new temporary file in the
//	             directory of PATH (mode 0600, or the permissions of the
//	             file PATH names), which Commit renames over PATH and Close
//	             removes: PATH is untouched until the save is complete and
//	             durable. PATH naming a device (/dev/null) is written in
//	             place. With an offset, write in place: keep the bytes
//	             before the offset, drop those after it and write from the
//	             offset (not atomic). See Committer
//	exec:        start the command in its own process group; the Conn
//	             writes to its stdin. Commit waits for it to exit 0; Close
//	             kills the group at once
//	rdma:, vsock: an error wrapping ErrUnsupported
//
// For schemes other than tcp: and unix:, ctx is checked once before opening.
// A numbered fd:N passes to the Conn on success (the Conn works on a
// duplicate and N is closed); on error N stays open and the caller's.
//
// Errors are *OpError values naming the address, except for a failing exec:
// command, whose failure shows up as a *CommandError from Write, Commit or
// Close.
func (c *Config) Dial(ctx context.Context, a Addr) (Conn, error) {
	conn, err := c.dial(ctx, a)
	if err != nil {
		return nil, &OpError{Op: "dial", Addr: a, Err: err}
	}
	return conn, nil
}

func (c *Config) dial(ctx context.Context, a Addr) (Conn, error) {
	if err := a.validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	switch a.Scheme {
	case SchemeTCP, SchemeUnix:
		d := net.Dialer{Control: c.control}
		network, address := "tcp", hostPort(a)
		if a.Scheme == SchemeUnix {
			network, address = "unix", a.Path
		}
		nc, err := d.DialContext(ctx, network, address)
		if err != nil {
			return nil, err
		}
		return &sockConn{c: nc, addr: a}, nil
	case SchemeFD:
		conn, _, err := c.openFDAddr(a, true)
		return conn, err
	case SchemeFile:
		return dialFile(a)
	case SchemeExec:
		return dialExec(a)
	case SchemeRDMA, SchemeVsock:
		if sc := registered(a.Scheme); sc != nil {
			return sc.Dial(ctx, a, c)
		}
		return nil, unsupported(a.Scheme)
	}
	return nil, fmt.Errorf("unknown migration protocol: %s", a.Scheme)
}

// unsupported explains why scheme cannot be opened yet.
func unsupported(scheme string) error {
	if scheme == SchemeRDMA {
		return fmt.Errorf("%w: the rdma: transport is not implemented yet (it belongs to the rdma package); use tcp: meanwhile", ErrUnsupported)
	}
	return fmt.Errorf("%w: the vsock: transport is not implemented yet (Go's net package has no AF_VSOCK); pass a connected vsock descriptor as fd:N instead", ErrUnsupported)
}

// refuseFIFO fails for a FIFO, which would block open until a peer appears
// and cannot be seeked: a named pipe belongs to exec: or fd:.
func refuseFIFO(path string) error {
	fi, err := os.Stat(path)
	if err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		return nil // a missing file is created (or reported by open)
	}
	return fmt.Errorf("%s is a named pipe; file: needs a file it can open without waiting and seek in (use exec:cat > %s or fd: for pipes)", path, path)
}

// dialFile opens a.Path for the outgoing stream: through a temporary file
// (see createSave) without an offset, in place otherwise.
func dialFile(a Addr) (Conn, error) {
	if err := refuseFIFO(a.Path); err != nil {
		return nil, err
	}
	if a.Offset == 0 {
		target, old, atomic, err := saveTarget(a.Path)
		if err != nil {
			return nil, err
		}
		if atomic {
			return createSave(a, target, old)
		}
	}
	flags := os.O_WRONLY | os.O_CREATE
	if a.Offset == 0 {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(a.Path, flags, 0o600)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	regular := fi.Mode().IsRegular()
	if a.Offset > 0 {
		if regular {
			// Keep what precedes the offset (a header someone wrote
			// there), drop a stale tail from an earlier, longer stream.
			if err := f.Truncate(a.Offset); err != nil {
				f.Close()
				return nil, err
			}
		}
		if _, err := f.Seek(a.Offset, io.SeekStart); err != nil {
			f.Close()
			return nil, err
		}
	}
	return &fileConn{f: f, addr: a, canWrite: true, regular: regular}, nil
}

// openFileForRead opens a.Path for the incoming stream, positioned at the
// offset.
func openFileForRead(a Addr) (*fileConn, error) {
	if err := refuseFIFO(a.Path); err != nil {
		return nil, err
	}
	f, err := os.Open(a.Path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	regular := fi.Mode().IsRegular()
	if a.Offset > 0 {
		if regular && a.Offset > fi.Size() {
			f.Close()
			return nil, fmt.Errorf("offset %d is beyond the end of the file (%d bytes)", a.Offset, fi.Size())
		}
		if _, err := f.Seek(a.Offset, io.SeekStart); err != nil {
			f.Close()
			return nil, err
		}
	}
	return &fileConn{f: f, addr: a, canRead: true, regular: regular}, nil
}
