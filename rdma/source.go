package rdma

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/migctl/migctl/rdma/control"
	"github.com/migctl/migctl/rdma/verbs"
)

const (
	chunkShift  = control.ChunkShift
	chunkSize   = control.ChunkSize
	stageSlots  = 8
	maxNameLen  = 255
	reserveSend = 8
)

func verbsConfig(o Options) verbs.Config {
	c := o.Credits
	return verbs.Config{
		SendDepth: o.MaxWrites + (c + 2) + replySlots + c + reserveSend,
		RecvDepth: 2*c + replySlots + 2,
	}
}

func checkBlocks(blocks []Block) error {
	if len(blocks) == 0 {
		return errors.New("rdma: no RAM blocks given")
	}
	if len(blocks) > control.MaxBlocks {
		return fmt.Errorf("rdma: %d RAM blocks, at most %d", len(blocks), control.MaxBlocks)
	}
	seen := map[string]bool{}
	for _, b := range blocks {
		if b.Name == "" || len(b.Name) > maxNameLen {
			return fmt.Errorf("rdma: RAM block name %q: want 1..%d bytes", b.Name, maxNameLen)
		}
		if seen[b.Name] {
			return fmt.Errorf("rdma: RAM block %q listed twice", b.Name)
		}
		if len(b.Mem) == 0 {
			return fmt.Errorf("rdma: RAM block %q has no memory", b.Name)
		}
		seen[b.Name] = true
	}
	return nil
}

type srcBlock struct {
	name       string
	mem        []byte
	addr       uint64
	remote     control.DestBlock
	remoteHost uint64
	rkeys      []uint32 // per destination chunk, valid where registered is set
	registered []bool
	localMR    []verbs.MR // per local chunk (on demand)
	wholeMR    verbs.MR   // pin-all
}

type pendWrite struct {
	active bool
	bi     int
	off    uint64 // offset in the block
	n      uint64
	src    uint64 // local address
	lkey   uint32
	rkey   uint32
	stage  int // staging slot, -1 for a direct or zero write
	zero   bool
}

// SourceStats counts what a Source did.
type SourceStats struct {
	Writes        uint64 // RDMA WRITEs posted
	BytesWritten  uint64 // bytes carried by them
	Compressed    uint64 // COMPRESS messages (all-zero ranges into unregistered chunks)
	Registrations uint64 // REGISTER_REQUEST round trips
	LocalRegs     uint64 // local registrations (chunks, or blocks with pin-all)
	Copied        uint64 // bytes copied into staging buffers (data outside Options.Blocks)
}

// Source is the outgoing side of an RDMA migration channel: a byte stream
// carried as QEMU_FILE messages (Write, Flush; Read is the return path) and
// RAM written with one-sided RDMA WRITEs into the destination's memory
// (WriteRAM, WriteZero, Sync).
//
// Write, Flush, WriteRAM, WriteZero and Sync may be called from several
// goroutines; they are serialised, and what one goroutine issues reaches the
// destination in its order. Read may run concurrently with them.
type Source struct {
	e      *endpoint
	pinAll bool
	blocks []srcBlock
	byName map[string]int

	// Guarded by e.sendMu.
	blocksDue bool // RAM_BLOCKS_REQUEST sent, its result not adopted yet
	pend      pendWrite
	stage     []byte
	stageMR   verbs.MR
	zero      []byte
	zeroMR    verbs.MR
	localPD   verbs.PD
	closeErr  error

	readMu  chan struct{} // a one-token lock held by Read (Close takes it too)
	writes  atomic.Uint64
	bytes   atomic.Uint64
	comps   atomic.Uint64
	regs    atomic.Uint64
	lregs   atomic.Uint64
	copied  atomic.Uint64
	closing atomic.Bool
}

// Dial connects to the destination listening at addr ("host:port",
// "[v6]:port") through provider p, negotiates rdma-pin-all in the
// connection's private data (RDMACapabilities), and fetches the
// destination's RAM block table (RAM_BLOCKS_REQUEST/RESULT), checking it
// matches opts.Blocks. ctx bounds the whole setup.
func Dial(ctx context.Context, p verbs.Provider, addr string, opts Options) (*Source, error) {
	opts = opts.withDefaults()
	if err := checkBlocks(opts.Blocks); err != nil {
		return nil, err
	}
	conn, err := p.Resolve(ctx, addr, verbsConfig(opts))
	if err != nil {
		return nil, fmt.Errorf("rdma: dial %s: %w", addr, err)
	}
	e, err := newEndpoint(conn, opts, "source", "destination")
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	caps := control.Caps{Version: control.Version}
	if opts.PinAll {
		caps.Flags |= control.CapPinAll
	}
	peer, err := conn.Connect(ctx, control.AppendCaps(nil, caps))
	if err != nil {
		_ = conn.Close()
		e.release()
		return nil, fmt.Errorf("rdma: dial %s: %w", addr, err)
	}
	pc, err := control.ParseCaps(peer)
	if err == nil && pc.Version != control.Version {
		err = fmt.Errorf("rdma: the destination answered RDMA protocol version %d, want %d", pc.Version, control.Version)
	}
	if err != nil {
		_ = conn.Close()
		e.release()
		return nil, err
	}
	s := &Source{e: e, pinAll: opts.PinAll && pc.Flags&control.CapPinAll != 0, byName: map[string]int{},
		localPD: conn.PD(), readMu: make(chan struct{}, 1)}
	e.start()
	names := make([]string, len(opts.Blocks))
	for i, b := range opts.Blocks {
		names[i] = b.Name
		s.byName[b.Name] = i
		s.blocks = append(s.blocks, srcBlock{name: b.Name, mem: b.Mem, addr: addrOf(b.Mem)})
	}
	if s.pinAll {
		for i := range s.blocks {
			b := &s.blocks[i]
			mr, err := s.localPD.Register(b.mem, 0)
			if err != nil {
				err = fmt.Errorf("rdma: pin-all: registering source block %q (%d bytes): %w", b.name, len(b.mem), err)
				e.fail(err, true)
				_ = s.Close()
				return nil, err
			}
			b.wholeMR = mr
			s.lregs.Add(1)
		}
	}
	e.sendMu.Lock()
	err = e.postRequest(ctx, control.Message{Type: control.TypeRAMBlocksRequest, Names: names}, control.TypeRAMBlocksResult)
	if err == nil {
		s.blocksDue = true
		if !opts.LazyBlocks {
			err = s.ensureBlocks(ctx)
		}
	}
	e.sendMu.Unlock()
	if err != nil {
		_ = s.Close()
		return nil, fmt.Errorf("rdma: dial %s: %w", addr, err)
	}
	return s, nil
}

// ensureBlocks waits for the RAM_BLOCKS_RESULT Dial asked for, if it has
// not arrived yet, and adopts the destination's block table. sendMu must
// be held.
func (s *Source) ensureBlocks(ctx context.Context) error {
	if !s.blocksDue {
		return nil
	}
	m, err := s.e.awaitReply(ctx, control.TypeRAMBlocksResult)
	if err != nil {
		return err
	}
	s.blocksDue = false
	if err := s.adopt(m.Blocks); err != nil {
		s.e.fail(err, true)
		return err
	}
	return nil
}

func (s *Source) adopt(remote []control.DestBlock) error {
	if len(remote) != len(s.blocks) {
		return &LayoutError{Reason: fmt.Sprintf("the source has %d blocks, the destination %d", len(s.blocks), len(remote))}
	}
	for i := range s.blocks {
		b := &s.blocks[i]
		r := remote[i]
		if r.Length != uint64(len(b.mem)) {
			return &LayoutError{Reason: fmt.Sprintf("block %q is %d bytes here and %d at the destination", b.name, len(b.mem), r.Length)}
		}
		n := (r.Length + chunkSize - 1) >> chunkShift
		b.remote, b.remoteHost = r, r.HostAddr
		b.rkeys, b.registered = make([]uint32, n), make([]bool, n)
		b.localMR = make([]verbs.MR, (uint64(len(b.mem))+chunkSize-1)>>chunkShift)
	}
	return nil
}

// PinAll reports whether rdma-pin-all is in force (asked by Options.PinAll
// and accepted by the destination).
func (s *Source) PinAll() bool { return s.pinAll }

// Err returns the error that failed the channel, or nil.
func (s *Source) Err() error { return s.e.Err() }

// Stats returns the counters so far.
func (s *Source) Stats() SourceStats {
	return SourceStats{Writes: s.writes.Load(), BytesWritten: s.bytes.Load(), Compressed: s.comps.Load(),
		Registrations: s.regs.Load(), LocalRegs: s.lregs.Load(), Copied: s.copied.Load()}
}

// Write sends stream bytes (QEMUFile data: section headers, device state).
// They are buffered and leave as QEMU_FILE messages of at most 32 KiB, when
// the buffer fills or on Flush/Sync; RAM writes issued before are posted
// first, so they land before the destination reads these bytes.
func (s *Source) Write(p []byte) (int, error) { return s.WriteContext(s.e.life, p) }

// WriteContext is Write bounded by ctx as well as Options.Timeout.
func (s *Source) WriteContext(ctx context.Context, p []byte) (int, error) {
	s.e.sendMu.Lock()
	defer s.e.sendMu.Unlock()
	if err := s.e.Err(); err != nil {
		return 0, err
	}
	return s.e.writeStream(ctx, p, s.flushPending)
}

// Flush posts the pending RAM write and sends the buffered stream bytes.
func (s *Source) Flush() error { return s.FlushContext(s.e.life) }

// FlushContext is Flush bounded by ctx as well as Options.Timeout.
func (s *Source) FlushContext(ctx context.Context) error {
	s.e.sendMu.Lock()
	defer s.e.sendMu.Unlock()
	return s.e.flushStream(ctx, s.flushPending)
}

// Sync ends a pass: it flushes, sends REGISTER_FINISHED and waits until
// every RDMA WRITE issued so far has completed (landed in the destination's
// memory) and the destination took the REGISTER_FINISHED.
func (s *Source) Sync(ctx context.Context) error {
	s.e.sendMu.Lock()
	defer s.e.sendMu.Unlock()
	if err := s.e.flushStream(ctx, s.flushPending); err != nil {
		return err
	}
	if err := s.e.sendCtrl(ctx, control.Message{Type: control.TypeRegisterFinished}, true); err != nil {
		return err
	}
	return s.e.wait(ctx, "waiting for RDMA WRITE completions", func() bool { return s.e.writesOut == 0 && s.e.finOut == 0 })
}

// Read reads the return path: stream bytes the destination wrote. It
// returns io.EOF after the destination closed in order.
func (s *Source) Read(p []byte) (int, error) {
	return s.ReadContext(s.e.life, p)
}

// ReadContext is Read bounded by ctx as well as Options.Timeout.
func (s *Source) ReadContext(ctx context.Context, p []byte) (int, error) {
	s.readMu <- struct{}{}
	defer func() { <-s.readMu }()
	return s.e.readStream(ctx, p)
}

// WriteRAM writes data at offset of the destination's block named block,
// by RDMA WRITE straight into its memory. Before the first write into a
// 1 MiB chunk it registers that chunk at the destination (REGISTER_REQUEST;
// keys are cached), unless pin-all is on; all-zero data for a chunk not yet
// registered goes as COMPRESS instead. A write never crosses a chunk: data
// is split at chunk boundaries, and contiguous writes within a chunk are
// merged into one WRITE.
//
// When data lies inside one of Options.Blocks it is sent from there without
// a copy, and must stay valid until Sync; otherwise it is copied into a
// registered staging buffer and may be reused at once.
func (s *Source) WriteRAM(ctx context.Context, block string, offset uint64, data []byte) error {
	s.e.sendMu.Lock()
	defer s.e.sendMu.Unlock()
	if err := s.ensureBlocks(ctx); err != nil {
		return err
	}
	bi, err := s.check(block, offset, uint64(len(data)))
	if err != nil {
		return err
	}
	for len(data) > 0 {
		n := min(uint64(len(data)), chunkSize-offset&(chunkSize-1))
		lb, loff := s.local(data[:n])
		if lb >= 0 {
			n = min(n, chunkSize-loff&(chunkSize-1))
		}
		if err := s.writePiece(ctx, bi, offset, data[:n], lb, loff); err != nil {
			return err
		}
		offset, data = offset+n, data[n:]
	}
	return nil
}

// WriteZero makes length bytes at offset of block zero at the destination:
// COMPRESS for chunks not registered there yet, an RDMA WRITE from a
// registered zero buffer otherwise.
func (s *Source) WriteZero(ctx context.Context, block string, offset, length uint64) error {
	s.e.sendMu.Lock()
	defer s.e.sendMu.Unlock()
	if err := s.ensureBlocks(ctx); err != nil {
		return err
	}
	bi, err := s.check(block, offset, length)
	if err != nil {
		return err
	}
	for length > 0 {
		n := min(length, chunkSize-offset&(chunkSize-1))
		if err := s.writeZero(ctx, bi, offset, n); err != nil {
			return err
		}
		offset, length = offset+n, length-n
	}
	return nil
}

func (s *Source) check(block string, offset, n uint64) (int, error) {
	if err := s.e.Err(); err != nil {
		return 0, err
	}
	bi, ok := s.byName[block]
	if !ok {
		return 0, &RangeError{Block: block, Offset: offset, Len: n}
	}
	if size := s.blocks[bi].remote.Length; offset > size || n > size-offset {
		return 0, &RangeError{Block: block, Offset: offset, Len: n, Size: size}
	}
	return bi, nil
}

// local finds the source block holding data, for a copy-free WRITE.
func (s *Source) local(data []byte) (int, uint64) {
	a := addrOf(data)
	for i := range s.blocks {
		b := &s.blocks[i]
		if a >= b.addr && a-b.addr <= uint64(len(b.mem)) && uint64(len(data)) <= uint64(len(b.mem))-(a-b.addr) {
			return i, a - b.addr
		}
	}
	return -1, 0
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// remoteKey returns the key for the destination chunk, registering it first
// if needed (on demand).
func (s *Source) remoteKey(ctx context.Context, bi int, chunk uint64) (uint32, error) {
	b := &s.blocks[bi]
	if s.pinAll {
		return b.remote.RKey, nil
	}
	if b.registered[chunk] {
		return b.rkeys[chunk], nil
	}
	m, err := s.e.request(ctx, control.Message{Type: control.TypeRegisterRequest,
		Regs: []control.Reg{{Addr: b.remote.Offset + chunk<<chunkShift, Block: uint32(bi)}}}, control.TypeRegisterResult)
	if err != nil {
		return 0, err
	}
	s.regs.Add(1)
	r := m.Results[0]
	b.rkeys[chunk], b.registered[chunk], b.remoteHost = r.RKey, true, r.HostAddr
	return r.RKey, nil
}

func (s *Source) localKey(lb int, loff uint64) (uint32, error) {
	b := &s.blocks[lb]
	if b.wholeMR != nil {
		return b.wholeMR.LKey(), nil
	}
	c := loff >> chunkShift
	if b.localMR[c] == nil {
		end := min(uint64(len(b.mem)), (c+1)<<chunkShift)
		mr, err := s.localPD.Register(b.mem[c<<chunkShift:end], 0)
		if err != nil {
			err = fmt.Errorf("rdma: registering chunk %d of source block %q: %w", c, b.name, err)
			s.e.fail(err, true)
			return 0, err
		}
		s.lregs.Add(1)
		b.localMR[c] = mr
	}
	return b.localMR[c].LKey(), nil
}

func (s *Source) writePiece(ctx context.Context, bi int, off uint64, data []byte, lb int, loff uint64) error {
	chunk := off >> chunkShift
	b := &s.blocks[bi]
	if !s.pinAll && !b.registered[chunk] && isZero(data) {
		return s.compress(ctx, bi, off, uint64(len(data)))
	}
	rkey, err := s.remoteKey(ctx, bi, chunk)
	if err != nil {
		return err
	}
	p := &s.pend
	n := uint64(len(data))
	if lb >= 0 {
		lkey, err := s.localKey(lb, loff)
		if err != nil {
			return err
		}
		src := addrOf(data)
		if !(p.active && p.stage < 0 && !p.zero && p.bi == bi && p.off+p.n == off && p.off>>chunkShift == chunk && p.src+p.n == src && p.lkey == lkey) {
			if err := s.flushPending(ctx); err != nil {
				return err
			}
			*p = pendWrite{active: true, bi: bi, off: off, src: src, lkey: lkey, rkey: rkey, stage: -1}
		}
		p.n += n
	} else {
		if !(p.active && p.stage >= 0 && p.bi == bi && p.off+p.n == off && p.off>>chunkShift == chunk) {
			if err := s.flushPending(ctx); err != nil {
				return err
			}
			slot, err := s.stageSlot(ctx)
			if err != nil {
				return err
			}
			buf := s.stage[slot<<chunkShift:]
			*p = pendWrite{active: true, bi: bi, off: off, src: addrOf(buf), lkey: s.stageMR.LKey(), rkey: rkey, stage: slot}
		}
		copy(s.stage[uint64(p.stage)<<chunkShift+p.n:], data)
		s.copied.Add(n)
		p.n += n
	}
	if (p.off+p.n)&(chunkSize-1) == 0 || p.off+p.n == b.remote.Length {
		return s.flushPending(ctx)
	}
	return nil
}

func (s *Source) writeZero(ctx context.Context, bi int, off, n uint64) error {
	chunk := off >> chunkShift
	b := &s.blocks[bi]
	if !s.pinAll && !b.registered[chunk] {
		return s.compress(ctx, bi, off, n)
	}
	rkey, err := s.remoteKey(ctx, bi, chunk)
	if err != nil {
		return err
	}
	if s.zero == nil {
		z, err := mmap(chunkSize)
		if err != nil {
			s.e.fail(err, true)
			return err
		}
		mr, err := s.localPD.Register(z, 0)
		if err != nil {
			_ = munmap(z)
			err = fmt.Errorf("rdma: registering the zero buffer: %w", err)
			s.e.fail(err, true)
			return err
		}
		s.zero, s.zeroMR = z, mr
		s.lregs.Add(1)
	}
	p := &s.pend
	if p.active && p.zero && p.bi == bi && p.off+p.n == off && p.off>>chunkShift == chunk {
		p.n += n
	} else {
		if err := s.flushPending(ctx); err != nil {
			return err
		}
		*p = pendWrite{active: true, bi: bi, off: off, n: n, src: s.zeroMR.Addr(), lkey: s.zeroMR.LKey(), rkey: rkey, stage: -1, zero: true}
	}
	if (p.off+p.n)&(chunkSize-1) == 0 || p.off+p.n == b.remote.Length {
		return s.flushPending(ctx)
	}
	return nil
}

func (s *Source) compress(ctx context.Context, bi int, off, n uint64) error {
	if err := s.flushPending(ctx); err != nil {
		return err
	}
	b := &s.blocks[bi]
	err := s.e.sendCtrl(ctx, control.Message{Type: control.TypeCompress,
		Comp: control.Compress{Value: 0, Block: uint32(bi), Offset: b.remote.Offset + off, Length: n}}, false)
	if err == nil {
		s.comps.Add(1)
	}
	return err
}

func (s *Source) stageSlot(ctx context.Context) (int, error) {
	if s.stage == nil {
		buf, err := mmap(stageSlots * chunkSize)
		if err != nil {
			s.e.fail(err, true)
			return 0, err
		}
		mr, err := s.localPD.Register(buf, 0)
		if err != nil {
			_ = munmap(buf)
			err = fmt.Errorf("rdma: registering the staging buffers: %w", err)
			s.e.fail(err, true)
			return 0, err
		}
		s.stage, s.stageMR = buf, mr
		s.lregs.Add(1)
		s.e.mu.Lock()
		for i := range stageSlots {
			s.e.freeStage = append(s.e.freeStage, i)
		}
		s.e.mu.Unlock()
	}
	var slot int
	err := s.e.wait(ctx, "waiting for a staging buffer", func() bool {
		if len(s.e.freeStage) == 0 {
			return false
		}
		slot = s.e.freeStage[len(s.e.freeStage)-1]
		s.e.freeStage = s.e.freeStage[:len(s.e.freeStage)-1]
		return true
	})
	return slot, err
}

// flushPending posts the pending merged WRITE. sendMu must be held.
func (s *Source) flushPending(ctx context.Context) error {
	p := &s.pend
	if !p.active {
		return s.e.Err()
	}
	*p = pendWrite{active: false, bi: p.bi, off: p.off, n: p.n, src: p.src, lkey: p.lkey, rkey: p.rkey, stage: p.stage}
	w := *p
	err := s.e.wait(ctx, "waiting for RDMA WRITE completions", func() bool {
		if s.e.writesOut >= s.e.opts.MaxWrites {
			return false
		}
		s.e.writesOut++
		return true
	})
	if err != nil {
		if w.stage >= 0 {
			s.e.mu.Lock()
			s.e.freeStage = append(s.e.freeStage, w.stage)
			s.e.mu.Unlock()
		}
		return err
	}
	b := &s.blocks[w.bi]
	err = s.e.postSend(sendRec{kind: sendWrite, slot: w.stage}, verbs.SendWR{Op: verbs.OpWrite,
		Local: verbs.SGE{Addr: w.src, Length: uint32(w.n), LKey: w.lkey}, RemoteAddr: b.remoteHost + w.off, RKey: w.rkey})
	if err != nil {
		s.e.mu.Lock()
		s.e.writesOut--
		s.e.mu.Unlock()
		s.e.fail(err, false)
		return err
	}
	s.writes.Add(1)
	s.bytes.Add(w.n)
	return nil
}

// Close sends the buffered stream bytes, waits (briefly) for posted sends to
// complete and disconnects: for a source that has not failed this is an
// orderly end, and the destination's Read returns io.EOF once drained. Call
// Sync first to know that every RAM write landed. A goroutine blocked in the
// channel returns ErrClosed.
func (s *Source) Close() error {
	if s.closing.Swap(true) {
		return nil
	}
	err := s.e.shutdown(s.readMu, s.flushPending, func() {
		for _, b := range s.blocks {
			for _, mr := range b.localMR {
				if mr != nil {
					_ = mr.Deregister()
				}
			}
			if b.wholeMR != nil {
				_ = b.wholeMR.Deregister()
			}
		}
		if s.stage != nil {
			_ = munmap(s.stage)
		}
		if s.zero != nil {
			_ = munmap(s.zero)
		}
	})
	return err
}
