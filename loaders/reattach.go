package loaders

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/host"
	"github.com/migctl/migctl/internal/watchdog"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/postcopy"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// Reattach takes over the postcopy migration of a guest whose migctl died
// (`migctl serve --destination --reattach unix:SOCKET`): g is the guest
// process this new migctl attached to (a guest.Postcopier whose RAM is
// registered for MISSING faults and whose received bitmap lives in shared
// memory, package guest/proc).
//
// It fires reattach (none → postcopy-paused), rebuilds the received bitmap
// (the shared bitmap, reconciled with the memfds by
// postcopy.Service.Rebuild, never reading a hole), starts the fault
// service on the guest's userfaultfd, wakes the faults the dead migctl had
// read but not resolved (they are raised again and queued for the
// recovery), and waits, paused, for migrate-recover (Incoming.Recover) and
// the source's resume: from there on the run is the same as after a cut
// link. The guest's devices were loaded into the guest process before the
// death (the postcopy package), and are not sent again.
//
// Reattach is for a guest past POSTCOPY_LISTEN only: a source whose
// migration is not postcopy-paused refuses the resume, and the side then
// stays paused until the process ends.
func Reattach(ctx context.Context, c *machine.Controller, g guest.Guest, opts Options) (*Incoming, error) {
	pg, ok := g.(guest.Postcopier)
	if !ok {
		return nil, errors.New("reattach needs a guest whose vCPUs run in a process of their own (guest.Postcopier; migctl serve --reattach unix:SOCKET of a guest process)")
	}
	blocks := g.Blocks()
	if len(blocks) == 0 {
		return nil, errors.New("reattach: the guest has no RAM block")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.StatsInterval <= 0 {
		opts.StatsInterval = 100 * time.Millisecond
	}
	if opts.Listen == nil { // migrate-recover's listener
		opts.Listen = listenWithRAM(opts.Transport, g)
	}
	in := &Incoming{c: c, g: g, opts: opts, log: opts.Logger, ln: noListener{}, done: make(chan struct{}), pfDone: make(chan struct{})}
	close(in.pfDone) // nothing is pre-faulted: the guest's holes stay holes
	in.ioCtx, in.cancelIO = context.WithCancelCause(context.WithoutCancel(ctx))
	l := &loader{in: in, start: time.Now(), dog: watchdog.New()}
	pc, err := l.prepareReattach(pg)
	if err != nil {
		return nil, err
	}
	// The run is a postcopy migration: its capability says so (the other
	// capabilities are this process's, frozen from here on).
	if err := c.SetCapabilities(ctx, map[string]bool{"postcopy-ram": true}); err != nil {
		_ = pc.ufd.Close()
		return nil, fmt.Errorf("reattach: %w", err)
	}
	if _, err := c.Fire(ctx, spec.Incoming, machine.TriggerReattach, &machine.Args{Reason: "reattached to the guest process"}); err != nil {
		_ = pc.ufd.Close()
		return nil, err
	}
	in.pcMu.Lock()
	in.pc = pc
	in.pcMu.Unlock()
	go in.runReattached(l)
	return in, nil
}

// prepareReattach builds the loader's tables and the postcopy state of a
// reattached run, its fault service not running yet, the bitmap rebuilt.
func (l *loader) prepareReattach(g guest.Postcopier) (*pcIn, error) {
	in := l.in
	blocks := in.g.Blocks()
	l.recv = newReceived(blocks)
	l.blocks = map[string]*guest.Block{}
	l.index = map[string]int{}
	for i, b := range blocks {
		l.blocks[b.Name] = b
		l.index[b.Name] = i
		l.stats.Total += uint64(len(b.Mem))
	}
	l.stats.PageSize = uint64(blocks[0].PageSize)
	// The handshake went to the dead migctl: this run knows none (a stray
	// OPEN_RETURN_PATH in the resumed stream finds no extension), and the
	// resumed channel carries the return path, as every postcopy channel.
	l.hs = &stream.Handshake{}
	l.rp = true
	l.devs = map[string]guest.Device{}
	for _, d := range in.g.Devices() {
		l.devs[d.Name()+"\x00"+strconv.FormatUint(uint64(d.Instance()), 10)] = d
	}
	pc := &pcIn{l: l, blocks: blocks, reqWake: make(chan struct{}, 1), lnCh: make(chan transport.Listener)}
	pc.pageSize = int(l.stats.PageSize)
	pc.zeroPage = make([]byte, pc.pageSize)
	pc.scratch = make([]byte, pc.pageSize)
	// LISTEN and the package were processed by the dead migctl: pages go
	// in with UFFDIO_COPY, and a failure pauses.
	pc.listened = true
	pc.ponged.Store(true)
	if r, ok := in.g.(interface{ Running() bool }); ok {
		pc.started = r.Running()
	}
	svc, fd, err := postcopy.FromGuest(g, postcopy.Options{Request: pc.request, Batch: in.opts.PostcopyBatch})
	if err != nil {
		return nil, fmt.Errorf("reattach: %w", err)
	}
	pc.svc, pc.ufd = svc, fd
	marked, cleared, err := svc.Rebuild()
	if err != nil {
		fd.Close()
		return nil, fmt.Errorf("reattach: rebuilding the received bitmap: %w", err)
	}
	received := 0
	for i := range blocks {
		received += svc.ReceivedCount(i)
	}
	in.log.Warn("reattached to the guest process", "pages_received", received, "pages_missing", pc.missing(),
		"marked_from_memfd", marked, "cleared_holes", cleared, "guest_running", pc.started)
	l.pc = pc
	return pc, nil
}

// runReattached is the loader goroutine of a reattached run: the fault
// service starts, orphaned faults are raised again, and the side waits,
// paused, for a recovery.
func (in *Incoming) runReattached(l *loader) {
	defer close(in.done)
	host.LowerThreadPriority()
	stopInterrupt := context.AfterFunc(in.ioCtx, l.interrupt)
	defer stopInterrupt()
	l.finish(l.reattached())
}

func (l *loader) reattached() error {
	in, pc := l.in, l.pc
	ctx, cancel := context.WithCancel(in.ioCtx)
	pc.svcCancel = cancel
	pc.svcDone = make(chan error, 1)
	go func() { pc.svcDone <- pc.svc.Run(ctx) }()
	pc.reqDone = make(chan struct{})
	go pc.requester(ctx)
	// Faults the dead migctl read but never resolved are raised again: the
	// service queues their requests until the recovery's link is ready.
	if err := pc.svc.WakeAll(); err != nil {
		return err
	}
	if pc.started {
		// The guest graph of this new process starts in inmigrate; the
		// guest has been running on this side since POSTCOPY_RUN.
		if _, err := in.c.Fire(context.Background(), spec.Guest, machine.TriggerArrive, nil); err != nil {
			in.log.Error("the guest graph refused arrive", "err", err)
		}
	}
	l.publish(true, nil)
	lim := stream.Limits{Blocks: map[string]uint64{}, PageSize: l.stats.PageSize}
	for _, b := range pc.blocks {
		lim.Blocks[b.Name] = uint64(len(b.Mem))
	}
	postcopyLimits(in.g, &lim)
	return l.postcopyLoop(stream.NewReattachedDecoder(lim), nil)
}

// noListener stands for the initial listener a reattached run never had.
type noListener struct{}

func (noListener) Accept(context.Context) (transport.Conn, error) {
	return nil, errors.New("a reattached destination accepts channels only after migrate-recover")
}
func (noListener) Addr() transport.Addr { return transport.Addr{} }
func (noListener) Close() error         { return nil }
