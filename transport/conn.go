package transport

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is one open migration channel.
//
// Read and Write may run concurrently with each other (one goroutine sending
// the stream while another reads the return path), and Close may be called
// from any goroutine to unblock both. Otherwise a Conn is used by one
// goroutine at a time, like a net.Conn.
//
// The Conns returned by this package also implement io.ReaderFrom and
// io.WriterTo (so io.Copy keeps the kernel's zero-copy paths) and
//
//	Unwrap() any
//
// which returns the underlying *net.TCPConn, *net.UnixConn or *os.File. For an
// exec: channel that is the pipe to or from the command; reading or writing
// it directly bypasses the command's exit status check. For a file:PATH
// channel it is the temporary file the save is written to (see Committer).
//
// Close releases everything and never waits for a peer. On the outgoing
// side of a one-way transport (file:, exec:, fd: on a pipe or file) it
// aborts the stream unless Commit (see Committer) succeeded first: a file:
// save's temporary file is removed and PATH left untouched, an exec:
// command's process group is killed at once.
type Conn interface {
	io.Reader
	io.Writer
	io.Closer

	// CloseWrite shuts down the sending side: the peer reads EOF, and the
	// return path (if any) stays open. For exec: on the outgoing side it
	// closes the command's stdin. Where half-closing means nothing (file:,
	// the incoming side of exec:, pipe and file descriptors) it does nothing
	// and returns nil.
	CloseWrite() error

	// SetDeadline sets the read and write deadline as net.Conn does; a zero
	// time clears it. Sockets and pipes (tcp:, unix:, exec:, socket and pipe
	// fds) support it. A regular file never waits for a peer, so for file:
	// and regular-file fds it does nothing and returns nil. Other descriptors
	// that cannot be polled (a terminal, say) return an error wrapping
	// os.ErrNoDeadline.
	SetDeadline(t time.Time) error

	// ReturnPath reports whether the channel carries bytes both ways, so the
	// destination can answer the source: true for tcp:, unix: and socket
	// fds; false for file:, exec:, and pipe or file fds.
	ReturnPath() bool

	// Addr returns the migration address the channel was opened on: the
	// dialled address for Dial, the listener's bound address for Accept. The
	// peer's socket address, where there is one, is on Unwrap().(net.Conn).
	Addr() Addr
}

// rawIO is implemented by this package's Conns. rawReader and rawWriter
// return the object to copy from or to directly, or false when the Conn adds
// behaviour a direct copy would skip (an exec: channel's exit status).
type rawIO interface {
	rawReader() (io.Reader, bool)
	rawWriter() (io.Writer, bool)
}

// readerOnly and writerOnly hide every method but Read or Write, so that a
// fallback io.Copy cannot call back into our ReadFrom or WriteTo.
type readerOnly struct{ io.Reader }
type writerOnly struct{ io.Writer }

// unwrapReader returns the object io.Copy should read from: the raw object
// behind one of our Conns, or r itself. fix, if not nil, must be called after
// the copy (it carries a LimitedReader's remaining count back).
func unwrapReader(r io.Reader) (src io.Reader, fix func()) {
	if lr, ok := r.(*io.LimitedReader); ok {
		if inner, ok := lr.R.(rawIO); ok {
			if raw, ok := inner.rawReader(); ok {
				nl := &io.LimitedReader{R: raw, N: lr.N}
				return nl, func() { lr.N = nl.N }
			}
		}
		return r, nil
	}
	if c, ok := r.(rawIO); ok {
		if raw, ok := c.rawReader(); ok {
			return raw, nil
		}
		return readerOnly{r}, nil
	}
	return r, nil
}

// unwrapWriter is unwrapReader's counterpart for the destination.
func unwrapWriter(w io.Writer) io.Writer {
	if c, ok := w.(rawIO); ok {
		if raw, ok := c.rawWriter(); ok {
			return raw
		}
		return writerOnly{w}
	}
	return w
}

// copyRaw copies src to dst with io.Copy on the underlying objects, so the
// standard library's splice, sendfile and copy_file_range paths apply when
// both ends allow them.
func copyRaw(dst io.Writer, src io.Reader) (int64, error) {
	s, fix := unwrapReader(src)
	n, err := io.Copy(unwrapWriter(dst), s)
	if fix != nil {
		fix()
	}
	return n, err
}

// sockConn is a tcp: or unix: channel, or a socket fd the standard library
// understands. c is a *net.TCPConn or a *net.UnixConn.
type sockConn struct {
	c    net.Conn
	addr Addr
}

func (s *sockConn) Read(b []byte) (int, error)          { return s.c.Read(b) }
func (s *sockConn) Write(b []byte) (int, error)         { return s.c.Write(b) }
func (s *sockConn) Close() error                        { return s.c.Close() }
func (s *sockConn) SetDeadline(t time.Time) error       { return s.c.SetDeadline(t) }
func (s *sockConn) ReturnPath() bool                    { return true }
func (s *sockConn) Addr() Addr                          { return s.addr }
func (s *sockConn) Unwrap() any                         { return s.c }
func (s *sockConn) rawReader() (io.Reader, bool)        { return s.c, true }
func (s *sockConn) rawWriter() (io.Writer, bool)        { return s.c, true }
func (s *sockConn) ReadFrom(r io.Reader) (int64, error) { return copyRaw(s.c, r) }
func (s *sockConn) WriteTo(w io.Writer) (int64, error)  { return copyRaw(w, s.c) }

// CloseWrite half-closes the socket (shutdown(SHUT_WR)).
func (s *sockConn) CloseWrite() error {
	if cw, ok := s.c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// fileConn is a channel over an *os.File: file:, a pipe or file descriptor,
// or a socket descriptor of a family the standard library does not wrap.
type fileConn struct {
	f        *os.File
	addr     Addr
	canRead  bool
	canWrite bool
	socket   bool // a socket: CloseWrite shuts it down, it has a return path
	regular  bool // a regular file: deadlines are meaningless

	committed atomic.Bool // Commit closed f successfully: Close does nothing
}

func (c *fileConn) Read(b []byte) (int, error) {
	if !c.canRead {
		return 0, fmt.Errorf("read %s: the channel is write-only", c.addr)
	}
	return c.f.Read(b)
}

func (c *fileConn) Write(b []byte) (int, error) {
	if !c.canWrite {
		return 0, fmt.Errorf("write %s: the channel is read-only", c.addr)
	}
	return c.f.Write(b)
}

func (c *fileConn) ReadFrom(r io.Reader) (int64, error) {
	if !c.canWrite {
		return 0, fmt.Errorf("write %s: the channel is read-only", c.addr)
	}
	return copyRaw(c.f, r)
}

func (c *fileConn) WriteTo(w io.Writer) (int64, error) {
	if !c.canRead {
		return 0, fmt.Errorf("read %s: the channel is write-only", c.addr)
	}
	return copyRaw(w, c.f)
}

func (c *fileConn) rawReader() (io.Reader, bool) { return c.f, c.canRead }
func (c *fileConn) rawWriter() (io.Writer, bool) { return c.f, c.canWrite }
func (c *fileConn) ReturnPath() bool             { return c.socket }
func (c *fileConn) Addr() Addr                   { return c.addr }
func (c *fileConn) Unwrap() any                  { return c.f }

// Close closes the channel. A stream written in place is left as far as it
// got; after a successful Commit, Close does nothing.
func (c *fileConn) Close() error {
	if c.committed.Load() {
		return nil
	}
	return c.f.Close()
}

func (c *fileConn) CloseWrite() error {
	if !c.socket {
		return nil
	}
	rc, err := c.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_WR) }); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("shutdown %s: %w", c.addr, serr)
	}
	return nil
}

func (c *fileConn) SetDeadline(t time.Time) error {
	if c.regular {
		return nil
	}
	if err := c.f.SetDeadline(t); err != nil {
		if errors.Is(err, os.ErrNoDeadline) {
			return fmt.Errorf("%s: descriptor cannot be polled: %w", c.addr, err)
		}
		return err
	}
	return nil
}
