package proc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/guest"
	"golang.org/x/sys/unix"
)

// DefaultRequestTimeout bounds a request whose context has no earlier
// deadline.
const DefaultRequestTimeout = 30 * time.Second

// AttachOptions configure [Attach].
type AttachOptions struct {
	// Timeout bounds each request (and the attach itself) whose context has
	// no earlier deadline. 0: DefaultRequestTimeout.
	Timeout time.Duration
}

// Client is migctl's side of a guest process: it maps the guest's memfds
// into this process (MAP_SHARED; these mappings are not registered with the
// userfaultfd) and proxies everything else over the control socket. It
// implements [guest.Guest], [guest.Postcopier] and [guest.Throttler].
//
// Requests are sent one at a time (a mutex orders them). A request whose
// context ends while it is in flight closes the session: the stream would be
// out of step; the guest process then waits for a new [Attach]. The client
// pings the guest process when idle, so the session outlives long
// migrations.
type Client struct {
	hello   Hello
	timeout time.Duration

	blocks  []*guest.Block // mapped in this process; FD owned by the client
	devices []guest.Device
	bmFD    int
	bm      []byte
	recv    []guest.Bitmap
	uffdFD  int

	running atomic.Bool

	mu      sync.Mutex // orders requests; guards conn use, lastUse, broken, closed, lastErr
	conn    *net.UnixConn
	lastUse time.Time
	broken  error // the session is unusable (I/O error, protocol error, cancel)
	closed  bool
	lastErr error // the last failure of a method that cannot return one

	kaStop chan struct{}
	kaDone chan struct{}
}

var (
	_ guest.Guest      = (*Client)(nil)
	_ guest.Postcopier = (*Client)(nil)
	_ guest.Throttler  = (*Client)(nil)
)

// Attach connects to the guest process listening on the unix socket
// socket, says HELLO, receives its memfds (and for a destination its
// received bitmap and userfaultfd) and maps the memory. It is also how a
// new migctl process re-attaches to a guest process whose migctl died:
// the received bitmap then says which pages are present.
func Attach(ctx context.Context, socket string, opts AttachOptions) (*Client, error) {
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultRequestTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("guest process: attach %s: %w", socket, err)
	}
	conn := nc.(*net.UnixConn)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	c, err := hello(ctx, conn)
	stop()
	if err != nil {
		conn.Close()
		if cerr := ctxErr(ctx); cerr != nil {
			err = fmt.Errorf("%w (%w)", err, cerr)
		}
		return nil, fmt.Errorf("guest process: attach %s: %w", socket, err)
	}
	c.timeout = timeout
	c.lastUse = time.Now()
	c.kaStop, c.kaDone = make(chan struct{}), make(chan struct{})
	go c.keepalive(time.Duration(c.hello.IdleTimeout) / 3)
	return c, nil
}

func hello(ctx context.Context, conn *net.UnixConn) (*Client, error) {
	deadline, _ := ctx.Deadline()
	req := binary.LittleEndian.AppendUint16(nil, minProtocolVersion)
	req = binary.LittleEndian.AppendUint16(req, ProtocolVersion)
	if err := writeFrame(conn, msgHello, req, nil, deadline); err != nil {
		return nil, err
	}
	f, err := readFrame(conn, deadline, 0, maxJSON, maxFDs)
	if err != nil {
		return nil, err
	}
	c := &Client{conn: conn, bmFD: -1, uffdFD: -1}
	fds := f.fds
	defer func() { closeFDs(fds) }() // whatever the client has not taken
	switch f.typ {
	case msgError:
		return nil, decodeError(msgHello, f.payload)
	case msgHello | replyBit:
	default:
		return nil, fmt.Errorf("answer to HELLO is %v: %w", f.typ, ErrProtocol)
	}
	if err := decodeJSON(f.payload, &c.hello); err != nil {
		return nil, fmt.Errorf("HELLO: %w", err)
	}
	h := &c.hello
	if err := h.validate(); err != nil {
		return nil, err
	}
	if len(fds) != h.fds() {
		return nil, fmt.Errorf("HELLO came with %d descriptors, want %d: %w", len(fds), h.fds(), ErrProtocol)
	}
	ok := false
	defer func() {
		if !ok {
			c.release()
		}
	}()
	var pages []int
	for i, b := range h.Blocks {
		mem, err := mapFD(fds[i], b.Size)
		if err != nil {
			return nil, fmt.Errorf("block %q: %w", b.Name, err)
		}
		c.blocks = append(c.blocks, &guest.Block{Name: b.Name, PageSize: b.PageSize, Mem: mem, FD: fds[i]})
		fds[i] = -1
		pages = append(pages, int(b.Size/int64(b.PageSize)))
	}
	next := len(h.Blocks)
	if h.Bitmap {
		mem, err := mapFD(fds[next], h.BitmapSize)
		if err != nil {
			return nil, fmt.Errorf("received bitmap: %w", err)
		}
		c.bm, c.bmFD, fds[next] = mem, fds[next], -1
		offsets, err := parseBitmapHeader(mem, pages)
		if err != nil {
			return nil, err
		}
		c.recv = bitmapsOf(mem, pages, offsets)
		next++
	}
	if h.UFFD {
		c.uffdFD, fds[next] = fds[next], -1
	}
	for i, d := range h.Devices {
		c.devices = append(c.devices, &remoteDevice{c: c, index: i, info: d})
	}
	c.running.Store(h.Running)
	ok = true
	return c, nil
}

// ctxErr is ctx.Err(), also when ctx's deadline has passed but its timer
// has not fired yet (a socket deadline set from it can expire first).
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return nil
}

// mapFD maps size bytes of a received memfd, after checking its size: a
// mapping past the end of the file would turn accesses into SIGBUS.
func mapFD(fd int, size int64) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Size != size {
		return nil, fmt.Errorf("memfd is %d bytes, HELLO says %d: %w", st.Size, size, ErrProtocol)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	return mem, nil
}

// release unmaps and closes what the client holds.
func (c *Client) release() error {
	var errs []error
	for _, b := range c.blocks {
		if b.Mem != nil {
			errs = append(errs, unix.Munmap(b.Mem))
			b.Mem = nil
		}
		if b.FD >= 0 {
			errs = append(errs, unix.Close(b.FD))
			b.FD = -1
		}
	}
	if c.bm != nil {
		errs = append(errs, unix.Munmap(c.bm))
		c.bm, c.recv = nil, nil
	}
	for _, fd := range []*int{&c.bmFD, &c.uffdFD} {
		if *fd >= 0 {
			errs = append(errs, unix.Close(*fd))
			*fd = -1
		}
	}
	return errors.Join(errs...)
}

func (c *Client) keepalive(every time.Duration) {
	defer close(c.kaDone)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-c.kaStop:
			return
		case <-t.C:
		}
		c.mu.Lock()
		idle := time.Since(c.lastUse) >= every && c.broken == nil && !c.closed
		c.mu.Unlock()
		if idle {
			_, _ = c.call(context.Background(), msgPing, nil, 0)
		}
	}
}

// call sends one request and returns the reply's payload (at most limit
// bytes). An ERROR reply is returned as a *RemoteError and leaves the
// session usable; anything else that fails breaks it.
func (c *Client) call(ctx context.Context, t msgType, payload []byte, limit int) ([]byte, error) {
	return c.callFor(ctx, t, payload, limit, c.timeout)
}

// callFor is call with the request bounded by timeout instead of the
// client's Timeout (still by ctx's deadline, if earlier).
func (c *Client) callFor(ctx context.Context, t msgType, payload []byte, limit int, timeout time.Duration) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, fmt.Errorf("guest process: %v: %w", t, guest.ErrClosed)
	}
	if c.broken != nil {
		return nil, fmt.Errorf("guest process: %v: session broken earlier (attach again): %w", t, c.broken)
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	stop := context.AfterFunc(ctx, func() { c.conn.Close() })
	defer stop()
	fail := func(err error) ([]byte, error) {
		if cerr := ctxErr(ctx); cerr != nil {
			err = fmt.Errorf("%w (%w)", cerr, err)
		}
		c.broken = err
		c.conn.Close()
		return nil, fmt.Errorf("guest process: %v: %w", t, err)
	}
	if err := writeFrame(c.conn, t, payload, nil, deadline); err != nil {
		return fail(err)
	}
	f, err := readFrame(c.conn, deadline, 0, max(limit, 2+maxErrorText), 0)
	if err != nil {
		return fail(err)
	}
	c.lastUse = time.Now()
	switch f.typ {
	case msgError:
		return nil, decodeError(t, f.payload)
	case t | replyBit:
		if len(f.payload) > limit {
			return fail(fmt.Errorf("%v reply of %d bytes, at most %d: %w", t, len(f.payload), limit, ErrProtocol))
		}
		return f.payload, nil
	}
	return fail(fmt.Errorf("answer to %v is %v: %w", t, f.typ, ErrProtocol))
}

func (c *Client) callEmpty(ctx context.Context, t msgType, payload []byte) error {
	p, err := c.call(ctx, t, payload, 0)
	if err == nil && len(p) != 0 {
		err = fmt.Errorf("guest process: %v: unexpected payload: %w", t, ErrProtocol)
	}
	return err
}

func (c *Client) noteErr(err error) {
	if err != nil {
		c.mu.Lock()
		c.lastErr = err
		c.mu.Unlock()
	}
}

// Err returns the last failure of a method that cannot return one
// (SyncDirty, StartDirtyLog, StopDirtyLog, Throttle), or nil.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

// Hello returns what the guest process said when the client attached.
func (c *Client) Hello() Hello { return c.hello }

// ID returns the built-in guest's ID.
func (c *Client) ID() string { return c.hello.ID }

// Blocks returns the guest's RAM blocks as mapped in this process. On a
// destination, never read a page that is not in the received bitmap
// through them (it would become a present zero page for the guest).
func (c *Client) Blocks() []*guest.Block { return c.blocks }

// Devices returns proxies of the guest process's devices.
func (c *Client) Devices() []guest.Device { return c.devices }

// Running reports whether the guest runs, as of the last START, STOP or
// STATS.
func (c *Client) Running() bool { return c.running.Load() }

// Start runs the guest's writers and readers.
func (c *Client) Start() error { return c.StartContext(context.Background()) }

// StartContext is Start bounded by ctx.
func (c *Client) StartContext(ctx context.Context) error {
	if err := c.callEmpty(ctx, msgStart, nil); err != nil {
		return err
	}
	c.running.Store(true)
	return nil
}

// Stop parks the guest's writers and readers. A vCPU blocked on a missing
// page stops only once the page is installed: when that takes longer than
// the guest process's OpTimeout, Stop fails with ErrTimeout and the stop
// completes in the background.
func (c *Client) Stop() error { return c.StopContext(context.Background()) }

// StopContext is Stop bounded by ctx.
func (c *Client) StopContext(ctx context.Context) error {
	if err := c.callEmpty(ctx, msgStop, nil); err != nil {
		return err
	}
	c.running.Store(false)
	return nil
}

// StartDirtyLog starts the guest's dirty log (a failure is kept for Err).
func (c *Client) StartDirtyLog() { c.noteErr(c.callEmpty(context.Background(), msgDirtyStart, nil)) }

// StopDirtyLog stops the guest's dirty log (a failure is kept for Err).
func (c *Client) StopDirtyLog() { c.noteErr(c.callEmpty(context.Background(), msgDirtyStop, nil)) }

// SyncDirty ORs the pages written since the last sync into dst. If the
// guest process cannot be asked, it reports every page dirty (so no write
// is ever missed) and keeps the error for Err.
func (c *Client) SyncDirty(dst [][]uint64) {
	if err := c.SyncDirtyContext(context.Background(), dst); err != nil {
		c.noteErr(err)
		for i, b := range c.blocks {
			if i < len(dst) {
				d := guest.Bitmap(dst[i])
				for p := range min(b.Pages(), 64*len(d)) {
					d.Set(p)
				}
			}
		}
	}
}

// SyncDirtyContext is SyncDirty that returns its error (and leaves dst
// alone on failure).
func (c *Client) SyncDirtyContext(ctx context.Context, dst [][]uint64) error {
	words := 0
	for _, b := range c.blocks {
		words += guest.BitmapWords(b.Pages())
	}
	p, err := c.call(ctx, msgDirtySync, nil, 8*words)
	if err != nil {
		return err
	}
	if len(p) != 8*words {
		return fmt.Errorf("guest process: DIRTY_SYNC reply of %d bytes, want %d: %w", len(p), 8*words, ErrProtocol)
	}
	if len(dst) < len(c.blocks) {
		return fmt.Errorf("guest process: SyncDirty: dst has %d bitmaps for %d blocks", len(dst), len(c.blocks))
	}
	for i, b := range c.blocks {
		n := guest.BitmapWords(b.Pages())
		if len(dst[i]) < n {
			return fmt.Errorf("guest process: SyncDirty: dst[%d] has %d words for %d pages", i, len(dst[i]), b.Pages())
		}
		for w := range n {
			dst[i][w] |= binary.LittleEndian.Uint64(p[8*w:])
		}
		p = p[8*n:]
	}
	return nil
}

// Throttle slows the guest's writers (a failure is kept for Err).
func (c *Client) Throttle(percent int) {
	c.noteErr(c.callEmpty(context.Background(), msgThrottle, binary.LittleEndian.AppendUint32(nil, uint32(max(0, min(100, percent))))))
}

// Digest returns the guest's digest, computed by the guest process over
// its RAM. It needs a stopped guest and, on a destination, every page
// received ([ErrMissingPages] otherwise: reading a missing page would
// fault).
func (c *Client) Digest(ctx context.Context) (guest.Digest, error) {
	p, err := c.call(ctx, msgDigest, nil, maxJSON)
	if err != nil {
		return guest.Digest{}, err
	}
	var d guest.Digest
	if err := decodeJSON(p, &d); err != nil {
		return guest.Digest{}, fmt.Errorf("guest process: DIGEST: %w", err)
	}
	return d, nil
}

// Checksum returns Digest().Sum().
func (c *Client) Checksum(ctx context.Context) (uint64, error) {
	d, err := c.Digest(ctx)
	if err != nil {
		return 0, err
	}
	return d.Sum(), nil
}

// Verify runs the built-in guest's Verify in the guest process (same
// conditions as Digest); a bad page fails with ErrFailed and names it.
func (c *Client) Verify(ctx context.Context) error { return c.callEmpty(ctx, msgVerify, nil) }

// Stats returns the guest process's counters.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	p, err := c.call(ctx, msgStats, nil, maxJSON)
	if err != nil {
		return Stats{}, err
	}
	var st Stats
	if err := decodeJSON(p, &st); err != nil {
		return Stats{}, fmt.Errorf("guest process: STATS: %w", err)
	}
	c.running.Store(st.Running)
	return st, nil
}

// WaitReaders returns once every reader has completed passes full sweeps,
// or fails with ErrTimeout after timeout (measured in the guest process;
// the request's own deadline is timeout plus the client's Timeout).
func (c *Client) WaitReaders(ctx context.Context, passes int, timeout time.Duration) error {
	ms := uint32(min(max(timeout, 0)/time.Millisecond, 600_000))
	p := binary.LittleEndian.AppendUint32(nil, uint32(passes))
	p = binary.LittleEndian.AppendUint32(p, ms)
	_, err := c.callFor(ctx, msgWaitReaders, p, 0, time.Duration(ms)*time.Millisecond+c.timeout)
	return err
}

// Ping checks that the guest process answers.
func (c *Client) Ping(ctx context.Context) error { return c.callEmpty(ctx, msgPing, nil) }

// Quit tells the guest process to exit, then closes the client.
func (c *Client) Quit(ctx context.Context) error {
	err := c.callEmpty(ctx, msgQuit, nil)
	return errors.Join(err, c.Close())
}

// Close detaches: it hangs up the control socket and releases this
// process's mappings and descriptors. The guest process keeps running (and
// keeps its userfaultfd: a vCPU touching a missing page blocks) and waits
// for another client to Attach. Slices of Blocks()[i].Mem must not be used
// afterwards. Close is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	err := c.conn.Close()
	c.mu.Unlock()
	close(c.kaStop)
	<-c.kaDone
	if errors.Is(err, net.ErrClosed) {
		err = nil // closed by a cancel or a broken session
	}
	return errors.Join(err, c.release())
}

// Userfault returns the guest process's userfaultfd registration
// ([guest.Postcopier]). The descriptor is owned by the client: dup it to
// keep it past Close. The received bitmaps are the client's mapping of the
// shared memory: valid until Close. A source guest process has none.
func (c *Client) Userfault() (guest.Userfault, error) {
	if c.uffdFD < 0 {
		return guest.Userfault{}, fmt.Errorf("guest process: %s role has no userfaultfd: start it with role %q", c.hello.Role, RoleDestination)
	}
	u := guest.Userfault{FD: c.uffdFD, Features: c.hello.Features, Received: c.recv, VCPUThreads: c.hello.VCPUThreads}
	for _, b := range c.hello.Blocks {
		u.Ranges = append(u.Ranges, guest.FaultRange{Addr: b.Addr, Len: uint64(b.Size)})
	}
	return u, nil
}

// Received returns the shared received bitmaps (nil for a source).
func (c *Client) Received() []guest.Bitmap { return c.recv }

// remoteDevice proxies one device of the guest process.
type remoteDevice struct {
	c     *Client
	index int
	info  DeviceInfo
}

func (d *remoteDevice) Name() string     { return d.info.Name }
func (d *remoteDevice) Instance() uint32 { return d.info.Instance }
func (d *remoteDevice) Version() uint32  { return d.info.Version }
func (d *remoteDevice) NeedsLock() bool  { return d.info.NeedsLock }

func (d *remoteDevice) Save() ([]byte, error) {
	return d.c.call(context.Background(), msgDevSave, binary.LittleEndian.AppendUint32(nil, uint32(d.index)), MaxDeviceState)
}

func (d *remoteDevice) Load(state []byte) error {
	if len(state) > MaxDeviceState {
		return fmt.Errorf("guest process: %s: state of %d bytes exceeds %d: %w", d.info.Name, len(state), MaxDeviceState, guest.ErrDeviceState)
	}
	err := d.c.callEmpty(context.Background(), msgDevLoad, append(binary.LittleEndian.AppendUint32(nil, uint32(d.index)), state...))
	var re *RemoteError
	if errors.As(err, &re) && re.Code == codeFailed && strings.Contains(re.Msg, guest.ErrDeviceState.Error()) {
		return fmt.Errorf("%w: %w", err, guest.ErrDeviceState)
	}
	return err
}
