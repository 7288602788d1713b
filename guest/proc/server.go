package proc

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/uffd"
	"golang.org/x/sys/unix"
)

// ErrAttachTimeout: no client attached within Config.AttachTimeout.
var ErrAttachTimeout = errors.New("guest process: no client attached in time")

// Stats is the guest process's answer to STATS.
type Stats struct {
	Running      bool           `json:"running"`
	Guest        guest.Stats    `json:"guest"`
	Pages        int            `json:"pages"`         // pages in all blocks
	Received     int            `json:"received"`      // pages in the received bitmap (destination)
	PagesRead    uint64         `json:"pages_read"`    // page reads by the readers
	LostReads    uint64         `json:"lost_reads"`    // reads that found a data page all zero: must stay 0
	FirstLost    string         `json:"first_lost"`    // the first such page ("pc.ram page 12"), "" if none
	ReaderPasses []int          `json:"reader_passes"` // full sweeps completed, per reader
	FirstTouch   LatencySummary `json:"first_touch"`   // first-pass first-touch latency of the readers
	Attaches     int            `json:"attaches"`      // sessions so far, this one included
}

// server is a guest process: the built-in guest, its userfaultfd and
// received bitmap (destination), its readers, and the control socket.
type server struct {
	cfg  Config
	log  io.Writer
	g    *guest.Builtin
	uf   *uffd.FD // kept open for the process's life: faults block, never zero-fill
	bmFD int
	bm   []byte
	recv []guest.Bitmap
	rd   *readers

	// lc serialises the lifecycle (start, stop, and what needs a stopped
	// guest). A STOP that waits for vCPUs blocked on missing pages holds it
	// from a goroutine of its own, so a session never waits longer than
	// OpTimeout for it.
	lc chan struct{}

	attaches int // sessions so far; owned by the Serve goroutine, copied into each session
}

// Serve is the body of a guest process: it builds the guest described by
// cfg (for RoleDestination: registers its RAM with a userfaultfd before any
// vCPU can run, and creates the shared received bitmap), then serves one
// client at a time on ln until a client sends QUIT (nil), ctx ends (nil),
// or no client attaches within cfg.AttachTimeout ([ErrAttachTimeout]). A
// client that connects while another is attached gets an ERROR (busy).
//
// Serve leaves the guest's memory, userfaultfd and threads to the process's
// exit: its vCPUs may be blocked on missing pages forever, so nothing is
// waited for. Call it only as the whole of a process (see [Main]).
func Serve(ctx context.Context, cfg Config, ln *net.UnixListener, log io.Writer) error {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	s, err := newServer(cfg, log)
	if err != nil {
		return err
	}
	return s.serve(ctx, ln)
}

func newServer(cfg Config, log io.Writer) (*server, error) {
	s := &server{cfg: cfg, log: log, bmFD: -1, lc: make(chan struct{}, 1)}
	var err error
	if cfg.Role == RoleSource {
		s.g, err = guest.New(cfg.Guest)
	} else {
		s.g, err = guest.NewDestination(cfg.Guest)
	}
	if err != nil {
		return nil, err
	}
	if len(s.g.Blocks()) > MaxBlocks {
		return nil, fmt.Errorf("guest process: %d blocks, at most %d", len(s.g.Blocks()), MaxBlocks)
	}
	if cfg.Role == RoleDestination {
		if err := s.register(); err != nil {
			return nil, err
		}
	}
	// Blocked vCPU threads each hold a P while the fault lasts; leave Ps
	// for the control socket.
	writers := cfg.Guest.Writers
	if writers == 0 && cfg.Guest.DirtyRate > 0 {
		writers = 1
	}
	if want := cfg.Readers + writers + 2; runtime.GOMAXPROCS(0) < want {
		runtime.GOMAXPROCS(want)
	}
	s.rd = newReaders(s.g, cfg.Readers, cfg.Guest.Seed)
	return s, nil
}

// register opens the userfaultfd, registers every block for MISSING faults
// and creates the shared received bitmap.
func (s *server) register() error {
	feat := uffd.FeatureMissingShmem
	if sup, err := uffd.Supported(); err == nil && sup.Has(uffd.FeatureThreadID) {
		feat |= uffd.FeatureThreadID
	}
	uf, err := uffd.Open(uffd.Options{Features: feat})
	if err != nil {
		return fmt.Errorf("guest process: %w", err)
	}
	s.uf = uf
	var pages []int
	for _, b := range s.g.Blocks() {
		r := uffd.Range{Start: uint64(uintptr(unsafe.Pointer(&b.Mem[0]))), Len: uint64(len(b.Mem))}
		ioctls, err := uf.Register(r, uffd.ModeMissing)
		if err != nil {
			return fmt.Errorf("guest process: register block %q: %w", b.Name, err)
		}
		if !ioctls.Has(uffd.IoctlCopy | uffd.IoctlWake | uffd.IoctlZeropage) {
			return fmt.Errorf("guest process: block %q: the kernel allows ioctls %#x, without copy, wake or zeropage", b.Name, uint64(ioctls))
		}
		pages = append(pages, b.Pages())
	}
	size, offsets := bitmapLayout(pages)
	fd, err := unix.MemfdCreate("migctl-guest:received", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("guest process: received bitmap: %w", err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return fmt.Errorf("guest process: received bitmap: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
		return fmt.Errorf("guest process: sealing the received bitmap: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("guest process: received bitmap: %w", err)
	}
	writeBitmapHeader(mem, pages, offsets)
	s.bmFD, s.bm, s.recv = fd, mem, bitmapsOf(mem, pages, offsets)
	return nil
}

// received counts the pages in the received bitmap (atomic loads).
func (s *server) received() int {
	n := 0
	for _, b := range s.recv {
		for i := range b {
			w := atomic.LoadUint64(&b[i])
			for ; w != 0; w &= w - 1 {
				n++
			}
		}
	}
	return n
}

func (s *server) pages() int {
	n := 0
	for _, b := range s.g.Blocks() {
		n += b.Pages()
	}
	return n
}

// missing returns a non-nil error when the guest has pages not received
// yet: reading all of RAM would then fault, or, with migctl gone, block.
func (s *server) missing() error {
	if s.cfg.Role != RoleDestination {
		return nil
	}
	if got, all := s.received(), s.pages(); got < all {
		return fmt.Errorf("%d of %d pages not received yet", all-got, all)
	}
	return nil
}

func (s *server) logf(format string, args ...any) {
	if s.log != nil {
		fmt.Fprintf(s.log, "guest process %d: "+format+"\n", append([]any{os.Getpid()}, args...)...)
	}
}

type sessionEnd struct {
	quit bool
	err  error
}

func (s *server) serve(ctx context.Context, ln *net.UnixListener) error {
	conns := make(chan *net.UnixConn)
	acceptErr := make(chan error, 1)
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				acceptErr <- err
				return
			}
			select {
			case conns <- c:
			case <-ctx.Done():
				c.Close()
			}
		}
	}()
	defer ln.Close()

	timer := time.NewTimer(s.cfg.AttachTimeout)
	defer timer.Stop()
	var (
		active  chan sessionEnd // the session's end; nil when no client is attached
		current *net.UnixConn
		pending *net.UnixConn // a client that came while one was attached
		grace   <-chan time.Time
	)
	begin := func(c *net.UnixConn) {
		timer.Stop()
		s.attaches++
		active, current = make(chan sessionEnd, 1), c
		go func(c *net.UnixConn, n int, done chan<- sessionEnd) {
			quit, err := s.session(c, n)
			done <- sessionEnd{quit, err}
		}(c, s.attaches, active)
	}
	for {
		var expired <-chan time.Time
		if active == nil {
			expired = timer.C
		}
		select {
		case <-ctx.Done():
			for _, c := range []*net.UnixConn{current, pending} {
				if c != nil {
					c.Close()
				}
			}
			s.logf("terminated")
			return nil
		case err := <-acceptErr:
			return fmt.Errorf("guest process: accept: %w", err)
		case c := <-conns:
			switch {
			case active == nil:
				begin(c)
			case pending == nil:
				// The attached client may be on its way out (a client that
				// closes and attaches again, or a new migctl right after
				// the old one died): give its session a moment to end.
				pending, grace = c, time.After(busyGrace)
			default:
				s.reject(c)
			}
		case <-grace:
			s.reject(pending)
			pending, grace = nil, nil
		case end := <-active:
			active, current = nil, nil
			if end.quit {
				s.logf("quit")
				if pending != nil {
					s.reject(pending)
				}
				return nil
			}
			s.logf("client detached (%v): waiting up to %v for another", end.err, s.cfg.AttachTimeout)
			timer.Reset(s.cfg.AttachTimeout)
			if pending != nil {
				begin(pending)
				pending, grace = nil, nil
			}
		case <-expired:
			s.logf("no client attached within %v: giving up (the guest never read a page it had not received)", s.cfg.AttachTimeout)
			return ErrAttachTimeout
		}
	}
}

// busyGrace is how long a client that connects while another is attached
// waits for that session to end before it is told the guest process is
// busy.
const busyGrace = 2 * time.Second

// reject answers a second client with ERROR busy and hangs up.
func (s *server) reject(c *net.UnixConn) {
	defer c.Close()
	_ = writeFrame(c, msgError, encodeError(codeBusy, "another client is attached to this guest process"), nil, time.Now().Add(time.Second))
}

// session serves one client until it quits (true), hangs up, goes idle
// past IdleTimeout or breaks the protocol.
func (s *server) session(c *net.UnixConn, attaches int) (bool, error) {
	defer c.Close()
	opT := s.cfg.OpTimeout
	f, err := readFrame(c, time.Now().Add(opT), opT, 4, 0)
	if err != nil {
		return false, fmt.Errorf("reading HELLO: %w", err)
	}
	if f.typ != msgHello || len(f.payload) != 4 {
		_ = writeFrame(c, msgError, encodeError(codeBadRequest, "the first request must be HELLO with two u16 versions"), nil, time.Now().Add(opT))
		return false, fmt.Errorf("first request %v: %w", f.typ, ErrProtocol)
	}
	lo, hi := int(binary.LittleEndian.Uint16(f.payload[0:2])), int(binary.LittleEndian.Uint16(f.payload[2:4]))
	v := min(hi, ProtocolVersion)
	if v < max(lo, minProtocolVersion) {
		msg := fmt.Sprintf("client speaks versions %d..%d, this guest process %d..%d", lo, hi, minProtocolVersion, ProtocolVersion)
		_ = writeFrame(c, msgError, encodeError(codeVersion, msg), nil, time.Now().Add(opT))
		return false, fmt.Errorf("%s: %w", msg, ErrVersion)
	}
	h, fds := s.hello(v, attaches-1)
	payload, err := json.Marshal(h)
	if err != nil {
		return false, err
	}
	if err := writeFrame(c, msgHello|replyBit, payload, fds, time.Now().Add(opT)); err != nil {
		return false, fmt.Errorf("sending HELLO: %w", err)
	}
	s.logf("client attached (session %d)", attaches)
	for {
		f, err := readFrame(c, time.Now().Add(s.cfg.IdleTimeout), opT, maxRequest, 0)
		if err != nil {
			return false, err
		}
		var (
			reply []byte
			code  uint16
			msg   string
		)
		if f.typ == msgWaitReaders {
			if reply, code, msg, err = s.waitReaders(c, f); err != nil {
				return false, err
			}
		} else {
			reply, code, msg = s.handle(f, attaches)
		}
		t, p := f.typ|replyBit, reply
		if code != 0 {
			t, p = msgError, encodeError(code, msg)
		}
		if err := writeFrame(c, t, p, nil, time.Now().Add(opT)); err != nil {
			return false, fmt.Errorf("replying to %v: %w", f.typ, err)
		}
		if f.typ == msgQuit && code == 0 {
			return true, nil
		}
	}
}

func (s *server) hello(version, attaches int) (Hello, []int) {
	h := Hello{
		Version: version, PID: os.Getpid(), Role: s.cfg.Role, ID: s.g.ID(), Config: s.cfg.Guest,
		Running: s.g.Running(), Attaches: attaches, IdleTimeout: int64(s.cfg.IdleTimeout),
		VCPUThreads: s.rd.tids,
	}
	var fds []int
	for _, b := range s.g.Blocks() {
		h.Blocks = append(h.Blocks, BlockInfo{Name: b.Name, Size: int64(len(b.Mem)), PageSize: b.PageSize, Addr: uint64(uintptr(unsafe.Pointer(&b.Mem[0])))})
		fds = append(fds, b.FD)
	}
	for _, d := range s.g.Devices() {
		h.Devices = append(h.Devices, DeviceInfo{Name: d.Name(), Instance: d.Instance(), Version: d.Version(), NeedsLock: d.NeedsLock()})
	}
	if s.recv != nil {
		h.Bitmap, h.BitmapSize = true, int64(len(s.bm))
		fds = append(fds, s.bmFD)
	}
	if s.uf != nil {
		h.UFFD, h.Features = true, uint64(s.uf.Features())
		fds = append(fds, s.uf.Fd())
	}
	return h, fds
}

// lock takes the lifecycle lock within OpTimeout.
func (s *server) lock() bool {
	t := time.NewTimer(s.cfg.OpTimeout)
	defer t.Stop()
	select {
	case s.lc <- struct{}{}:
		return true
	case <-t.C:
		return false
	}
}

func (s *server) unlock() { <-s.lc }

const busyMsg = "the guest's vCPUs did not stop within the operation timeout: some are blocked on missing pages; serve the faults, then retry"

// handle runs one request and returns the reply payload, or an error code
// and message.
func (s *server) handle(f frame, attaches int) ([]byte, uint16, string) {
	empty := func() bool { return len(f.payload) == 0 }
	badLen := func() ([]byte, uint16, string) {
		return nil, codeBadRequest, fmt.Sprintf("%v with a payload of %d bytes", f.typ, len(f.payload))
	}
	switch f.typ {
	case msgPing:
		if !empty() {
			return badLen()
		}
		return nil, 0, ""
	case msgStart:
		if !empty() {
			return badLen()
		}
		if !s.lock() {
			return nil, codeTimeout, busyMsg
		}
		defer s.unlock()
		if err := s.g.Start(); err != nil {
			return nil, codeState, err.Error()
		}
		s.rd.start()
		return nil, 0, ""
	case msgStop:
		if !empty() {
			return badLen()
		}
		return s.stop()
	case msgDirtyStart, msgDirtyStop:
		if !empty() {
			return badLen()
		}
		if f.typ == msgDirtyStart {
			s.g.StartDirtyLog()
		} else {
			s.g.StopDirtyLog()
		}
		return nil, 0, ""
	case msgDirtySync:
		if !empty() {
			return badLen()
		}
		dst := guest.NewBitmaps(s.g.Blocks())
		s.g.SyncDirty(dst)
		var out []byte
		for _, d := range dst {
			for _, w := range d {
				out = binary.LittleEndian.AppendUint64(out, w)
			}
		}
		return out, 0, ""
	case msgDigest, msgVerify:
		if !empty() {
			return badLen()
		}
		if err := s.missing(); err != nil {
			return nil, codeMissing, err.Error()
		}
		if !s.lock() {
			return nil, codeTimeout, busyMsg
		}
		defer s.unlock()
		if f.typ == msgVerify {
			if err := s.g.Verify(); err != nil {
				return nil, stateOr(err, codeFailed), err.Error()
			}
			return nil, 0, ""
		}
		d, err := s.g.Digest()
		if err != nil {
			return nil, stateOr(err, codeFailed), err.Error()
		}
		b, _ := json.Marshal(d)
		return b, 0, ""
	case msgDevSave, msgDevLoad:
		if len(f.payload) < 4 || (f.typ == msgDevSave && len(f.payload) != 4) {
			return badLen()
		}
		i := int(binary.LittleEndian.Uint32(f.payload))
		devs := s.g.Devices()
		if i >= len(devs) {
			return nil, codeBadRequest, fmt.Sprintf("device %d of %d", i, len(devs))
		}
		if f.typ == msgDevSave {
			st, err := devs[i].Save()
			if err != nil || len(st) > MaxDeviceState {
				return nil, codeFailed, fmt.Sprintf("save %s: %d bytes, %v", devs[i].Name(), len(st), err)
			}
			return st, 0, ""
		}
		if !s.lock() {
			return nil, codeTimeout, busyMsg
		}
		defer s.unlock()
		if err := devs[i].Load(f.payload[4:]); err != nil {
			return nil, stateOr(err, codeFailed), err.Error()
		}
		return nil, 0, ""
	case msgStats:
		if !empty() {
			return badLen()
		}
		b, _ := json.Marshal(s.stats(attaches))
		return b, 0, ""
	case msgThrottle:
		v, err := decodeU32s(f.payload, 1)
		if err != nil {
			return badLen()
		}
		s.g.Throttle(int(min(v[0], 100)))
		return nil, 0, ""
	case msgWaitReaders: // the session uses waitReaders, which also watches the connection
		return s.waitReadersWith(f, nil)
	case msgQuit:
		if !empty() {
			return badLen()
		}
		return nil, 0, ""
	}
	return nil, codeBadRequest, fmt.Sprintf("unknown request %v", f.typ)
}

// waitReaders runs a WAIT_READERS request for a session: while it waits
// (at most the timeout the request names, at most 10 minutes) it watches
// the connection, so that a client that hangs up (a cancelled request, a
// dead migctl) ends the session at once instead of holding the guest
// process busy. An error return ends the session.
func (s *server) waitReaders(c *net.UnixConn, f frame) ([]byte, uint16, string, error) {
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		return nil, 0, "", err
	}
	hup := make(chan error, 1)
	go func() {
		var b [1]byte
		_, err := c.Read(b[:]) // no request may come before the reply: anything here ends the session
		if err == nil {
			err = fmt.Errorf("a request before the reply to WAIT_READERS: %w", ErrProtocol)
		}
		hup <- err
	}()
	abort := make(chan struct{})
	type result struct {
		reply []byte
		code  uint16
		msg   string
	}
	done := make(chan result, 1)
	go func() {
		reply, code, msg := s.waitReadersWith(f, abort)
		done <- result{reply, code, msg}
	}()
	select {
	case r := <-done:
		c.SetReadDeadline(time.Unix(1, 0)) // stop the watcher
		if err := <-hup; !errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, 0, "", err
		}
		return r.reply, r.code, r.msg, nil
	case err := <-hup:
		close(abort)
		<-done
		return nil, 0, "", fmt.Errorf("client hung up during WAIT_READERS: %w", err)
	}
}

// waitReadersWith decodes WAIT_READERS and waits for the readers, or for
// abort.
func (s *server) waitReadersWith(f frame, abort <-chan struct{}) ([]byte, uint16, string) {
	v, err := decodeU32s(f.payload, 2)
	if err != nil {
		return nil, codeBadRequest, fmt.Sprintf("%v with a payload of %d bytes", f.typ, len(f.payload))
	}
	if s.rd.n == 0 {
		return nil, codeState, "this guest process has no readers"
	}
	timeout := time.Duration(min(v[1], 600_000)) * time.Millisecond
	if !s.rd.wait(int(v[0]), timeout, abort) {
		return nil, codeTimeout, fmt.Sprintf("the readers completed %v passes, not %d, within %v", s.rd.passCounts(), v[0], timeout)
	}
	return nil, 0, ""
}

func stateOr(err error, code uint16) uint16 {
	if errors.Is(err, guest.ErrRunning) || errors.Is(err, guest.ErrClosed) {
		return codeState
	}
	return code
}

// stop parks readers and writers from a goroutine of its own, which holds
// the lifecycle lock until every vCPU has stopped; the request waits for it
// at most OpTimeout.
func (s *server) stop() ([]byte, uint16, string) {
	done := make(chan struct{})
	go func() {
		s.lc <- struct{}{}
		s.rd.halt()
		s.g.Stop()
		<-s.lc
		close(done)
	}()
	t := time.NewTimer(s.cfg.OpTimeout)
	defer t.Stop()
	select {
	case <-done:
		return nil, 0, ""
	case <-t.C:
		return nil, codeTimeout, busyMsg
	}
}

func (s *server) stats(attaches int) Stats {
	st := Stats{
		Running:      s.g.Running(),
		Guest:        s.g.Stats(),
		Pages:        s.pages(),
		PagesRead:    s.rd.pagesRead.Load(),
		LostReads:    s.rd.lost.Load(),
		ReaderPasses: s.rd.passCounts(),
		FirstTouch:   s.rd.firstTouch(),
		Attaches:     attaches,
	}
	if s.cfg.Role == RoleDestination {
		st.Received = s.received()
	} else {
		st.Received = st.Pages
	}
	if v := s.rd.firstLost.Load(); v != 0 {
		v--
		st.FirstLost = fmt.Sprintf("%s page %d", s.g.Blocks()[v>>40].Name, v&(1<<40-1))
	}
	return st
}
