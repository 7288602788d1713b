//go:build rdma_verbs

package ibv

/*
#cgo LDFLAGS: -libverbs -lrdmacm
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

static int mg_num_devices(void) {
	int n = 0;
	struct ibv_device **l = ibv_get_device_list(&n);
	if (!l) return -errno;
	ibv_free_device_list(l);
	return n;
}

static int mg_nonblock(int fd) {
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0) return -errno;
	return fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

static int mg_errno(void) { return errno; }

static int mg_getaddrinfo(const char *host, const char *port, int passive, struct rdma_addrinfo **res) {
	struct rdma_addrinfo hints;
	memset(&hints, 0, sizeof hints);
	hints.ai_port_space = RDMA_PS_TCP;
	if (passive) hints.ai_flags = RAI_PASSIVE;
	return rdma_getaddrinfo(host, port, &hints, res) ? -errno : 0;
}

static struct sockaddr *mg_ai_src(struct rdma_addrinfo *ai) { return ai->ai_src_addr; }
static struct sockaddr *mg_ai_dst(struct rdma_addrinfo *ai) { return ai->ai_dst_addr; }

static int mg_ev_type(struct rdma_cm_event *e) { return e->event; }
static struct rdma_cm_id *mg_ev_id(struct rdma_cm_event *e) { return e->id; }
static const void *mg_ev_priv(struct rdma_cm_event *e) { return e->param.conn.private_data; }
static int mg_ev_priv_len(struct rdma_cm_event *e) { return e->param.conn.private_data_len; }
static int mg_ev_status(struct rdma_cm_event *e) { return e->status; }

static int mg_get_event(struct rdma_event_channel *ch, struct rdma_cm_event **ev) {
	return rdma_get_cm_event(ch, ev) ? -errno : 0;
}

static struct ibv_context *mg_id_verbs(struct rdma_cm_id *id) { return id->verbs; }
static struct ibv_qp *mg_id_qp(struct rdma_cm_id *id) { return id->qp; }

static int mg_create_qp(struct rdma_cm_id *id, struct ibv_pd *pd, struct ibv_cq *cq, int sd, int rd) {
	struct ibv_qp_init_attr a;
	memset(&a, 0, sizeof a);
	a.send_cq = cq;
	a.recv_cq = cq;
	a.qp_type = IBV_QPT_RC;
	a.cap.max_send_wr = sd;
	a.cap.max_recv_wr = rd;
	a.cap.max_send_sge = 1;
	a.cap.max_recv_sge = 1;
	a.sq_sig_all = 1;
	return rdma_create_qp(id, pd, &a) ? -errno : 0;
}

static int mg_connect(struct rdma_cm_id *id, const void *priv, int len, int passive) {
	struct rdma_conn_param p;
	memset(&p, 0, sizeof p);
	p.private_data = priv;
	p.private_data_len = len;
	p.initiator_depth = 2;
	p.responder_resources = 2;
	p.retry_count = 5;
	p.rnr_retry_count = 7;
	if (passive) return rdma_accept(id, &p) ? -errno : 0;
	return rdma_connect(id, &p) ? -errno : 0;
}

static int mg_post_send(struct ibv_qp *qp, uint64_t id, int write, uint64_t addr, uint32_t len, uint32_t lkey, uint64_t raddr, uint32_t rkey) {
	struct ibv_sge sge = { .addr = addr, .length = len, .lkey = lkey };
	struct ibv_send_wr wr, *bad = NULL;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = id;
	wr.sg_list = &sge;
	wr.num_sge = 1;
	wr.send_flags = IBV_SEND_SIGNALED;
	if (write) {
		wr.opcode = IBV_WR_RDMA_WRITE;
		wr.wr.rdma.remote_addr = raddr;
		wr.wr.rdma.rkey = rkey;
	} else {
		wr.opcode = IBV_WR_SEND;
	}
	return ibv_post_send(qp, &wr, &bad);
}

static int mg_post_recv(struct ibv_qp *qp, uint64_t id, uint64_t addr, uint32_t len, uint32_t lkey) {
	struct ibv_sge sge = { .addr = addr, .length = len, .lkey = lkey };
	struct ibv_recv_wr wr, *bad = NULL;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = id;
	wr.sg_list = &sge;
	wr.num_sge = 1;
	return ibv_post_recv(qp, &wr, &bad);
}

// mg_poll moves up to n completions into the parallel arrays.
static int mg_poll(struct ibv_cq *cq, int n, uint64_t *ids, int *status, int *op, uint32_t *len) {
	struct ibv_wc wc[64];
	if (n > 64) n = 64;
	int k = ibv_poll_cq(cq, n, wc);
	for (int i = 0; i < k; i++) {
		ids[i] = wc[i].wr_id;
		status[i] = wc[i].status;
		op[i] = wc[i].opcode;
		len[i] = wc[i].byte_len;
	}
	return k;
}

static int mg_req_notify(struct ibv_cq *cq) { return ibv_req_notify_cq(cq, 0); }

static int mg_cq_event(struct ibv_comp_channel *ch) {
	struct ibv_cq *cq;
	void *ctx;
	if (ibv_get_cq_event(ch, &cq, &ctx)) return -errno;
	ibv_ack_cq_events(cq, 1);
	return 0;
}

static struct ibv_mr *mg_reg_mr(struct ibv_pd *pd, void *addr, size_t len, int remote) {
	int acc = IBV_ACCESS_LOCAL_WRITE;
	if (remote) acc |= IBV_ACCESS_REMOTE_WRITE;
	return ibv_reg_mr(pd, addr, len, acc);
}
static uint32_t mg_mr_lkey(struct ibv_mr *m) { return m->lkey; }
static uint32_t mg_mr_rkey(struct ibv_mr *m) { return m->rkey; }
static int mg_comp_fd(struct ibv_comp_channel *ch) { return ch->fd; }
static int mg_cm_fd(struct rdma_event_channel *ch) { return ch->fd; }
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/rdma/verbs"
)

// resolveTimeoutMS is QEMU's RDMA_RESOLVE_TIMEOUT_MS.
const resolveTimeoutMS = 10000

// pollSlice bounds one poll(2) so a cancelled context is seen promptly.
const pollSlice = 100 * time.Millisecond

type provider struct{}

// New returns the rdma-core provider. It does not probe: rdma.Open does.
func New() (verbs.Provider, error) { return provider{}, nil }

func (provider) Name() string { return Name }

// Probe runs ibv_get_device_list.
func (provider) Probe(context.Context) (verbs.Device, error) {
	n := int(C.mg_num_devices())
	if n < 0 {
		// A kernel without RDMA (no ib_uverbs) makes rdma-core fail with
		// ENOSYS here rather than return an empty list.
		return verbs.Device{}, &verbs.NoDeviceError{Provider: Name, Probe: "ibv_get_device_list returned no list", Err: syscall.Errno(-n)}
	}
	if n == 0 {
		return verbs.Device{}, &verbs.NoDeviceError{Provider: Name, Probe: "ibv_get_device_list returned 0 devices"}
	}
	return verbs.Device{Name: "rdma-core", Probe: fmt.Sprintf("ibv_get_device_list returned %d devices", n)}, nil
}

func errnoErr(what string, r C.int) error {
	if r < 0 {
		return fmt.Errorf("rdma verbs: %s: %w", what, syscall.Errno(-r))
	}
	return fmt.Errorf("rdma verbs: %s: %w", what, syscall.Errno(r))
}

// eventChannel is an rdma_cm event channel read without blocking.
type eventChannel struct{ ch *C.struct_rdma_event_channel }

func newEventChannel() (*eventChannel, error) {
	ch := C.rdma_create_event_channel()
	if ch == nil {
		return nil, errnoErr("rdma_create_event_channel", C.int(C.mg_errno()))
	}
	if r := C.mg_nonblock(C.mg_cm_fd(ch)); r < 0 {
		C.rdma_destroy_event_channel(ch)
		return nil, errnoErr("fcntl O_NONBLOCK", r)
	}
	return &eventChannel{ch: ch}, nil
}

// next waits (cancellable) for one event; the caller acks it.
func (e *eventChannel) next(ctx context.Context) (*C.struct_rdma_cm_event, error) {
	fd := int(C.mg_cm_fd(e.ch))
	for {
		var ev *C.struct_rdma_cm_event
		r := C.mg_get_event(e.ch, &ev)
		if r == 0 {
			return ev, nil
		}
		if syscall.Errno(-r) != syscall.EAGAIN {
			return nil, errnoErr("rdma_get_cm_event", r)
		}
		if err := waitFD(ctx, fd); err != nil {
			return nil, err
		}
	}
}

// expect waits for an event of type want on id's channel.
func (e *eventChannel) expect(ctx context.Context, want C.int, what string) (*C.struct_rdma_cm_event, error) {
	ev, err := e.next(ctx)
	if err != nil {
		return nil, err
	}
	if t := C.mg_ev_type(ev); t != want {
		status := C.mg_ev_status(ev)
		var priv []byte
		if t == C.RDMA_CM_EVENT_REJECTED {
			priv = C.GoBytes(C.mg_ev_priv(ev), C.mg_ev_priv_len(ev))
		}
		C.rdma_ack_cm_event(ev)
		if t == C.RDMA_CM_EVENT_REJECTED {
			return nil, &verbs.RejectedError{Reason: string(priv)}
		}
		return nil, fmt.Errorf("rdma verbs: %s: got event %s (status %d)", what, C.GoString(C.rdma_event_str(uint32(t))), int(status))
	}
	return ev, nil
}

func waitFD(ctx context.Context, fd int) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		slice := pollSlice
		if d, ok := ctx.Deadline(); ok && time.Until(d) < slice {
			slice = max(time.Until(d), time.Millisecond)
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(slice/time.Millisecond))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("rdma verbs: poll: %w", err)
		}
		if n > 0 {
			return nil
		}
	}
}

func splitAddr(addr string) (*C.char, *C.char, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("rdma verbs: address %q: %w", addr, err)
	}
	if _, err := strconv.Atoi(port); err != nil {
		return nil, nil, fmt.Errorf("rdma verbs: address %q: port %q is not a number", addr, port)
	}
	var h *C.char
	if host != "" {
		h = C.CString(host)
	}
	return h, C.CString(port), nil
}

func freeAddr(h, p *C.char) {
	if h != nil {
		C.free(unsafe.Pointer(h))
	}
	C.free(unsafe.Pointer(p))
}

type listener struct {
	ec   *eventChannel
	id   *C.struct_rdma_cm_id
	addr string
	cfg  verbs.Config
	mu   sync.Mutex
}

func (p provider) Listen(ctx context.Context, addr string, cfg verbs.Config) (verbs.Listener, error) {
	if _, err := p.Probe(ctx); err != nil {
		return nil, err
	}
	host, port, err := splitAddr(addr)
	if err != nil {
		return nil, err
	}
	defer freeAddr(host, port)
	ec, err := newEventChannel()
	if err != nil {
		return nil, err
	}
	l := &listener{ec: ec, addr: addr, cfg: cfg}
	if C.rdma_create_id(ec.ch, &l.id, nil, C.RDMA_PS_TCP) != 0 {
		err := errnoErr("rdma_create_id", C.int(C.mg_errno()))
		C.rdma_destroy_event_channel(ec.ch)
		return nil, err
	}
	var res *C.struct_rdma_addrinfo
	if r := C.mg_getaddrinfo(host, port, 1, &res); r < 0 {
		_ = l.Close()
		return nil, errnoErr("rdma_getaddrinfo "+addr, r)
	}
	defer C.rdma_freeaddrinfo(res)
	if C.rdma_bind_addr(l.id, C.mg_ai_src(res)) != 0 {
		err := errnoErr("rdma_bind_addr "+addr, C.int(C.mg_errno()))
		_ = l.Close()
		return nil, err
	}
	if C.rdma_listen(l.id, 8) != 0 {
		err := errnoErr("rdma_listen "+addr, C.int(C.mg_errno()))
		_ = l.Close()
		return nil, err
	}
	return l, nil
}

func (l *listener) Addr() net.Addr { return &net.TCPAddr{} }

func (l *listener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.id != nil {
		C.rdma_destroy_id(l.id)
		l.id = nil
	}
	if l.ec != nil {
		C.rdma_destroy_event_channel(l.ec.ch)
		l.ec = nil
	}
	return nil
}

func (l *listener) Next(ctx context.Context) (verbs.Conn, error) {
	ev, err := l.ec.expect(ctx, C.RDMA_CM_EVENT_CONNECT_REQUEST, "waiting for a connection request")
	if err != nil {
		return nil, err
	}
	id := C.mg_ev_id(ev)
	priv := C.GoBytes(C.mg_ev_priv(ev), C.mg_ev_priv_len(ev))
	C.rdma_ack_cm_event(ev)
	ec, err := newEventChannel()
	if err != nil {
		C.rdma_reject(id, nil, 0)
		C.rdma_destroy_id(id)
		return nil, err
	}
	if C.rdma_migrate_id(id, ec.ch) != 0 {
		err := errnoErr("rdma_migrate_id", C.int(C.mg_errno()))
		C.rdma_reject(id, nil, 0)
		C.rdma_destroy_id(id)
		C.rdma_destroy_event_channel(ec.ch)
		return nil, err
	}
	c, err := newConn(ec, id, l.cfg, true)
	if err != nil {
		return nil, err
	}
	c.peer = priv
	return c, nil
}

func (p provider) Resolve(ctx context.Context, addr string, cfg verbs.Config) (verbs.Conn, error) {
	if _, err := p.Probe(ctx); err != nil {
		return nil, err
	}
	host, port, err := splitAddr(addr)
	if err != nil {
		return nil, err
	}
	defer freeAddr(host, port)
	ec, err := newEventChannel()
	if err != nil {
		return nil, err
	}
	var id *C.struct_rdma_cm_id
	if C.rdma_create_id(ec.ch, &id, nil, C.RDMA_PS_TCP) != 0 {
		err := errnoErr("rdma_create_id", C.int(C.mg_errno()))
		C.rdma_destroy_event_channel(ec.ch)
		return nil, err
	}
	fail := func(err error) (verbs.Conn, error) {
		C.rdma_destroy_id(id)
		C.rdma_destroy_event_channel(ec.ch)
		return nil, err
	}
	var res *C.struct_rdma_addrinfo
	if r := C.mg_getaddrinfo(host, port, 0, &res); r < 0 {
		return fail(errnoErr("rdma_getaddrinfo "+addr, r))
	}
	r := C.rdma_resolve_addr(id, nil, C.mg_ai_dst(res), resolveTimeoutMS)
	C.rdma_freeaddrinfo(res)
	if r != 0 {
		return fail(errnoErr("rdma_resolve_addr "+addr, C.int(C.mg_errno())))
	}
	ev, err := ec.expect(ctx, C.RDMA_CM_EVENT_ADDR_RESOLVED, "resolving "+addr)
	if err != nil {
		return fail(err)
	}
	C.rdma_ack_cm_event(ev)
	if C.rdma_resolve_route(id, resolveTimeoutMS) != 0 {
		return fail(errnoErr("rdma_resolve_route "+addr, C.int(C.mg_errno())))
	}
	ev, err = ec.expect(ctx, C.RDMA_CM_EVENT_ROUTE_RESOLVED, "resolving the route to "+addr)
	if err != nil {
		return fail(err)
	}
	C.rdma_ack_cm_event(ev)
	return newConn(ec, id, cfg, false)
}

// conn is one rdma_cm connection with its PD, CQ (+ completion channel)
// and QP. mu guards err, mrs and pending.
type conn struct {
	ec      *eventChannel
	id      *C.struct_rdma_cm_id
	pd      *C.struct_ibv_pd
	ch      *C.struct_ibv_comp_channel
	cq      *C.struct_ibv_cq
	qp      *C.struct_ibv_qp
	passive bool
	peer    []byte

	mu      sync.Mutex
	err     error
	mrs     map[*mr]bool
	pending []verbs.Completion
	closed  bool
}

func newConn(ec *eventChannel, id *C.struct_rdma_cm_id, cfg verbs.Config, passive bool) (*conn, error) {
	c := &conn{ec: ec, id: id, passive: passive, mrs: map[*mr]bool{}}
	if cfg.SendDepth <= 0 {
		cfg.SendDepth = 128
	}
	if cfg.RecvDepth <= 0 {
		cfg.RecvDepth = 128
	}
	ctx := C.mg_id_verbs(id)
	if c.pd = C.ibv_alloc_pd(ctx); c.pd == nil {
		err := errnoErr("ibv_alloc_pd", C.int(C.mg_errno()))
		_ = c.Close()
		return nil, err
	}
	if c.ch = C.ibv_create_comp_channel(ctx); c.ch == nil {
		err := errnoErr("ibv_create_comp_channel", C.int(C.mg_errno()))
		_ = c.Close()
		return nil, err
	}
	if r := C.mg_nonblock(C.mg_comp_fd(c.ch)); r < 0 {
		_ = c.Close()
		return nil, errnoErr("fcntl O_NONBLOCK", r)
	}
	if c.cq = C.ibv_create_cq(ctx, C.int(cfg.SendDepth+cfg.RecvDepth), nil, c.ch, 0); c.cq == nil {
		err := errnoErr("ibv_create_cq", C.int(C.mg_errno()))
		_ = c.Close()
		return nil, err
	}
	if r := C.mg_create_qp(id, c.pd, c.cq, C.int(cfg.SendDepth), C.int(cfg.RecvDepth)); r < 0 {
		_ = c.Close()
		return nil, errnoErr("rdma_create_qp", r)
	}
	c.qp = C.mg_id_qp(id)
	return c, nil
}

func (c *conn) PD() verbs.PD         { return (*pdT)(c) }
func (c *conn) QP() verbs.QP         { return (*qpT)(c) }
func (c *conn) CQ() verbs.CQ         { return (*cqT)(c) }
func (c *conn) PeerData() []byte     { return c.peer }
func (c *conn) LocalAddr() net.Addr  { return &net.TCPAddr{} }
func (c *conn) RemoteAddr() net.Addr { return &net.TCPAddr{} }

func (c *conn) setErr(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

func (c *conn) establish(ctx context.Context, private []byte, passive bool) ([]byte, error) {
	if len(private) > verbs.MaxPrivateData {
		return nil, fmt.Errorf("rdma verbs: %d bytes of private data, at most %d", len(private), verbs.MaxPrivateData)
	}
	var p unsafe.Pointer
	if len(private) > 0 {
		p = C.CBytes(private)
		defer C.free(p)
	}
	what := "rdma_connect"
	pass := C.int(0)
	if passive {
		what, pass = "rdma_accept", 1
	}
	if r := C.mg_connect(c.id, p, C.int(len(private)), pass); r < 0 {
		return nil, errnoErr(what, r)
	}
	ev, err := c.ec.expect(ctx, C.RDMA_CM_EVENT_ESTABLISHED, what)
	if err != nil {
		return nil, err
	}
	peer := C.GoBytes(C.mg_ev_priv(ev), C.mg_ev_priv_len(ev))
	C.rdma_ack_cm_event(ev)
	return peer, nil
}

func (c *conn) Connect(ctx context.Context, private []byte) ([]byte, error) {
	if c.passive {
		return nil, errors.New("rdma verbs: Connect on a passive connection")
	}
	return c.establish(ctx, private, false)
}

func (c *conn) Accept(ctx context.Context, private []byte) error {
	if !c.passive {
		return errors.New("rdma verbs: Accept on an active connection")
	}
	_, err := c.establish(ctx, private, true)
	return err
}

func (c *conn) Reject(ctx context.Context, reason string) error {
	r := []byte(reason)
	if len(r) > verbs.MaxPrivateData {
		r = r[:verbs.MaxPrivateData]
	}
	var p unsafe.Pointer
	if len(r) > 0 {
		p = C.CBytes(r)
		defer C.free(p)
	}
	var err error
	if C.rdma_reject(c.id, p, C.uchar(len(r))) != 0 {
		err = errnoErr("rdma_reject", C.int(C.mg_errno()))
	}
	_ = c.Close()
	return err
}

// Close disconnects and destroys the QP, CQ, channel, MRs, PD and id.
func (c *conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	mrs := c.mrs
	c.mrs = nil
	c.mu.Unlock()
	if c.qp != nil {
		C.rdma_disconnect(c.id)
		C.rdma_destroy_qp(c.id)
	}
	for m := range mrs {
		C.ibv_dereg_mr(m.mr)
	}
	if c.cq != nil {
		C.ibv_destroy_cq(c.cq)
	}
	if c.ch != nil {
		C.ibv_destroy_comp_channel(c.ch)
	}
	if c.pd != nil {
		C.ibv_dealloc_pd(c.pd)
	}
	C.rdma_destroy_id(c.id)
	C.rdma_destroy_event_channel(c.ec.ch)
	c.setErr(errors.New("rdma verbs: connection closed locally"))
	return nil
}

type pdT conn

type mr struct {
	c    *conn
	mr   *C.struct_ibv_mr
	addr uint64
	n    uint64
}

func (p *pdT) Register(buf []byte, access verbs.Access) (verbs.MR, error) {
	c := (*conn)(p)
	if len(buf) == 0 {
		return nil, errors.New("rdma verbs: register: empty buffer")
	}
	remote := C.int(0)
	if access&verbs.AccessRemoteWrite != 0 {
		remote = 1
	}
	// buf must be mmap'd memory (guest RAM, control arenas): the device
	// keeps its address, so it must never be Go heap memory.
	ptr := unsafe.Pointer(unsafe.SliceData(buf))
	m := C.mg_reg_mr(c.pd, ptr, C.size_t(len(buf)), remote)
	if m == nil {
		return nil, errnoErr(fmt.Sprintf("ibv_reg_mr of %d bytes (check ulimit -l)", len(buf)), C.int(C.mg_errno()))
	}
	r := &mr{c: c, mr: m, addr: uint64(uintptr(ptr)), n: uint64(len(buf))}
	c.mu.Lock()
	if c.mrs == nil {
		c.mu.Unlock()
		C.ibv_dereg_mr(m)
		return nil, errors.New("rdma verbs: register on a closed connection")
	}
	c.mrs[r] = true
	c.mu.Unlock()
	return r, nil
}

func (m *mr) LKey() uint32 { return uint32(C.mg_mr_lkey(m.mr)) }
func (m *mr) RKey() uint32 { return uint32(C.mg_mr_rkey(m.mr)) }
func (m *mr) Addr() uint64 { return m.addr }
func (m *mr) Len() uint64  { return m.n }
func (m *mr) Deregister() error {
	m.c.mu.Lock()
	if !m.c.mrs[m] {
		m.c.mu.Unlock()
		return nil // the connection's Close already deregistered it
	}
	delete(m.c.mrs, m)
	m.c.mu.Unlock()
	if r := C.ibv_dereg_mr(m.mr); r != 0 {
		return errnoErr("ibv_dereg_mr", r)
	}
	return nil
}

type qpT conn

func (q *qpT) Err() error {
	c := (*conn)(q)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (q *qpT) PostSend(wr verbs.SendWR) error {
	c := (*conn)(q)
	write := C.int(0)
	switch wr.Op {
	case verbs.OpWrite:
		write = 1
	case verbs.OpSend:
	default:
		return fmt.Errorf("rdma verbs: PostSend with opcode %v", wr.Op)
	}
	r := C.mg_post_send(c.qp, C.uint64_t(wr.ID), write, C.uint64_t(wr.Local.Addr), C.uint32_t(wr.Local.Length),
		C.uint32_t(wr.Local.LKey), C.uint64_t(wr.RemoteAddr), C.uint32_t(wr.RKey))
	if r == C.ENOMEM {
		return verbs.ErrQueueFull
	}
	if r != 0 {
		return errnoErr("ibv_post_send", r)
	}
	return nil
}

func (q *qpT) PostRecv(wr verbs.RecvWR) error {
	c := (*conn)(q)
	r := C.mg_post_recv(c.qp, C.uint64_t(wr.ID), C.uint64_t(wr.Local.Addr), C.uint32_t(wr.Local.Length), C.uint32_t(wr.Local.LKey))
	if r == C.ENOMEM {
		return verbs.ErrQueueFull
	}
	if r != 0 {
		return errnoErr("ibv_post_recv", r)
	}
	return nil
}

type cqT conn

func status(s C.int) (verbs.Status, error) {
	switch s {
	case C.IBV_WC_SUCCESS:
		return verbs.StatusSuccess, nil
	case C.IBV_WC_LOC_PROT_ERR:
		return verbs.StatusLocalProt, verbs.ErrLocalProtection
	case C.IBV_WC_LOC_LEN_ERR:
		return verbs.StatusLocalLength, verbs.ErrTooLong
	case C.IBV_WC_REM_ACCESS_ERR:
		return verbs.StatusRemoteAccess, &verbs.AccessError{Reason: "the peer's device refused it (IBV_WC_REM_ACCESS_ERR)", Remote: true}
	case C.IBV_WC_REM_INV_REQ_ERR:
		return verbs.StatusRemoteInvalid, errors.New("rdma verbs: remote invalid request (IBV_WC_REM_INV_REQ_ERR)")
	case C.IBV_WC_RNR_RETRY_EXC_ERR:
		return verbs.StatusRNR, verbs.ErrRNR
	case C.IBV_WC_WR_FLUSH_ERR:
		return verbs.StatusFlushed, verbs.ErrConnLost
	}
	return verbs.StatusTransport, fmt.Errorf("%w: %s", verbs.ErrConnLost, C.GoString(C.ibv_wc_status_str(uint32(s))))
}

func opcode(o C.int) verbs.Opcode {
	switch o {
	case C.IBV_WC_RDMA_WRITE:
		return verbs.OpWrite
	case C.IBV_WC_RECV:
		return verbs.OpRecv
	}
	return verbs.OpSend
}

// fill polls the device CQ into c.pending; mu must be held.
func (c *conn) fill() {
	var ids [64]C.uint64_t
	var st, op [64]C.int
	var ln [64]C.uint32_t
	k := int(C.mg_poll(c.cq, 64, &ids[0], &st[0], &op[0], &ln[0]))
	for i := 0; i < k; i++ {
		s, err := status(st[i])
		if err != nil && c.err == nil {
			c.err = err
		}
		if s == verbs.StatusFlushed && c.err != nil {
			err = c.err
		}
		c.pending = append(c.pending, verbs.Completion{ID: uint64(ids[i]), Op: opcode(op[i]), Status: s, ByteLen: uint32(ln[i]), Err: err})
	}
}

func (q *cqT) Poll(wc []verbs.Completion) int {
	c := (*conn)(q)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.pending) == 0 && !c.closed {
		c.fill()
	}
	n := copy(wc, c.pending)
	c.pending = append(c.pending[:0], c.pending[n:]...)
	return n
}

// Wait arms the CQ's notification and waits on the completion channel and
// the connection's event channel (a DISCONNECTED event moves the QP to
// error), in slices of pollSlice so ctx is honoured.
func (q *cqT) Wait(ctx context.Context) error {
	c := (*conn)(q)
	for {
		c.mu.Lock()
		if !c.closed {
			c.fill()
			if len(c.pending) == 0 {
				C.mg_req_notify(c.cq)
				c.fill() // completions that raced the arming
			}
		}
		ready := len(c.pending) > 0 || c.err != nil
		closed := c.closed
		c.mu.Unlock()
		if ready || closed {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fds := []unix.PollFd{{Fd: int32(C.mg_comp_fd(c.ch)), Events: unix.POLLIN}, {Fd: int32(C.mg_cm_fd(c.ec.ch)), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, int(pollSlice/time.Millisecond)); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("rdma verbs: poll: %w", err)
		}
		if fds[0].Revents&unix.POLLIN != 0 {
			C.mg_cq_event(c.ch)
		}
		if fds[1].Revents&unix.POLLIN != 0 {
			var ev *C.struct_rdma_cm_event
			if C.mg_get_event(c.ec.ch, &ev) == 0 {
				t := C.mg_ev_type(ev)
				C.rdma_ack_cm_event(ev)
				switch t {
				case C.RDMA_CM_EVENT_DISCONNECTED:
					c.setErr(verbs.ErrDisconnected)
				case C.RDMA_CM_EVENT_DEVICE_REMOVAL:
					c.setErr(fmt.Errorf("%w: the RDMA device was removed", verbs.ErrConnLost))
				}
			}
		}
	}
}
