package guest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Builtin is the built-in guest: RAM (anonymous memory or a memfd, as
// Config.Backing says) holding a self-verifying pattern, writer goroutines
// that dirty it at a set rate, and three devices: "timer" (tick counter and
// virtual clock), "serial" (the last console lines; its Load needs the
// controller lock) and "nic" (MAC and traffic counters).
//
// A Builtin is safe for concurrent use. It implements [Guest] and
// [Throttler]. Call Close when done: it stops the writers and releases the
// memory.
type Builtin struct {
	cfg     Config
	content content
	id      string
	blocks  []*Block
	prep    Preparation // written by build, read-only afterwards
	base    []int       // base[i]: global number of the first page of blocks[i]
	total   int         // pages in all blocks
	dirty   []Bitmap

	timer   *timerDev
	serial  *serialDev
	nic     *nicDev
	devices []Device

	// mu guards the lifecycle below. Stop holds it while it waits for the
	// writers, which never take it. Verify, Digest and Checksum hold it so
	// the guest cannot start or close under them.
	mu        sync.Mutex
	closed    bool
	stop      chan struct{} // closed by Stop to park the writers
	wg        sync.WaitGroup
	starts    uint64
	startedAt time.Time
	ran       time.Duration // running time in this process, before startedAt
	runLog    []Interval    // the last maxRunLog run intervals
	runFile   *runLogFile   // Config.RunLogFile, nil when not set

	running atomic.Bool // written under mu, read anywhere

	// logMu serialises the dirty-log calls; logging is guarded by it.
	logMu   sync.Mutex
	logging bool

	throttle     atomic.Int32
	pagesWritten atomic.Uint64
	batches      atomic.Uint64

	// onBatch, if set before Start, is called by a writer after each batch
	// (tests use it to wait for progress without sleeping).
	onBatch func(writer, pages int)
}

var (
	_ Guest     = (*Builtin)(nil)
	_ Throttler = (*Builtin)(nil)
	_ HasUUID   = (*Builtin)(nil)
)

// New builds a source guest: RAM filled with the pattern for cfg.Seed,
// every data page at version 1, the serial console holding a boot banner.
// With cfg.Prealloc all of RAM is faulted in first (see
// [Builtin.Preparation]); otherwise each 4 MiB chunk is pre-faulted (when
// the kernel can) just before it is filled. The guest is stopped: call
// Start to run its writers.
func New(cfg Config) (*Builtin, error) {
	g, err := build(cfg)
	if err != nil {
		return nil, err
	}
	for bi, b := range g.blocks {
		err := forChunks(b.Pages(), func(lo, hi int) error {
			if !cfg.Prealloc {
				chunk := &Block{Name: b.Name, PageSize: b.PageSize, Mem: b.Mem[lo*PageSize : hi*PageSize]}
				if err := Populate(context.Background(), chunk); err != nil && !errors.Is(err, ErrPopulateUnsupported) {
					return err
				}
			}
			for p := lo; p < hi; p++ {
				if !g.content.isZero(bi, p) {
					g.content.fill(b.Page(p), bi, p, 1)
				}
			}
			return nil
		})
		if err != nil {
			g.Close()
			return nil, fmt.Errorf("guest: filling block %q: %w", b.Name, err)
		}
	}
	var sizes string
	for _, b := range g.blocks {
		sizes += fmt.Sprintf(" %s=%dKiB", b.Name, len(b.Mem)>>10)
	}
	g.serial.print(fmt.Sprintf("migctl builtin guest booting:%s seed=%#x writers=%d rate=%dB/s", sizes, cfg.Seed, cfg.writers(), cfg.DirtyRate))
	return g, nil
}

// NewDestination builds the receiving side of a migration from the same
// Config as the source: the same ID, blocks and devices, with RAM zeroed
// and devices in their initial state. Without cfg.Prealloc the RAM is holes
// that fault in as pages land (see [Populate]); with it every page is
// faulted in before NewDestination returns, as a QEMU destination started
// with -mem-prealloc is ready only once its RAM is. The guest is stopped;
// Verify fails until it has received every page.
func NewDestination(cfg Config) (*Builtin, error) {
	return build(cfg)
}

func build(cfg Config) (*Builtin, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	g := &Builtin{cfg: cfg, content: newContent(&cfg)}
	g.prep = Preparation{Backing: cfg.backing(), HugeBytes: -1}
	if cfg.RunLogFile != "" {
		f, err := openRunLog(cfg.RunLogFile)
		if err != nil {
			return nil, err
		}
		g.runFile = f
	}
	sizes := []struct {
		name string
		size int64
	}{{"pc.ram", cfg.Size}, {"vga.vram", cfg.vram()}}
	if cfg.Prealloc {
		if err := CheckMemory(cfg.Size + cfg.vram()); err != nil {
			return nil, fmt.Errorf("Prealloc refused: %w", err)
		}
	}
	for _, s := range sizes {
		if s.size == 0 {
			continue
		}
		b, err := newBlock(s.name, s.size, g.prep.Backing)
		if err != nil {
			g.Close()
			return nil, err
		}
		g.blocks = append(g.blocks, b)
		g.base = append(g.base, g.total)
		g.total += b.Pages()
		g.dirty = append(g.dirty, NewBitmap(b.Pages()))
	}
	g.timer = &timerDev{running: g.Running}
	g.serial = &serialDev{running: g.Running}
	g.nic = newNIC(cfg.Seed, g.Running)
	g.devices = []Device{g.timer, g.serial, g.nic}
	g.id = cfg.id(g.blocks, g.devices)
	if cfg.Prealloc {
		if err := g.preallocate(); err != nil {
			g.Close()
			return nil, err
		}
	}
	return g, nil
}

// ID returns the guest's identity: its layout (page size, block names and
// sizes, devices and their versions) and its content rule (seed, zero
// fraction, content mode), on which Verify on a destination relies.
func (g *Builtin) ID() string { return g.id }

// UUID returns the guest's UUID (Config.UUID; zero when none was set).
func (g *Builtin) UUID() UUID { return g.cfg.UUID }

// Config returns the configuration the guest was built from.
func (g *Builtin) Config() Config { return g.cfg }

// Blocks returns "pc.ram" and, unless Config.VRAM < 0, "vga.vram". After
// Close their Mem is nil and FD is -1.
func (g *Builtin) Blocks() []*Block { return g.blocks }

// Devices returns timer, serial and nic, in that order.
func (g *Builtin) Devices() []Device { return g.devices }

// Running reports whether the writers run (between Start and Stop).
func (g *Builtin) Running() bool { return g.running.Load() }

// Populate pre-faults block i: see the package-level [Populate].
func (g *Builtin) Populate(ctx context.Context, block int) error {
	if block < 0 || block >= len(g.blocks) {
		return fmt.Errorf("guest: Populate: block %d out of range 0..%d", block, len(g.blocks)-1)
	}
	g.mu.Lock()
	closed := g.closed
	g.mu.Unlock()
	if closed {
		return ErrClosed
	}
	return Populate(ctx, g.blocks[block])
}

// Start runs the writers (if DirtyRate > 0) and the virtual clock. Starting
// a running guest does nothing.
func (g *Builtin) Start() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return ErrClosed
	}
	if g.running.Load() {
		return nil
	}
	// The run log file's line comes first: no writer runs before it.
	if err := g.runFile.record(runLogStart, Monotonic()); err != nil {
		return err
	}
	g.starts++
	now := time.Now()
	g.startedAt = now
	if len(g.runLog) == maxRunLog {
		g.runLog = append(g.runLog[:0], g.runLog[1:]...)
	}
	g.runLog = append(g.runLog, Interval{Start: now})
	g.timer.resume(now)
	g.stop = make(chan struct{})
	g.running.Store(true)
	if g.cfg.DirtyRate > 0 && !g.content.zeroAll {
		n := g.cfg.writers()
		for w := range n {
			g.wg.Add(1)
			go g.writer(w, n, g.stop, wyrand(g.content.key(w, int(g.starts), 0x7772697465722020)))
		}
	}
	return nil
}

// Stop parks the writers and returns once none of them is running: every
// page write they began has finished and set its dirty bit. Stopping a
// stopped guest does nothing. With Config.RunLogFile it fails when the
// stop could not be logged (the guest is stopped all the same).
func (g *Builtin) Stop() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stopLocked()
}

func (g *Builtin) stopLocked() error {
	if !g.running.Load() {
		return nil
	}
	g.runLog[len(g.runLog)-1].Stop = time.Now() // no write begins after this
	close(g.stop)
	g.wg.Wait()
	now := time.Now()
	g.timer.pause(now)
	g.ran += now.Sub(g.startedAt)
	g.running.Store(false)
	// Every writer has stopped: the run log file's line comes after.
	return g.runFile.record(runLogStop, Monotonic())
}

// Interval is one period during which a guest ran, on this process's
// monotonic clock: from Start (the writers were released) to Stop (no
// writer begins a page after it). Stop is zero while the guest runs.
type Interval struct {
	Start, Stop time.Time
}

// maxRunLog bounds the intervals RunLog keeps.
const maxRunLog = 1024

// RunLog returns the guest's run intervals in this process, oldest first
// (the last 1024). Tests and benchmarks compare them across guests: two
// guests of one migration must never run at once, and the gap between the
// source's last Stop and the destination's first Start is the guest's
// true downtime.
func (g *Builtin) RunLog() []Interval {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.runLog)
}

// Throttle makes the writers do (100-percent)% of their work; percent is
// clamped to 0..100. It takes effect at the writers' next tick.
func (g *Builtin) Throttle(percent int) {
	g.throttle.Store(int32(max(0, min(100, percent))))
}

// StartDirtyLog drops every page recorded so far and starts reporting.
// (The writers always record; a write in flight during the call may still
// be reported by the first SyncDirty.)
func (g *Builtin) StartDirtyLog() {
	g.logMu.Lock()
	defer g.logMu.Unlock()
	g.clearDirty()
	g.logging = true
}

// StopDirtyLog stops reporting and drops the record.
func (g *Builtin) StopDirtyLog() {
	g.logMu.Lock()
	defer g.logMu.Unlock()
	g.logging = false
	g.clearDirty()
}

func (g *Builtin) clearDirty() {
	for _, d := range g.dirty {
		for i := range d {
			atomic.StoreUint64(&d[i], 0)
		}
	}
}

// SyncDirty ORs into dst the pages written since the last call (see
// [Guest.SyncDirty]); it reports nothing while the dirty log is stopped.
// It panics if dst is not shaped like [NewBitmaps](g.Blocks()).
func (g *Builtin) SyncDirty(dst [][]uint64) {
	g.logMu.Lock()
	defer g.logMu.Unlock()
	if !g.logging {
		return
	}
	if len(dst) < len(g.dirty) {
		panic(fmt.Sprintf("guest: SyncDirty: dst has %d bitmaps for %d blocks: build it with NewBitmaps", len(dst), len(g.dirty)))
	}
	for i, d := range g.dirty {
		if len(dst[i]) < len(d) {
			panic(fmt.Sprintf("guest: SyncDirty: dst[%d] has %d words for %d pages: build it with NewBitmaps", i, len(dst[i]), g.blocks[i].Pages()))
		}
		d.Drain(dst[i])
	}
}

// Console returns the lines the guest printed on its serial port, oldest
// first (at most [SerialLines]), and how many it printed in all.
func (g *Builtin) Console() (lines []string, total uint64) { return g.serial.console() }

// Stats is a snapshot of a built-in guest's activity.
type Stats struct {
	PagesWritten uint64        // pages rewritten by the writers in this process
	Batches      uint64        // writer ticks in this process
	RunTime      time.Duration // time spent running in this process
	Clock        time.Duration // the virtual clock: running time, carried across migrations
	WriteRate    float64       // PagesWritten*4096 / RunTime, in bytes per second
	Throttle     int           // current throttle, percent
	PrepareTime  time.Duration // faulting in all RAM at build (Config.Prealloc), else 0: [Builtin.PrepareTime]
	HugeBytes    int64         // of the RAM faulted in at build, bytes in huge pages; -1 unknown or no Prealloc
}

// Stats returns counters of the writers' work, and the time the RAM's
// preparation took when the guest was built.
func (g *Builtin) Stats() Stats {
	g.mu.Lock()
	ran := g.ran
	if g.running.Load() {
		ran += time.Since(g.startedAt)
	}
	g.mu.Unlock()
	s := Stats{
		PagesWritten: g.pagesWritten.Load(),
		Batches:      g.batches.Load(),
		RunTime:      ran,
		Clock:        g.timer.clock(),
		Throttle:     int(g.throttle.Load()),
		PrepareTime:  g.prep.Time,
		HugeBytes:    g.prep.HugeBytes,
	}
	if ran > 0 {
		s.WriteRate = float64(s.PagesWritten) * PageSize / ran.Seconds()
	}
	return s
}

// Close stops the guest, unmaps its RAM and closes its memfds (if any).
// Slices of Mem obtained earlier must not be used afterwards (the memory is
// gone; a stray access crashes the process). Close is idempotent.
func (g *Builtin) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	errs := []error{g.stopLocked()}
	g.closed = true
	for _, b := range g.blocks {
		errs = append(errs, b.release())
	}
	errs = append(errs, g.runFile.close())
	return errors.Join(errs...)
}

// lockStopped takes mu for an operation that reads all of RAM.
func (g *Builtin) lockStopped(op string) error {
	g.mu.Lock()
	switch {
	case g.closed:
		g.mu.Unlock()
		return fmt.Errorf("guest: %s: %w", op, ErrClosed)
	case g.running.Load():
		g.mu.Unlock()
		return fmt.Errorf("guest: %s: %w", op, ErrRunning)
	}
	return nil
}

// Verify checks every page of a stopped guest against the page format: a
// zero page must be all zero; a data page must carry its own page number
// and the body its version implies. It returns a [*VerifyError] for the
// first bad page (lowest block, then lowest offset), [ErrRunning] if the
// guest runs (pages being rewritten are legitimately torn) and [ErrClosed]
// after Close. On a destination it passes only once every page has arrived.
func (g *Builtin) Verify() error {
	if err := g.lockStopped("Verify"); err != nil {
		return err
	}
	defer g.mu.Unlock()
	for bi, b := range g.blocks {
		err := forChunks(b.Pages(), func(lo, hi int) error {
			for p := lo; p < hi; p++ {
				if at, why := g.content.check(b.Page(p), bi, p); why != "" {
					return &VerifyError{Block: b.Name, Page: p, Offset: int64(p) * PageSize, At: at, Reason: why}
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}
