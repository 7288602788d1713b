package qmp

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
)

// Options tune a Server. The zero value is usable.
type Options struct {
	// Package is the greeting's version.package (default "migctl").
	Package string
	// MaxRequest bounds one request in bytes (default DefaultMaxRequest).
	MaxRequest int
	// MaxClients bounds the clients connected at once (default
	// DefaultMaxClients); one more is told so and disconnected.
	MaxClients int
	// MaxPending bounds the clients connected but not yet through
	// capabilities negotiation (default DefaultMaxPending). When one more
	// connects, the one that has waited longest is told so and dropped:
	// idle connections can never hold every slot, so an operator who
	// negotiates at once always gets in.
	MaxPending int
	// NegotiationTimeout is how long a client may take from connecting to
	// a successful qmp_capabilities (default DefaultNegotiationTimeout); a
	// client that has not negotiated by then is told so and dropped.
	// QEMU has no such limit; it bounds what idle connections cost.
	NegotiationTimeout time.Duration
	// QueueLen is each client's outgoing message queue (default 256). A
	// client whose queue is full when an event arrives is dropped.
	QueueLen int
	// WriteTimeout bounds one write to a client (default 10 s); a client
	// that does not read for that long is dropped.
	WriteTimeout time.Duration
	// Logger receives connection and error lines (default: discard).
	Logger *slog.Logger
	// Objects is the process's object registry: object-add and object-del
	// change it, and the controller's tls-objects guard should see the same
	// one (machine.Options.Objects = GuardObjects(Objects)). Nil makes the
	// server use a registry of its own.
	Objects *creds.Objects
	// MigrationDir is where clients of an unauthenticated TCP control
	// socket may put unix: and file: migration addresses (Policy); check
	// it with CheckMigrationDir. "" allows them none.
	MigrationDir string
	// UUID is the guest's UUID in canonical form, for query-uuid; "" shows
	// the zero UUID, as QEMU without -uuid.
	UUID string
	// PrepareTime is how long the hosted guest's memory took to prepare
	// before the server started (guest prealloc, as QEMU's -mem-prealloc):
	// query-migrate shows it on a destination as x-migctl-prepare-ms.
	PrepareTime time.Duration
	// Digest returns the hosted guest's digest for x-migctl-query-digest
	// (migctl serve: the built-in guest's Checksum, which needs the guest
	// stopped); nil makes the command fail.
	Digest func() (uint64, error)
	// FDs is the server's descriptor table: getfd adds to it, and fd:
	// addresses are resolved from it (give the same table to the Host's
	// transport, as transport.Config.Descriptors). Nil makes the server
	// use a table of its own. Close closes what is left in it.
	FDs *FDTable
	// Holds, when set, are the test-only hold points (serve --x-hold):
	// the server announces each hold (X_MIGCTL_HOLD) and x-migctl-release
	// releases it. Give Holds.Enter to the controller as
	// machine.Options.OnEnter.
	Holds *Holds
}

// Defaults of the Options that bound what unauthenticated connections
// cost: how many may wait for capabilities negotiation, and for how long.
const (
	DefaultMaxClients         = 256
	DefaultMaxPending         = 16
	DefaultNegotiationTimeout = 30 * time.Second
)

// Server serves QMP for one controller and host. Create it with NewServer,
// add listeners with Listen (or hand it connections with ServeConn), and
// Close it when done.
type Server struct {
	c    *machine.Controller
	h    Host
	opts Options
	log  *slog.Logger
	ctx  context.Context // cancelled by Close; commands run with it
	stop context.CancelFunc
	sub  *machine.Subscription
	objs *creds.Objects // the object registry (object-add); safe for concurrent use
	pol  Policy         // what LocalUser clients may migrate to; read-only
	fds  *FDTable       // getfd's table; safe for concurrent use

	// mu guards the fields below; never held while calling the controller
	// or the host, nor while writing to a connection.
	mu        sync.Mutex
	listeners []*listener
	clients   map[*client]struct{}
	pending   []*client // connected, not negotiated, oldest first
	closed    bool

	quitOnce sync.Once
	quit     chan struct{} // closed by the quit command
	wg       sync.WaitGroup
}

// NewServer returns a server for c and h and starts turning the
// controller's events into QMP events. It does not listen yet.
func NewServer(c *machine.Controller, h Host, opts Options) *Server {
	if opts.Package == "" {
		opts.Package = "migctl"
	}
	if opts.MaxRequest <= 0 {
		opts.MaxRequest = DefaultMaxRequest
	}
	if opts.MaxClients <= 0 {
		opts.MaxClients = DefaultMaxClients
	}
	if opts.MaxPending <= 0 {
		opts.MaxPending = DefaultMaxPending
	}
	if opts.NegotiationTimeout <= 0 {
		opts.NegotiationTimeout = DefaultNegotiationTimeout
	}
	if opts.QueueLen <= 0 {
		opts.QueueLen = 256
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Objects == nil {
		opts.Objects = creds.NewObjects()
	}
	if opts.FDs == nil {
		opts.FDs = NewFDTable()
	}
	s := &Server{c: c, h: h, opts: opts, log: opts.Logger, clients: map[*client]struct{}{}, quit: make(chan struct{}),
		objs: opts.Objects, pol: Policy{MigrationDir: opts.MigrationDir}, fds: opts.FDs}
	s.ctx, s.stop = context.WithCancel(context.Background())
	// Read the starting point before subscribing: a change in between
	// then shows up as an event rather than being lost.
	last := map[string]string{}
	for _, side := range spec.SideNames {
		st, _ := c.Status(side, 0)
		last[side] = st.QMPStatus
	}
	eventsOn := c.Config().Caps["events"]
	s.sub = c.Subscribe(1024)
	s.wg.Add(1)
	go s.events(last, eventsOn)
	if opts.Holds != nil {
		opts.Holds.attach(func(ev HoldEvent) { s.broadcast(EventHold, ev, time.Now()) })
	}
	return s
}

// Done is closed when a client sent quit. The owner then calls Close.
func (s *Server) Done() <-chan struct{} { return s.quit }

// listener is one socket the server accepts on. Its fields are set
// before its accept goroutine starts and not changed after.
type listener struct {
	ln     net.Listener
	unix   *socketFile // nil for TCP
	tls    *tls.Config // TCP with client certificates; nil otherwise
	priv   Privilege   // what its clients may do (see Privilege)
	closed atomic.Bool
}

// Listen opens a listener and starts accepting on it, with the default
// ListenOptions. See ListenWith.
func (s *Server) Listen(addr string) (net.Addr, error) {
	return s.ListenWith(addr, ListenOptions{})
}

// ListenOptions tune one listener.
type ListenOptions struct {
	// TLS, for a tcp: address, makes clients authenticate with a TLS
	// client certificate: these credentials (endpoint=server, verify-peer
	// on) present the server's certificate and require a client
	// certificate signed by their ca-cert.pem. Such clients are Owners.
	TLS *creds.X509
	// Authz, with TLS, further limits clients to certificates whose
	// distinguished name it allows (authz-list, authz-simple).
	Authz creds.Authorizer
}

// ListenWith opens a listener and starts accepting on it. addr is
// unix:PATH or tcp:HOST:PORT; what a client may do is decided by the
// listener it came in on (Privilege):
//
//   - unix:PATH: the socket file is created with mode 0600, so only the
//     server's user (and root) can connect: Owner. It is refused in a
//     directory that other users can write to unless the directory has
//     the sticky bit (they could replace the socket), and in a directory
//     that belongs to another user. A stale socket file left by a dead
//     server is replaced; Close removes the file.
//   - tcp:HOST:PORT: HOST must be a loopback address. Without
//     ListenOptions.TLS every local user can connect: LocalUser, and a
//     warning saying so is logged. With it, clients must present a
//     certificate the credentials verify (and Authz allows): Owner. Port 0
//     picks a free port: see the returned address.
func (s *Server) ListenWith(addr string, lo ListenOptions) (net.Addr, error) {
	scheme, rest, ok := strings.Cut(addr, ":")
	if !ok {
		return nil, fmt.Errorf("QMP address %q: want unix:PATH or tcp:HOST:PORT", addr)
	}
	if lo.Authz != nil && lo.TLS == nil {
		return nil, fmt.Errorf("QMP address %q: an authorization list needs TLS credentials (ListenOptions.TLS) to check client certificates against", addr)
	}
	l := &listener{}
	switch scheme {
	case "unix":
		if lo.TLS != nil {
			return nil, fmt.Errorf("QMP address %q: TLS is for tcp: control sockets; a unix socket is already limited to its owner", addr)
		}
		if err := checkSocketDir(rest); err != nil {
			return nil, err
		}
		ln, f, err := listenUnix(rest)
		if err != nil {
			return nil, err
		}
		l.ln, l.unix, l.priv = ln, f, Owner
	case "tcp":
		host, _, err := net.SplitHostPort(rest)
		if err != nil {
			return nil, fmt.Errorf("QMP address %q: %w", addr, err)
		}
		if !isLoopback(host) {
			return nil, fmt.Errorf("QMP address %q: QMP has no authentication; listen on a loopback address (127.0.0.1, ::1 or localhost) and tunnel it if you need it elsewhere", addr)
		}
		if lo.TLS != nil {
			cfg, err := controlTLS(lo.TLS, lo.Authz)
			if err != nil {
				return nil, fmt.Errorf("QMP address %q: %w", addr, err)
			}
			l.tls, l.priv = cfg, Owner
		}
		ln, err := net.Listen("tcp", rest)
		if err != nil {
			return nil, err
		}
		l.ln = ln
		if l.tls == nil {
			s.log.Warn("QMP on "+ln.Addr().String()+" has no client authentication: every local user can connect and drive migrations "+
				"(network migrations, fd:NAME, and unix:/file: under --migration-dir; never exec: or other paths); "+
				"use the unix socket, or client certificates (--qmp-tls-creds)", "addr", ln.Addr().String())
		}
	default:
		return nil, fmt.Errorf("QMP address %q: unknown scheme %q; want unix:PATH or tcp:HOST:PORT", addr, scheme)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.close()
		return nil, ErrServerClosed
	}
	s.listeners = append(s.listeners, l)
	s.wg.Add(1)
	s.mu.Unlock()
	go s.accept(l)
	return l.ln.Addr(), nil
}

// ErrServerClosed is returned by Listen after Close.
var ErrServerClosed = errors.New("qmp: server closed")

// Addrs returns the addresses the server listens on.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.listeners))
	for i, l := range s.listeners {
		out[i] = l.ln.Addr()
	}
	return out
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (l *listener) close() {
	if l.closed.Swap(true) {
		return
	}
	l.ln.Close()
	if l.unix != nil {
		l.unix.remove()
	}
}

func (s *Server) accept(l *listener) {
	defer s.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("qmp accept", "err", err)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-s.ctx.Done():
				t.Stop()
				return
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		s.serveConn(conn, l.priv, l.tls)
	}
}

// ServeConn serves one already connected client (for example one end of
// a socketpair) with privilege p until it disconnects or the server
// closes: the caller vouches for who is at the other end. It returns at
// once; the server owns conn from here on.
func (s *Server) ServeConn(conn net.Conn, p Privilege) {
	s.serveConn(conn, p, nil)
}

// serveConn serves conn; with tlsCfg, the client's reader runs the TLS
// handshake (bounded by NegotiationTimeout) before anything else.
func (s *Server) serveConn(conn net.Conn, p Privilege, tlsCfg *tls.Config) {
	cl := &client{s: s, conn: conn, rw: conn, priv: p, tls: tlsCfg, up: make(chan struct{}),
		out: make(chan []byte, s.opts.QueueLen), done: make(chan struct{})}
	if tlsCfg == nil {
		close(cl.up)
	}
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		conn.Close()
		return
	case len(s.clients) >= s.opts.MaxClients:
		s.mu.Unlock()
		_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = conn.Write(encodeError(genericf("too many QMP clients (limit %d); close another connection and retry", s.opts.MaxClients), nil))
		conn.Close()
		return
	}
	s.clients[cl] = struct{}{}
	var evict *client
	if len(s.pending) >= s.opts.MaxPending {
		evict = s.pending[0]
		s.pending = s.pending[1:]
		delete(s.clients, evict) // its slot is free from now on
	}
	s.pending = append(s.pending, cl)
	s.wg.Add(2)
	s.mu.Unlock()
	if evict != nil {
		evict.evict(genericf("dropped: %d connections are waiting for capabilities negotiation (the limit) and this one waited longest; send {\"execute\":\"qmp_capabilities\"} as soon as you connect", s.opts.MaxPending))
	}
	go cl.writer()
	go cl.reader()
}

// unpend removes cl from the clients waiting for negotiation; s.mu held.
func (s *Server) unpendLocked(cl *client) {
	for i, p := range s.pending {
		if p == cl {
			s.pending = append(s.pending[:i:i], s.pending[i+1:]...)
			return
		}
	}
}

// Close stops accepting, flushes what each client is owed (bounded by
// WriteTimeout), disconnects every client, removes the unix socket files
// and stops the event goroutine. It does not close the host or the
// controller. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ls := s.listeners
	cls := make([]*client, 0, len(s.clients))
	for cl := range s.clients {
		cls = append(cls, cl)
	}
	s.mu.Unlock()
	for _, l := range ls {
		l.close()
	}
	for _, cl := range cls {
		cl.closeAfterFlush()
	}
	s.stop()
	s.sub.Close()
	s.wg.Wait()
	return s.fds.Close()
}

func (s *Server) removeClient(cl *client) {
	s.mu.Lock()
	delete(s.clients, cl)
	s.unpendLocked(cl)
	s.mu.Unlock()
}

// events turns controller events into QMP events for every negotiated
// client. last holds each side's last reported QMP status (the
// destination's setup, listening and connected are one QMP status). The
// controller delivers every state event (statistics alone may be
// dropped), so no MIGRATION event is ever lost here.
func (s *Server) events(last map[string]string, eventsOn bool) {
	defer s.wg.Done()
	sp := s.c.Spec()
	for ev := range s.sub.C() {
		switch ev.Kind {
		case machine.EventConfig:
			eventsOn = s.c.Config().Caps["events"]
		case machine.EventState:
			s.broadcast(EventMachine, MachineEvent{Side: ev.Side, From: string(ev.From), To: string(ev.To), Trigger: string(ev.Trigger)}, ev.Time)
			if ev.Side == spec.Guest {
				// QEMU's STOP and RESUME follow the guest's run state.
				switch {
				case ev.To == machine.GuestRunning:
					s.broadcast(EventResume, nil, ev.Time)
				case ev.From == machine.GuestRunning:
					s.broadcast(EventStop, nil, ev.Time)
				}
				continue
			}
			st := string(ev.To)
			if state := sp.Side(ev.Side).State(st); state != nil {
				st = state.QMPStatus()
			}
			if st == last[ev.Side] {
				continue
			}
			last[ev.Side] = st
			if eventsOn {
				s.broadcast(EventMigration, map[string]string{"status": st}, ev.Time)
			}
		case machine.EventPass:
			if eventsOn && ev.Side == spec.Outgoing {
				s.broadcast(EventMigrationPass, map[string]uint64{"pass": ev.Pass}, ev.Time)
			}
		}
	}
}

func (s *Server) broadcast(name string, data any, t time.Time) {
	var raw json.RawMessage
	if data != nil {
		raw, _ = json.Marshal(data)
	}
	msg := encodeLine(&Event{Event: name, Data: raw, Timestamp: NewTimestamp(t)})
	s.mu.Lock()
	defer s.mu.Unlock()
	for cl := range s.clients {
		if cl.negotiated.Load() {
			cl.sendEvent(msg)
		}
	}
}

// client is one connection. The reader goroutine owns the read side and
// runs the client's commands in order; the writer goroutine owns the write
// side and drains out.
type client struct {
	s *Server
	// conn is the connection as accepted: drop closes it. rw is what
	// requests are read from and replies written to: conn, or the TLS
	// connection over it, set by the reader before it closes up (the
	// writer waits for up before its first write).
	conn net.Conn
	rw   net.Conn
	up   chan struct{}
	tls  *tls.Config // run the TLS handshake first; nil for none
	priv Privilege   // decided by the listener; never changes
	// pendingFDs holds the descriptors that came with the latest read on
	// a unix socket (SCM_RIGHTS), for getfd. Owned by the reader
	// goroutine, which closes what is left when it ends.
	pendingFDs []*os.File
	// out carries encoded messages to the writer; a nil message means
	// "close after what came before". The reader blocks when it is full
	// (its own replies); the event goroutine never does (it drops the
	// client instead).
	out        chan []byte
	done       chan struct{} // closed by drop
	dropOnce   sync.Once
	closeOnce  sync.Once
	negotiated atomic.Bool
	oob        atomic.Bool
}

// drop disconnects the client at once.
func (cl *client) drop(why string) {
	cl.dropOnce.Do(func() {
		if why != "" {
			cl.s.log.Info("qmp client dropped", "remote", remoteName(cl.conn), "why", why)
		}
		close(cl.done)
		cl.conn.Close()
	})
}

func remoteName(c net.Conn) string {
	if c == nil {
		return "?"
	}
	if a := c.RemoteAddr(); a != nil {
		return a.Network() + ":" + a.String()
	}
	return "?"
}

// evict tells the client why and disconnects it once that is written
// (bounded by WriteTimeout). A client still in its TLS handshake is
// dropped at once.
func (cl *client) evict(e *Error) {
	select {
	case <-cl.up:
	default:
		cl.drop("evicted during the TLS handshake")
		return
	}
	select {
	case cl.out <- encodeError(e, nil):
	default:
	}
	cl.closeAfterFlush()
}

// closeAfterFlush asks the writer to close once the queued messages are
// written; if the queue is full the client is dropped now.
func (cl *client) closeAfterFlush() {
	cl.closeOnce.Do(func() {
		select {
		case cl.out <- nil:
		case <-cl.done:
		default:
			cl.drop("queue full at close")
		}
	})
}

// send queues a reply, waiting for room; false once the client is gone.
func (cl *client) send(msg []byte) bool {
	select {
	case <-cl.done:
		return false
	default:
	}
	select {
	case cl.out <- msg:
		return true
	case <-cl.done:
		return false
	}
}

// sendEvent queues an event without waiting; a client that lets its
// queue fill up is dropped.
func (cl *client) sendEvent(msg []byte) {
	select {
	case cl.out <- msg:
	case <-cl.done:
	default:
		cl.drop("event queue full: the client does not read")
	}
}

func (cl *client) writer() {
	defer cl.s.wg.Done()
	select {
	case <-cl.up:
	case <-cl.done:
		return
	}
	for {
		select {
		case msg := <-cl.out:
			if msg == nil {
				cl.drop("")
				return
			}
			_ = cl.conn.SetWriteDeadline(time.Now().Add(cl.s.opts.WriteTimeout))
			if _, err := cl.rw.Write(msg); err != nil {
				cl.drop("write: " + err.Error())
				return
			}
		case <-cl.done:
			return
		}
	}
}

func (cl *client) reader() {
	defer cl.s.wg.Done()
	defer cl.s.removeClient(cl)
	defer cl.drop("")
	defer cl.closePendingFDs()
	// The negotiation deadline is a read deadline; the reader clears it
	// in emitNegotiated, before its next read. It bounds the TLS handshake
	// too.
	_ = cl.conn.SetReadDeadline(time.Now().Add(cl.s.opts.NegotiationTimeout))
	if cl.tls != nil && !cl.handshake() {
		return
	}
	if !cl.send(encodeLine(newGreeting(cl.s.opts.Package))) {
		return
	}
	err := cl.s.serveStream(cl.reader0(), cl, cl.send)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) && !cl.negotiated.Load():
		cl.send(encodeError(genericf("Expecting capabilities negotiation with 'qmp_capabilities' within %v of connecting; the connection is closed", cl.s.opts.NegotiationTimeout), nil))
		cl.closeAfterFlush()
		<-cl.done
	case errors.Is(err, errTooLarge), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		// Deliver what the client is owed (it may only have closed its
		// write side), then disconnect.
		cl.closeAfterFlush()
		<-cl.done
	case err != nil && !errors.Is(err, net.ErrClosed):
		cl.s.log.Debug("qmp client read", "err", err)
	}
}

// serveStream reads requests from r and hands each reply to emit until r
// ends, emit fails, or a request is too large (after its error reply).
func (s *Server) serveStream(r io.Reader, cl *client, emit func([]byte) bool) error {
	fr := newFramer(r, s.opts.MaxRequest)
	for {
		raw, err := fr.next()
		var se *syntaxError
		switch {
		case errors.As(err, &se):
			if !emit(encodeError(genericf("%s", se.msg), nil)) {
				return net.ErrClosed
			}
			continue
		case errors.Is(err, errTooLarge):
			emit(encodeError(genericf("JSON parse error, request exceeds %d bytes: send smaller requests (the connection is closed)", s.opts.MaxRequest), nil))
			return errTooLarge
		case errors.Is(err, io.ErrUnexpectedEOF):
			emit(encodeError(genericf("JSON parse error, premature end of input"), nil))
			return err
		case err != nil:
			return err
		}
		msg, after, neg := s.dispatch(cl, raw)
		if neg != nil {
			if !s.emitNegotiated(cl, msg, neg, emit) {
				return net.ErrClosed
			}
			continue
		}
		if !emit(msg) {
			return net.ErrClosed
		}
		if after != nil {
			after()
		}
	}
}

// emitNegotiated queues the qmp_capabilities reply and switches the client
// to command mode in one step under s.mu, which broadcast also holds: an
// event is either broadcast before (and not sent: it predates the reply)
// or after (and queued behind the reply). So a client that has read the
// reply misses no later event, and never sees one before the reply (which
// go-qemu would lose). If the queue is full the reply is queued without
// the lock, and an event broadcast in between may be missed.
func (s *Server) emitNegotiated(cl *client, msg []byte, neg *negotiation, emit func([]byte) bool) bool {
	s.mu.Lock()
	select {
	case cl.out <- msg:
		cl.oob.Store(neg.oob)
		cl.negotiated.Store(true)
		s.unpendLocked(cl)
		s.mu.Unlock()
		cl.clearNegotiationDeadline()
		return true
	default:
	}
	s.mu.Unlock()
	if !emit(msg) {
		return false
	}
	cl.oob.Store(neg.oob)
	cl.negotiated.Store(true)
	s.mu.Lock()
	s.unpendLocked(cl)
	s.mu.Unlock()
	cl.clearNegotiationDeadline()
	return true
}

// clearNegotiationDeadline lifts the read deadline set at connect. Called
// by the reader goroutine, so no read is in flight.
func (cl *client) clearNegotiationDeadline() {
	if cl.conn != nil {
		_ = cl.conn.SetReadDeadline(time.Time{})
	}
}

// socketFile identifies a unix socket file the server created.
type socketFile struct {
	path     string
	dev, ino uint64
}

// remove unlinks the socket file if it is still the one we created.
func (f *socketFile) remove() {
	var st unix.Stat_t
	if err := unix.Lstat(f.path, &st); err != nil || st.Dev != f.dev || st.Ino != f.ino {
		return
	}
	_ = os.Remove(f.path)
}

// listenUnix creates a unix socket at path with mode 0600 from the start
// (fchmod before bind sets the mode of the file bind creates, so there is
// no window in which others may connect), replacing a stale socket file
// nobody listens on.
func listenUnix(path string) (net.Listener, *socketFile, error) {
	if path == "" {
		return nil, nil, errors.New("QMP address unix:PATH: the path is empty")
	}
	ln, err := bindUnix(path)
	if errors.Is(err, syscall.EADDRINUSE) {
		if rerr := removeStale(path); rerr != nil {
			return nil, nil, rerr
		}
		ln, err = bindUnix(path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("QMP socket %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("QMP socket %s vanished right after bind: %w", path, err)
	}
	return ln, &socketFile{path: path, dev: st.Dev, ino: st.Ino}, nil
}

func bindUnix(path string) (net.Listener, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if err := unix.Fchmod(fd, 0o600); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("fchmod", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("bind", err)
	}
	if err := unix.Listen(fd, 128); err != nil {
		unix.Close(fd)
		_ = os.Remove(path)
		return nil, os.NewSyscallError("listen", err)
	}
	f := os.NewFile(uintptr(fd), path)
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		_ = os.Remove(path)
		return nil, err
	}
	if ul, ok := ln.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(false) // we remove it ourselves, only if still ours
	}
	return ln, nil
}

// removeStale removes the socket file at path if nothing listens on it.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("QMP socket %s: the path exists and is not a socket: remove it or choose another path", path)
	}
	probe, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		probe.Close()
		return fmt.Errorf("QMP socket %s: another process is serving on it: stop it or choose another path", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("QMP socket %s: cannot tell whether it is stale (%v): remove it by hand if no server uses it", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("QMP socket %s: remove the stale file: %w", path, err)
	}
	return nil
}
