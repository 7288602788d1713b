package engine

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/multifd"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// multifdSink sends pages as QEMU's multifd does: the scanner's pages are
// batched per RAM block, PagesPerPacket at most, and each batch goes to the
// next idle channel (a blocked channel holds only its own batch: the others
// keep taking work). At the end of a pass every channel writes a sync
// packet after what it queued, the sink waits for all of them, and then
// the main stream carries the FLUSH record: the destination's barrier
// between passes. Zero pages the main channel found (legacy) go as ZERO
// records on the main stream; under zero-page-detection multifd the
// channels find them and list them in their packets.
type multifdSink struct {
	enc   *stream.Encoder
	main  ramSink // the main stream's RAM section (streamSink)
	chans []*mfChannel
	jobs  chan mfJob // to the channel goroutines; nil once closed
	num   atomic.Uint64
	zero  multifd.ZeroPageDetection
	ps    uint64
	per   int

	// the batch being filled (owned by the migration goroutine)
	block *guest.Block
	batch []uint64

	wg      sync.WaitGroup
	failed  chan struct{} // closed at a channel's first error
	errOnce sync.Once
	err     error           // the first channel error; read after failed is closed
	ctx     context.Context // the migration's I/O context: a cancel or a stall ends every wait
}

// mfChannel is one multifd connection and its writer goroutine's counters.
type mfChannel struct {
	id   int
	conn transport.Conn
	w    *multifd.Writer
	// syncs asks this channel (and no other) for its sync packet: every
	// channel writes exactly one per pass, after the batches it took.
	syncs chan mfJob
}

// mfJob is a batch for a channel, or (sync) a request for a sync packet,
// answered on done.
type mfJob struct {
	block *guest.Block
	pages []uint64 // page numbers
	sync  bool
	num   uint64
	done  chan<- error
}

// openMultifd dials the multifd channels of this migration (multifd-channels
// of them, after the main channel carried the handshake), writes each one's
// initial packet and starts its writer goroutine.
func (s *sender) openMultifd(cfg guards.Config, pageSize uint64) (*multifdSink, error) {
	m := s.m
	n, err := strconv.Atoi(cfg.Params["multifd-channels"])
	if err != nil || n < 1 {
		return nil, fmt.Errorf("multifd-channels %q: want a channel count of at least 1", cfg.Params["multifd-channels"])
	}
	comp, err := multifd.ParseCompression(cfg.Params["multifd-compression"])
	if err != nil {
		return nil, err
	}
	level := 0
	switch comp {
	case multifd.CompressionZlib:
		level, _ = strconv.Atoi(cfg.Params["multifd-zlib-level"])
	case multifd.CompressionZstd:
		level, _ = strconv.Atoi(cfg.Params["multifd-zstd-level"])
	}
	blocks := map[string]uint64{}
	for _, b := range s.blocks {
		blocks[b.Name] = uint64(len(b.Mem))
	}
	k := &multifdSink{
		enc: s.enc, main: &streamSink{enc: s.enc}, zero: s.zeroMode, ps: pageSize,
		per: multifd.PagesPerPacket(pageSize), jobs: make(chan mfJob), failed: make(chan struct{}),
		ctx: m.ioCtx,
	}
	var uuid [16]byte // the guest's UUID: all zero until guests carry one (QEMU without -uuid)
	for id := range n {
		conn, err := m.opts.Dial(m.ioCtx, m.addr)
		if err != nil {
			k.close()
			return nil, fmt.Errorf("connect multifd channel %d of %d to %s: %w", id, n, m.addr, err)
		}
		w, err := multifd.NewWriter(conn, multifd.WriterOptions{PageSize: pageSize, Blocks: blocks, Compression: comp, Level: level})
		if err == nil {
			err = w.WriteInit(multifd.Init{UUID: uuid, Channel: uint8(id)})
		}
		if err != nil {
			conn.Close()
			k.close()
			return nil, fmt.Errorf("multifd channel %d: %w", id, err)
		}
		ch := &mfChannel{id: id, conn: conn, w: w, syncs: make(chan mfJob)}
		k.chans = append(k.chans, ch)
		k.wg.Add(1)
		go k.run(ch, k.jobs, m.opts.MultifdHook)
	}
	return k, nil
}

// run is a channel's writer goroutine: it takes batches from the shared
// queue (whichever channel is idle takes the next) and its own sync
// requests, until the queue closes.
func (k *multifdSink) run(ch *mfChannel, jobs <-chan mfJob, hook func(channel int)) {
	defer k.wg.Done()
	for {
		var j mfJob
		var ok bool
		select {
		case j, ok = <-jobs:
		case j, ok = <-ch.syncs:
		}
		if !ok {
			return
		}
		if hook != nil {
			hook(ch.id)
		}
		err := k.write(ch, j)
		if j.done != nil {
			j.done <- err
		}
		if err != nil {
			k.fail(fmt.Errorf("multifd channel %d: %w", ch.id, err))
		}
	}
}

func (k *multifdSink) write(ch *mfChannel, j mfJob) error {
	if j.sync {
		return ch.w.WriteSync(j.num)
	}
	b := j.block
	ps := uint64(b.PageSize)
	offs := make([]uint64, len(j.pages))
	pages := make([][]byte, len(j.pages))
	for i, p := range j.pages {
		offs[i] = uint64(p) * ps
		pages[i] = b.Page(int(p))
	}
	normal := len(offs)
	if k.zero == multifd.ZeroMultifd {
		normal = multifd.Partition(offs, pages, multifd.IsZero)
	}
	return ch.w.Write(&multifd.Batch{Num: j.num, Block: b.Name, Normal: offs[:normal], Pages: pages[:normal], Zero: offs[normal:]})
}

func (k *multifdSink) fail(err error) {
	k.errOnce.Do(func() {
		k.err = err
		close(k.failed)
		for _, ch := range k.chans {
			ch.conn.Close() // unblock the other channels' writes
		}
	})
}

// failure returns the first channel error, if any.
func (k *multifdSink) failure() error {
	select {
	case <-k.failed:
		return k.err
	default:
		return nil
	}
}

// dispatch hands the batch being filled to the next idle channel.
func (k *multifdSink) dispatch() error {
	if len(k.batch) == 0 {
		return nil
	}
	j := mfJob{block: k.block, pages: k.batch, num: k.num.Add(1)}
	k.batch = nil
	select {
	case k.jobs <- j:
		return nil
	case <-k.failed:
		return k.err
	case <-k.ctx.Done():
		return context.Cause(k.ctx)
	}
}

func (k *multifdSink) begin(final bool) error { return k.main.begin(final) }

func (k *multifdSink) put(b *guest.Block, p int, zero bool) (int, error) {
	if zero {
		return k.main.put(b, p, true)
	}
	if k.block != b || len(k.batch) == k.per {
		if err := k.dispatch(); err != nil {
			return 0, err
		}
		k.block = b
		k.batch = make([]uint64, 0, k.per)
	}
	k.batch = append(k.batch, uint64(p))
	return b.PageSize + 8, k.failure()
}

func (k *multifdSink) boundary() error {
	if err := k.failure(); err != nil {
		return err
	}
	return k.main.boundary()
}

// end syncs every channel (multifd_ram_flush_and_sync), then writes the
// FLUSH record on the main stream. The final pass also ends the channels:
// each is half-closed once synced, so the destination reads EOF after the
// last page.
func (k *multifdSink) end(final bool) error {
	if err := k.dispatch(); err != nil {
		return err
	}
	done := make(chan error, len(k.chans))
	for _, ch := range k.chans {
		select {
		case ch.syncs <- mfJob{sync: true, num: k.num.Add(1), done: done}:
		case <-k.failed:
			return k.err
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
	}
	var errs []error
	for range k.chans {
		select {
		case err := <-done:
			if err != nil {
				errs = append(errs, err)
			}
		case <-k.failed:
			return k.err
		case <-k.ctx.Done():
			return context.Cause(k.ctx)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := k.enc.PutFlush(); err != nil {
		return err
	}
	if final {
		k.closeChannels(true)
	}
	return k.main.end(final)
}

// closeChannels stops the writer goroutines and closes the channels
// (half-closing first when clean, so the destination reads EOF).
func (k *multifdSink) closeChannels(clean bool) {
	if k.jobs == nil {
		return
	}
	close(k.jobs)
	for _, ch := range k.chans {
		close(ch.syncs)
	}
	k.jobs = nil
	k.wg.Wait()
	for _, ch := range k.chans {
		if clean {
			_ = ch.conn.CloseWrite()
		}
		_ = ch.w.Close()
	}
}

func (k *multifdSink) sent() uint64 {
	var n uint64
	for _, ch := range k.chans {
		n += ch.w.Stats().Bytes
	}
	return n
}

func (k *multifdSink) zeros() uint64 {
	var n uint64
	for _, ch := range k.chans {
		n += ch.w.Stats().ZeroPages
	}
	return n
}

// close ends every channel; on the error path it unblocks writers first.
func (k *multifdSink) close() error {
	if k.jobs != nil {
		k.fail(errors.New("the migration ended")) // closes the connections: blocked writes return
		k.closeChannels(false)
	}
	for _, ch := range k.chans {
		ch.conn.Close()
	}
	return nil
}
