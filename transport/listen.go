package transport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Listener waits for the incoming side's channels.
//
// Accept may be called from several goroutines; calls are served one at a
// time. Close may be called from any goroutine, and makes blocked and later
// Accepts fail with an error wrapping net.ErrClosed.
type Listener interface {
	// Accept waits for and returns the next channel. It returns ctx.Err()
	// as soon as ctx is done, and an error wrapping net.ErrClosed once the
	// listener is closed. Transports with one channel (fd:, exec:) hand it
	// out once and then fail with an error wrapping ErrSingleChannel; file:
	// opens the file afresh for every Accept.
	Accept(ctx context.Context) (Conn, error)

	// Addr returns the address actually listened on: for tcp: with port 0,
	// the port the kernel chose; for a host name, the bound IP.
	Addr() Addr

	// Close stops listening and releases the socket, or the unaccepted
	// channel (killing an exec: command that was never accepted). For unix:
	// it removes the socket file, unless it was replaced by another file
	// meanwhile. Channels already accepted stay open.
	Close() error
}

// Listen starts the incoming side on a with the zero Config. See
// Config.Listen.
func Listen(ctx context.Context, a Addr) (Listener, error) {
	var c Config
	return c.Listen(ctx, a)
}

// Listen starts the incoming (destination side) end of a:
//
//	tcp:, unix:  listen (ctx bounds the setup only); for unix:, a socket file
//	             left by a dead process is removed first, a live one or any
//	             other kind of file is an error
//	fd:          a connected socket, pipe or file open for reading is the
//	             one channel; a listening socket is accepted on
//	file:        open the file for reading at the offset
//	exec:        start the command; its stdout is the one channel
//	rdma:, vsock: an error wrapping ErrUnsupported
//
// For schemes other than tcp: and unix:, ctx is checked once before opening.
// Descriptors are handled as by Config.Dial.
//
// Errors are *OpError values naming the address.
func (c *Config) Listen(ctx context.Context, a Addr) (Listener, error) {
	l, err := c.listen(ctx, a)
	if err != nil {
		return nil, &OpError{Op: "listen", Addr: a, Err: err}
	}
	return l, nil
}

func (c *Config) listen(ctx context.Context, a Addr) (Listener, error) {
	if err := a.validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	switch a.Scheme {
	case SchemeTCP:
		lc := net.ListenConfig{Control: c.control}
		ln, err := lc.Listen(ctx, "tcp", hostPort(a))
		if err != nil {
			return nil, err
		}
		ta := ln.Addr().(*net.TCPAddr)
		bound := Addr{Scheme: SchemeTCP, Host: ta.IP.String(), Port: ta.Port}
		if ta.Zone != "" {
			bound.Host += "%" + ta.Zone
		}
		return newNetListener(ln, bound, nil), nil
	case SchemeUnix:
		return c.listenUnix(ctx, a)
	case SchemeFD:
		conn, ln, err := c.openFDAddr(a, false)
		if err != nil {
			return nil, err
		}
		if ln != nil {
			return newNetListener(ln, a, nil), nil
		}
		return newSingleListener(a, conn, func() { conn.Close() }), nil
	case SchemeFile:
		f, err := openFileForRead(a)
		if err != nil {
			return nil, err
		}
		return &fileListener{addr: a, first: f}, nil
	case SchemeExec:
		ec, err := listenExec(a)
		if err != nil {
			return nil, err
		}
		return newSingleListener(a, ec, ec.abort), nil
	case SchemeRDMA, SchemeVsock:
		if sc := registered(a.Scheme); sc != nil {
			return sc.Listen(ctx, a, c)
		}
		return nil, unsupported(a.Scheme)
	}
	return nil, fmt.Errorf("unknown migration protocol: %s", a.Scheme)
}

// listenUnix listens on a.Path, replacing a stale socket file.
func (c *Config) listenUnix(ctx context.Context, a Addr) (Listener, error) {
	lc := net.ListenConfig{Control: c.control}
	ln, err := lc.Listen(ctx, "unix", a.Path)
	if err != nil && errors.Is(err, syscall.EADDRINUSE) {
		if rerr := removeStaleSocket(ctx, a.Path); rerr != nil {
			return nil, rerr
		}
		ln, err = lc.Listen(ctx, "unix", a.Path)
	}
	if err != nil {
		return nil, err
	}
	ul := ln.(*net.UnixListener)
	// We unlink ourselves, and only the file we created (see unixFile).
	ul.SetUnlinkOnClose(false)
	var st unix.Stat_t
	if err := unix.Lstat(a.Path, &st); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket file vanished right after bind: %w", err)
	}
	own := &unixFile{path: a.Path, dev: st.Dev, ino: st.Ino}
	nl := newNetListener(ln, a, own)
	nl.acceptBuf = c.socketBuffer("unix")
	return nl, nil
}

// removeStaleSocket removes the socket file at path if nothing listens on it.
//
// It first looks for a listener bound to path in /proc/net/unix, which has no
// side effect. Only if none is listed there (the listener may live in another
// network namespace) does it try to connect: a refused connection means
// stale. That probe reaches a live listener in another namespace as an empty
// connection; it is the price of not deleting a live socket.
func removeStaleSocket(ctx context.Context, path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil // gone meanwhile: just retry the bind
		}
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket: remove it or choose another path: %w", path, syscall.EADDRINUSE)
	}
	live := fmt.Errorf("another process is listening on %s: %w", path, syscall.EADDRINUSE)
	if listed, err := unixListenerListed(path); err == nil && listed {
		return live
	}
	d := net.Dialer{Timeout: time.Second}
	probe, err := d.DialContext(ctx, "unix", path)
	if err == nil {
		probe.Close()
		return live
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("cannot tell whether socket %s is stale (%v): %w", path, err, syscall.EADDRINUSE)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// procUnixLine splits a /proc/net/unix line into its seven leading columns
// and the path; ok is false for a socket without a path.
func procUnixLine(line string) (cols [7]string, path string, ok bool) {
	rest := line
	for i := range cols {
		rest = strings.TrimLeft(rest, " ")
		end := strings.IndexByte(rest, ' ')
		if end < 0 {
			return cols, "", false
		}
		cols[i], rest = rest[:end], rest[end+1:]
	}
	if rest == "" {
		return cols, "", false
	}
	return cols, rest, true
}

// soAcceptCon is the kernel's __SO_ACCEPTCON flag in /proc/net/unix: the
// socket listens.
const soAcceptCon = 0x10000

// procNetUnix is read by unixListenerListed; a variable for tests.
var procNetUnix = "/proc/net/unix"

// unixListenerListed reports whether /proc/net/unix lists a listening stream
// socket bound to path (compared both as given and made absolute, since a
// socket is listed under the name it was bound with).
func unixListenerListed(path string) (bool, error) {
	f, err := os.Open(procNetUnix)
	if err != nil {
		return false, err
	}
	defer f.Close()
	names := map[string]bool{path: true}
	if abs, err := filepath.Abs(path); err == nil {
		names[abs] = true
	}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 4096), 64<<10) // a line holds at most a 108-byte path
	sc.Scan()                             // header
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path; the columns are
		// space-padded, the path (which may hold spaces) runs to the end.
		fields, sockPath, ok := procUnixLine(sc.Text())
		if !ok {
			continue
		}
		flags, err1 := strconv.ParseUint(fields[3], 16, 32)
		typ, err2 := strconv.ParseUint(fields[4], 16, 16)
		if err1 != nil || err2 != nil || flags&soAcceptCon == 0 || typ != unix.SOCK_STREAM {
			continue
		}
		if names[sockPath] {
			return true, nil
		}
	}
	return false, sc.Err()
}

// unixFile identifies the socket file a unix: listener created.
type unixFile struct {
	path     string
	dev, ino uint64
}

// remove unlinks the socket file if it is still the one we created.
func (u *unixFile) remove() error {
	var st unix.Stat_t
	if err := unix.Lstat(u.path, &st); err != nil {
		return nil // already gone
	}
	if st.Dev != u.dev || st.Ino != u.ino {
		return nil // someone else's now
	}
	if err := os.Remove(u.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// deadliner is a net.Listener whose Accept can be interrupted by a deadline
// (*net.TCPListener, *net.UnixListener).
type deadliner interface {
	net.Listener
	SetDeadline(t time.Time) error
}

// netListener serves tcp:, unix: and listening-socket fd: addresses. sem
// admits one Accept at a time, because a cancelled Accept interrupts the
// socket's Accept with a deadline that would hit any other Accept too.
type netListener struct {
	ln        net.Listener
	addr      Addr
	own       *unixFile // unix: the socket file to remove on Close
	acceptBuf int       // unix: buffer size for accepted sockets, 0 to leave
	sem       chan struct{}
	closed    chan struct{}
	closeOnce sync.Once
	closeErr  error
}

func newNetListener(ln net.Listener, addr Addr, own *unixFile) *netListener {
	return &netListener{ln: ln, addr: addr, own: own, sem: make(chan struct{}, 1), closed: make(chan struct{})}
}

func (l *netListener) Addr() Addr { return l.addr }

// aLongTimeAgo is a deadline in the past, to wake a blocked Accept.
var aLongTimeAgo = time.Unix(1, 0)

func (l *netListener) Accept(ctx context.Context) (Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case l.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-l.closed:
		return nil, &OpError{Op: "accept", Addr: l.addr, Err: net.ErrClosed}
	}
	defer func() { <-l.sem }()

	var nc net.Conn
	var err error
	if dl, ok := l.ln.(deadliner); ok {
		woke := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			dl.SetDeadline(aLongTimeAgo)
			close(woke)
		})
		nc, err = l.ln.Accept()
		if !stop() {
			// The wake-up ran (or is running): wait for it, then clear
			// the deadline for the next Accept.
			<-woke
			dl.SetDeadline(time.Time{})
		}
	} else {
		nc, err = l.ln.Accept()
	}
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, ctxErr
		}
		return nil, &OpError{Op: "accept", Addr: l.addr, Err: err}
	}
	if l.acceptBuf > 0 {
		// An accepted unix socket starts with the kernel's defaults, not
		// the listener's sizes.
		if sc, ok := nc.(syscall.Conn); ok {
			if rc, err := sc.SyscallConn(); err == nil {
				rc.Control(func(fd uintptr) { setBuffers(int(fd), l.acceptBuf) })
			}
		}
	}
	return &sockConn{c: nc, addr: l.addr}, nil
}

func (l *netListener) Close() error {
	l.closeOnce.Do(func() {
		close(l.closed)
		l.closeErr = l.ln.Close()
		if l.own != nil {
			l.closeErr = errors.Join(l.closeErr, l.own.remove())
		}
	})
	return l.closeErr
}

// singleListener hands out its one channel (fd:, exec:) at the first Accept.
// mu guards conn and state.
type singleListener struct {
	addr  Addr
	mu    sync.Mutex
	conn  Conn   // nil once handed out or closed
	state string // "", "accepted", "closed"
	drop  func() // releases conn if it was never handed out
}

func newSingleListener(a Addr, c Conn, drop func()) *singleListener {
	return &singleListener{addr: a, conn: c, drop: drop}
}

func (l *singleListener) Addr() Addr { return l.addr }

func (l *singleListener) Accept(ctx context.Context) (Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch l.state {
	case "closed":
		return nil, &OpError{Op: "accept", Addr: l.addr, Err: net.ErrClosed}
	case "accepted":
		return nil, &OpError{Op: "accept", Addr: l.addr, Err: ErrSingleChannel}
	}
	c := l.conn
	l.conn, l.state = nil, "accepted"
	return c, nil
}

func (l *singleListener) Close() error {
	l.mu.Lock()
	c, drop := l.conn, l.drop
	wasOpen := l.state == ""
	l.conn, l.state = nil, "closed"
	l.mu.Unlock()
	if wasOpen && c != nil {
		drop()
	}
	return nil
}

// fileListener serves file: addresses. The file opened by Listen goes to the
// first Accept; later Accepts open it again (mapped-ram's extra channels read
// the same file). mu guards first and closed.
type fileListener struct {
	addr   Addr
	mu     sync.Mutex
	first  *fileConn
	closed bool
}

func (l *fileListener) Addr() Addr { return l.addr }

func (l *fileListener) Accept(ctx context.Context) (Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, &OpError{Op: "accept", Addr: l.addr, Err: net.ErrClosed}
	}
	if c := l.first; c != nil {
		l.first = nil
		return c, nil
	}
	c, err := openFileForRead(l.addr)
	if err != nil {
		return nil, &OpError{Op: "accept", Addr: l.addr, Err: err}
	}
	return c, nil
}

func (l *fileListener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	if l.first != nil {
		err := l.first.Close()
		l.first = nil
		return err
	}
	return nil
}
