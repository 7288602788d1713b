package transport

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// fdKind is what an fd: descriptor refers to.
type fdKind int

const (
	fdSocket    fdKind = iota // a connected stream socket
	fdListening               // a listening stream socket
	fdPipe                    // a pipe or FIFO
	fdRegular                 // a regular file
	fdOther                   // a character device or anything else
)

// fdInfo describes a descriptor before we take it over.
type fdInfo struct {
	kind     fdKind
	canRead  bool
	canWrite bool
	netKnown bool // a socket family net.FileConn wraps (inet, inet6, unix)
}

// inspectFD finds out what fd is without changing it.
func inspectFD(fd int) (fdInfo, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fdInfo{}, err
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return fdInfo{}, err
	}
	var fi fdInfo
	switch fl & unix.O_ACCMODE {
	case unix.O_RDONLY:
		fi.canRead = true
	case unix.O_WRONLY:
		fi.canWrite = true
	default:
		fi.canRead, fi.canWrite = true, true
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFSOCK:
		typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil {
			return fdInfo{}, err
		}
		if typ != unix.SOCK_STREAM {
			return fdInfo{}, errors.New("the socket is not a stream socket (SOCK_STREAM); a migration stream needs one")
		}
		acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err != nil {
			return fdInfo{}, err
		}
		fi.kind = fdSocket
		if acc != 0 {
			fi.kind = fdListening
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return fdInfo{}, err
		}
		switch sa.(type) {
		case *unix.SockaddrInet4, *unix.SockaddrInet6, *unix.SockaddrUnix:
			fi.netKnown = true
		}
		fi.canRead, fi.canWrite = true, true
	case unix.S_IFIFO:
		fi.kind = fdPipe
	case unix.S_IFREG:
		fi.kind = fdRegular
	default:
		fi.kind = fdOther
	}
	return fi, nil
}

// dupFile duplicates fd (close-on-exec) into an *os.File. Working on a
// duplicate means a failure never closes the caller's descriptor (an
// *os.File closes its descriptor when collected).
func dupFile(fd int, name string, nonblock bool) (*os.File, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if nonblock {
		// A pipe in non-blocking mode is registered with Go's poller, so
		// deadlines and Close interrupt a blocked Read or Write.
		if err := unix.SetNonblock(nfd, true); err != nil {
			unix.Close(nfd)
			return nil, err
		}
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// resolveFD returns the descriptor an fd: address names.
func (c *Config) resolveFD(a Addr) (int, error) {
	if a.FDName == "" {
		return a.FD, nil
	}
	if c.ResolveFD == nil {
		return -1, fmt.Errorf("descriptor name %q needs a resolver: set Config.ResolveFD", a.FDName)
	}
	fd, err := c.ResolveFD(a.FDName)
	if err != nil {
		return -1, fmt.Errorf("resolve descriptor name %q: %w", a.FDName, err)
	}
	return fd, nil
}

// openFD opens one channel (outgoing if write, else incoming) on a duplicate
// of descriptor fd. On success the original is closed if consume is set (a
// numbered fd:N passes to the transport; a named one stays its resolver's);
// on error fd is untouched.
func openFD(a Addr, fd int, write, consume bool) (Conn, net.Listener, error) {
	fi, err := inspectFD(fd)
	if err != nil {
		return nil, nil, err
	}
	name := a.String()
	switch {
	case fi.kind == fdListening && write:
		return nil, nil, errors.New("the descriptor is a listening socket; pass it to the incoming side (Listen)")
	case write && !fi.canWrite:
		return nil, nil, errors.New("the descriptor is open read-only; the outgoing side writes to it")
	case !write && !fi.canRead:
		return nil, nil, errors.New("the descriptor is open write-only; the incoming side reads from it")
	}
	var conn Conn
	var ln net.Listener
	switch {
	case fi.kind == fdListening && fi.netKnown:
		f, err := dupFile(fd, name, false)
		if err != nil {
			return nil, nil, err
		}
		ln, err = net.FileListener(f) // dups again
		f.Close()
		if err != nil {
			return nil, nil, err
		}
	case fi.kind == fdListening:
		return nil, nil, fmt.Errorf("%w: listening socket of a family other than inet, inet6 or unix", ErrUnsupported)
	case fi.kind == fdSocket && fi.netKnown:
		f, err := dupFile(fd, name, false)
		if err != nil {
			return nil, nil, err
		}
		nc, err := net.FileConn(f) // dups again
		f.Close()
		if err != nil {
			return nil, nil, err
		}
		conn = &sockConn{c: nc, addr: a}
	default:
		f, err := dupFile(fd, name, fi.kind == fdPipe || fi.kind == fdSocket)
		if err != nil {
			return nil, nil, err
		}
		conn = &fileConn{f: f, addr: a, canRead: fi.canRead, canWrite: fi.canWrite,
			socket: fi.kind == fdSocket, regular: fi.kind == fdRegular}
	}
	// Committed: the channel now works on its own duplicate.
	if consume {
		unix.Close(fd)
	}
	return conn, ln, nil
}

// NewSocketConn returns a Conn over f, a connected stream socket of a
// family the standard library's net package does not wrap (AF_VSOCK):
// reads and writes go through the runtime's poller when f is non-blocking
// (deadlines work), CloseWrite shuts the sending side down, and the
// channel has a return path. The Conn owns f. Scheme packages (vsock)
// build their channels with it.
func NewSocketConn(f *os.File, a Addr) Conn {
	return &fileConn{f: f, addr: a, canRead: true, canWrite: true, socket: true}
}
