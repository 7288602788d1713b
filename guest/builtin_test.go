package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

const mib = 1 << 20

func newGuest(t testing.TB, cfg Config) *Builtin {
	t.Helper()
	g, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return g
}

func newDest(t testing.TB, cfg Config) *Builtin {
	t.Helper()
	g, err := NewDestination(cfg)
	if err != nil {
		t.Fatalf("NewDestination(%+v): %v", cfg, err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return g
}

// batches makes the writers report each batch on a channel; wait(n) blocks
// until n more batches have completed and returns the pages they wrote.
func batches(t *testing.T, g *Builtin) (wait func(n int) int) {
	ch := make(chan int, 4096)
	g.onBatch = func(_, pages int) {
		select {
		case ch <- pages:
		default: // nobody is counting right now
		}
	}
	return func(n int) int {
		t.Helper()
		total := 0
		timeout := time.After(20 * time.Second)
		for range n {
			select {
			case p := <-ch:
				total += p
			case <-timeout:
				t.Fatalf("writers did not complete %d batches in 20 s", n)
			}
		}
		return total
	}
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{Size: 4095},
		{Size: -4096},
		{Size: 1 << 20, DirtyRate: -1},
		{Size: 1 << 20, Writers: -1},
		{Size: 1 << 20, Writers: MaxWriters + 1},
		{Size: 1 << 20, ZeroFraction: 1.5},
		{Size: 1 << 20, ZeroFraction: -0.1},
		{Size: 1 << 20, VRAM: 1000},
		{Size: 1 << 20, Backing: "hugetlb"},
		{Size: 1 << 20, Backing: "Anon"},
	} {
		if _, err := New(cfg); !errors.Is(err, ErrConfig) {
			t.Errorf("New(%+v) = %v, want ErrConfig", cfg, err)
		}
	}
}

// TestDirtyLogReproducesMemory is the property precopy migration relies on:
// copy everything once while the writers run, then repeatedly copy only the
// pages SyncDirty reports; after Stop and a last sync, the copy equals the
// guest's memory byte for byte.
func TestDirtyLogReproducesMemory(t *testing.T) {
	g := newGuest(t, Config{Size: 16 * mib, DirtyRate: 400 << 20, Writers: 2, Seed: 11, ZeroFraction: 0.1})
	wait := batches(t, g)
	blocks := g.Blocks()
	shadow := make([][]byte, len(blocks))
	dirty := NewBitmaps(blocks)

	mustOK(t, g.Start())
	g.StartDirtyLog()
	for i, b := range blocks { // first pass: everything, racing the writers
		shadow[i] = slices.Clone(b.Mem)
	}
	copyDirty := func() int {
		g.SyncDirty(dirty)
		n := 0
		for i, b := range blocks {
			d := Bitmap(dirty[i])
			for p := d.Next(0); p >= 0; p = d.Next(p + 1) {
				copy(shadow[i][p*PageSize:(p+1)*PageSize], b.Page(p))
				n++
			}
			d.Reset()
		}
		return n
	}
	copied, written := 0, 0
	for range 8 {
		written += wait(3)
		copied += copyDirty()
	}
	if written == 0 || copied == 0 {
		t.Fatalf("writers wrote %d pages, iterations copied %d: the test exercised nothing", written, copied)
	}
	mustOK(t, g.Stop())
	copied += copyDirty()
	for i, b := range blocks {
		if !bytes.Equal(shadow[i], b.Mem) {
			p := 0
			for !bytes.Equal(shadow[i][p*PageSize:(p+1)*PageSize], b.Page(p)) {
				p++
			}
			t.Fatalf("block %s: copy differs from memory at page %d after the final sync", b.Name, p)
		}
	}
	t.Logf("writers rewrote %d pages in %d batches; %d pages copied after the first pass", g.Stats().PagesWritten, g.Stats().Batches, copied)

	// A destination holding the copy passes Verify and matches the RAM digest.
	dst := newDest(t, g.Config())
	for i, b := range dst.Blocks() {
		copy(b.Mem, shadow[i])
	}
	mustOK(t, dst.Verify())
	sd, err := g.Digest()
	mustOK(t, err)
	dd, err := dst.Digest()
	mustOK(t, err)
	if !slices.Equal(sd.Blocks, dd.Blocks) {
		t.Fatalf("RAM digests differ: source %v, destination %v", sd.Blocks, dd.Blocks)
	}
}

func TestDirtyLogUnit(t *testing.T) {
	g := newGuest(t, Config{Size: 1 * mib, Seed: 5, VRAM: 64 << 10})
	data := func(b int) []int { // some data pages of block b
		var ps []int
		for p := 0; p < g.Blocks()[b].Pages() && len(ps) < 3; p++ {
			if !g.content.isZero(b, p) {
				ps = append(ps, p)
			}
		}
		return ps
	}
	dst := NewBitmaps(g.Blocks())
	g.rewrite(0, data(0)[0]) // before the log starts: forgotten
	g.StartDirtyLog()
	g.SyncDirty(dst)
	if n := Bitmap(dst[0]).Count() + Bitmap(dst[1]).Count(); n != 0 {
		t.Fatalf("first SyncDirty after StartDirtyLog reported %d pages written before it", n)
	}
	p0, p1 := data(0)[1], data(1)[2]
	g.rewrite(0, p0)
	g.rewrite(1, p1)
	g.SyncDirty(dst)
	if !Bitmap(dst[0]).Test(p0) || Bitmap(dst[0]).Count() != 1 || !Bitmap(dst[1]).Test(p1) || Bitmap(dst[1]).Count() != 1 {
		t.Fatalf("SyncDirty = %v %v, want only page %d of block 0 and page %d of block 1", Bitmap(dst[0]).Count(), Bitmap(dst[1]).Count(), p0, p1)
	}
	if dst[0][p0/64] != 1<<(p0%64) {
		t.Fatalf("word %d = %#x, want bit %d", p0/64, dst[0][p0/64], p0%64)
	}
	// SyncDirty ORs: what dst held stays; the guest's record is cleared.
	g.SyncDirty(dst)
	if Bitmap(dst[0]).Count() != 1 || Bitmap(dst[1]).Count() != 1 {
		t.Fatal("SyncDirty dropped bits already in dst")
	}
	fresh := NewBitmaps(g.Blocks())
	g.SyncDirty(fresh)
	if Bitmap(fresh[0]).Count()+Bitmap(fresh[1]).Count() != 0 {
		t.Fatal("second SyncDirty reported pages again: the guest's record was not cleared")
	}
	g.StopDirtyLog()
	g.rewrite(0, p0)
	g.SyncDirty(fresh)
	if Bitmap(fresh[0]).Count() != 0 {
		t.Fatal("SyncDirty reported pages while the dirty log is stopped")
	}
	mustOK(t, g.Verify()) // rewrites keep pages valid
	func() {
		defer func() {
			if recover() == nil {
				t.Error("SyncDirty with a short dst did not panic")
			}
		}()
		g.StartDirtyLog()
		g.SyncDirty(dst[:1])
	}()
}

func TestVerifyCatchesDamage(t *testing.T) {
	cfg := Config{Size: 2 * mib, Seed: 99, ZeroFraction: 0.2}
	g := newGuest(t, cfg)
	mustOK(t, g.Verify())
	other := newGuest(t, Config{Size: 2 * mib, Seed: 100, VRAM: -1})
	ram := g.Blocks()[0]
	var dp, zp = -1, -1
	for p := range ram.Pages() {
		if g.content.isZero(0, p) {
			if zp < 0 {
				zp = p
			}
		} else if dp < 0 && p > 3 && !other.content.isZero(0, p) {
			dp = p
		}
	}
	cases := []struct {
		name   string
		damage func()
		page   int
		at     int // -1: any
		reason string
	}{
		{"flipped byte", func() { ram.Page(dp)[1234] ^= 1 }, dp, 1234, "torn or corrupted"},
		{"foreign page", func() { copy(ram.Page(dp), other.Blocks()[0].Page(dp)) }, dp, -1, "another seed"},
		{"misplaced page", func() { copy(ram.Page(dp), ram.Page(dp-1)) }, dp, 0, "wrong offset"},
		{"lost page", func() { clear(ram.Page(dp)) }, dp, 0, "lost"},
		{"stray write", func() { ram.Page(zp)[17] = 1 }, zp, 17, "zero page holds data"},
	}
	for _, c := range cases {
		save := slices.Clone(ram.Page(c.page))
		c.damage()
		err := g.Verify()
		var ve *VerifyError
		if !errors.As(err, &ve) {
			t.Fatalf("%s: Verify = %v, want a *VerifyError", c.name, err)
		}
		if ve.Block != "pc.ram" || ve.Page != c.page || ve.Offset != int64(c.page)*PageSize || (c.at >= 0 && ve.At != c.at) || !strings.Contains(ve.Reason, c.reason) {
			t.Errorf("%s: got %v; want page %d, byte %d, reason containing %q", c.name, ve, c.page, c.at, c.reason)
		}
		copy(ram.Page(c.page), save)
		mustOK(t, g.Verify())
	}
	// The second block is checked too.
	vram := g.Blocks()[1]
	for p := range vram.Pages() {
		if !g.content.isZero(1, p) {
			vram.Page(p)[99] ^= 0xff
			var ve *VerifyError
			if err := g.Verify(); !errors.As(err, &ve) || ve.Block != "vga.vram" || ve.Page != p {
				t.Fatalf("damage in vga.vram page %d: Verify = %v", p, err)
			}
			break
		}
	}
}

func TestDestinationLayout(t *testing.T) {
	cfg := Config{Size: 4 * mib, Seed: 3, DirtyRate: 10 << 20, ZeroFraction: 0.1}
	src := newGuest(t, cfg)
	dcfg := cfg
	dcfg.DirtyRate, dcfg.Writers = 0, 7 // not part of the identity
	dst := newDest(t, dcfg)
	if src.ID() != dst.ID() {
		t.Fatalf("IDs differ:\n source %s\n dest   %s", src.ID(), dst.ID())
	}
	mustOK(t, ValidateBlocks(src.Blocks()))
	mustOK(t, ValidateBlocks(dst.Blocks()))
	if len(src.Blocks()) != 2 || len(dst.Blocks()) != 2 {
		t.Fatalf("want 2 blocks each, got %d and %d", len(src.Blocks()), len(dst.Blocks()))
	}
	for i, sb := range src.Blocks() {
		db := dst.Blocks()[i]
		if sb.Name != db.Name || len(sb.Mem) != len(db.Mem) || sb.PageSize != db.PageSize {
			t.Fatalf("block %d: source %s/%d/%d, dest %s/%d/%d fd %d", i, sb.Name, len(sb.Mem), sb.PageSize, db.Name, len(db.Mem), db.PageSize, db.FD)
		}
		if !bytes.Equal(db.Mem, make([]byte, len(db.Mem))) {
			t.Fatalf("destination block %s is not zeroed", db.Name)
		}
	}
	for i, sd := range src.Devices() {
		dd := dst.Devices()[i]
		if sd.Name() != dd.Name() || sd.Instance() != dd.Instance() || sd.Version() != dd.Version() || sd.NeedsLock() != dd.NeedsLock() {
			t.Fatalf("device %d differs: %s vs %s", i, sd.Name(), dd.Name())
		}
	}
	var ve *VerifyError
	if err := dst.Verify(); !errors.As(err, &ve) || !strings.Contains(ve.Reason, "lost") {
		t.Fatalf("Verify on an empty destination = %v, want a lost page", err)
	}
	for _, other := range []Config{
		{Size: 8 * mib, Seed: 3, ZeroFraction: 0.1},
		{Size: 4 * mib, Seed: 4, ZeroFraction: 0.1},
		{Size: 4 * mib, Seed: 3, ZeroFraction: 0.1, Random: true},
		{Size: 4 * mib, Seed: 3, ZeroFraction: 0.1, VRAM: -1},
	} {
		o := newDest(t, other)
		if o.ID() == src.ID() {
			t.Errorf("config %+v has the same ID as %+v", other, cfg)
		}
	}

	// A migration in miniature: run, stop, copy RAM and device state.
	wait := batches(t, src)
	mustOK(t, src.Start())
	wait(4)
	mustOK(t, src.Stop())
	for i, b := range src.Blocks() {
		copy(dst.Blocks()[i].Mem, b.Mem)
	}
	for i, d := range src.Devices() {
		s, err := d.Save()
		mustOK(t, err)
		mustOK(t, dst.Devices()[i].Load(s))
	}
	mustOK(t, dst.Verify())
	cs, err := src.Checksum()
	mustOK(t, err)
	cd, err := dst.Checksum()
	mustOK(t, err)
	if cs != cd {
		t.Fatalf("checksums differ after copying everything: %#x vs %#x", cs, cd)
	}
	sl, st := src.Console()
	dl, dt := dst.Console()
	if !slices.Equal(sl, dl) || st != dt || len(sl) < 2 {
		t.Fatalf("console differs or is empty: %d/%d lines vs %d/%d", len(sl), st, len(dl), dt)
	}
	if src.Stats().Clock != dst.Stats().Clock {
		t.Fatalf("virtual clock not carried: %v vs %v", src.Stats().Clock, dst.Stats().Clock)
	}
	// The destination runs on from there; its writes keep pages valid.
	dst.cfg.DirtyRate = 10 << 20
	dwait := batches(t, dst)
	mustOK(t, dst.Start())
	dwait(3)
	mustOK(t, dst.Stop())
	mustOK(t, dst.Verify())
	if dst.Stats().Clock <= src.Stats().Clock {
		t.Fatalf("destination clock %v did not advance past the source's %v", dst.Stats().Clock, src.Stats().Clock)
	}
}

// TestStopParksWriters: after Stop returns no writer goroutine exists, the
// memory and devices stay still, and nothing more is dirtied.
func TestStopParksWriters(t *testing.T) {
	g := newGuest(t, Config{Size: 8 * mib, DirtyRate: 200 << 20, Writers: 3, Seed: 8})
	wait := batches(t, g)
	before := goleak.IgnoreCurrent()
	if g.Running() {
		t.Fatal("New returned a running guest")
	}
	mustOK(t, g.Start())
	mustOK(t, g.Start()) // idempotent
	if !g.Running() {
		t.Fatal("Running() = false after Start")
	}
	if _, err := g.Checksum(); !errors.Is(err, ErrRunning) {
		t.Fatalf("Checksum while running = %v, want ErrRunning", err)
	}
	if err := g.Verify(); !errors.Is(err, ErrRunning) {
		t.Fatalf("Verify while running = %v, want ErrRunning", err)
	}
	g.StartDirtyLog()
	if wait(6) == 0 {
		t.Fatal("writers wrote nothing")
	}
	mustOK(t, g.Stop())
	mustOK(t, g.Stop()) // idempotent
	if g.Running() {
		t.Fatal("Running() = true after Stop")
	}
	if err := goleak.Find(before); err != nil {
		t.Fatalf("goroutines left running after Stop: %v", err)
	}
	dirty := NewBitmaps(g.Blocks())
	g.SyncDirty(dirty) // everything up to Stop
	pages := g.Stats().PagesWritten
	c1, err := g.Checksum()
	mustOK(t, err)
	time.Sleep(5 * writerTick) // not synchronisation: room for a writer that was not parked to show itself
	c2, err := g.Checksum()
	mustOK(t, err)
	after := NewBitmaps(g.Blocks())
	g.SyncDirty(after)
	if c1 != c2 || g.Stats().PagesWritten != pages || Bitmap(after[0]).Count() != 0 {
		t.Fatalf("stopped guest changed: checksum %#x -> %#x, pages %d -> %d, %d dirty", c1, c2, pages, g.Stats().PagesWritten, Bitmap(after[0]).Count())
	}
	mustOK(t, g.Verify())
	if s := g.Stats(); s.RunTime <= 0 || s.WriteRate <= 0 || s.Batches == 0 {
		t.Fatalf("Stats = %+v", s)
	}
}

func TestThrottle(t *testing.T) {
	// A writer that fell 1 s behind catches up at most four ticks' worth.
	if n := pace(new(float64), 100<<20, 0, time.Second); n != 4*128 {
		t.Errorf("pace after a 1 s gap at 100 MiB/s = %d pages, want the cap of %d", n, 4*128)
	}
	c := 0.0
	if n := pace(&c, 1<<20, 0, writerTick); n != 1 || c < 0 {
		t.Errorf("pace over one tick at 1 MiB/s = %d pages (credit %v), want 1", n, c)
	}
	c = 0
	if n := pace(&c, 100<<20, 50, writerTick); n != 64 {
		t.Errorf("pace at 100 MiB/s throttled 50%% over 5 ms = %d pages, want 64", n)
	}
	c = 0
	total := 0
	for range 1000 { // 5 s at 1000 B/s: ~1.2 pages, carried over ticks
		total += pace(&c, 1000, 0, writerTick)
	}
	if total != 1 {
		t.Errorf("slow rate: %d pages in 5 s at 1000 B/s, want 1", total)
	}
	if pace(&c, 1<<30, 100, time.Second) != 0 {
		t.Error("pace at 100% throttle wrote pages")
	}

	g := newGuest(t, Config{Size: 4 * mib, DirtyRate: 100 << 20, Seed: 2})
	wait := batches(t, g)
	g.Throttle(250) // clamped to 100
	if g.Stats().Throttle != 100 {
		t.Fatalf("Throttle(250) -> %d, want 100", g.Stats().Throttle)
	}
	mustOK(t, g.Start())
	if n := wait(5); n != 0 {
		t.Fatalf("fully throttled writers wrote %d pages", n)
	}
	g.Throttle(0)
	wait(2) // the tick in flight may have read the old throttle
	if n := wait(3); n == 0 {
		t.Fatal("unthrottled writers wrote nothing")
	}
	mustOK(t, g.Stop())
}

func TestDevicesChangeWhileRunning(t *testing.T) {
	g := newGuest(t, Config{Size: 2 * mib, DirtyRate: 50 << 20, Seed: 6})
	initial := map[string][]byte{}
	for _, d := range g.Devices() {
		s, err := d.Save()
		mustOK(t, err)
		initial[d.Name()] = s
	}
	wait := batches(t, g)
	mustOK(t, g.Start())
	wait(3)
	mustOK(t, g.Stop())
	names := []string{}
	for _, d := range g.Devices() {
		names = append(names, d.Name())
		s, err := d.Save()
		mustOK(t, err)
		if bytes.Equal(s, initial[d.Name()]) {
			t.Errorf("device %s did not change while the guest ran", d.Name())
		}
		if d.NeedsLock() != (d.Name() == "serial") {
			t.Errorf("%s.NeedsLock() = %v", d.Name(), d.NeedsLock())
		}
	}
	if !slices.Equal(names, []string{"timer", "serial", "nic"}) {
		t.Fatalf("devices = %v", names)
	}
}

func TestCloseAndErrors(t *testing.T) {
	for _, backing := range []string{BackingAnon, BackingMemfd} {
		t.Run(backing, func(t *testing.T) { testCloseAndErrors(t, backing) })
	}
}

func testCloseAndErrors(t *testing.T, backing string) {
	g, err := New(Config{Size: 4 * mib, DirtyRate: 1 << 20, Backing: backing, Prealloc: true})
	mustOK(t, err)
	mustOK(t, g.Start())
	mustOK(t, g.Close()) // stops the writers too (goleak checks)
	mustOK(t, g.Close())
	if g.Running() {
		t.Fatal("closed guest still running")
	}
	_, hugeErr := g.HugePageBytes()
	for name, err := range map[string]error{
		"Start":         g.Start(),
		"Verify":        g.Verify(),
		"Populate":      g.Populate(context.Background(), 0),
		"HugePageBytes": hugeErr,
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
	if _, err := g.Checksum(); !errors.Is(err, ErrClosed) {
		t.Errorf("Checksum after Close = %v", err)
	}
	for _, b := range g.Blocks() {
		if b.Mem != nil || b.FD != -1 {
			t.Errorf("block %s after Close: Mem %d bytes, FD %d", b.Name, len(b.Mem), b.FD)
		}
	}
}

// TestMemfdShared: with the memfd backing, the FD maps the same pages,
// directly or through /proc/self/fd/N as another process would, and its
// size is sealed.
func TestMemfdShared(t *testing.T) {
	g := newGuest(t, Config{Size: 1 * mib, Seed: 12, Backing: BackingMemfd})
	b := g.Blocks()[0]
	m1, err := unix.Mmap(b.FD, 0, len(b.Mem), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	mustOK(t, err)
	defer unix.Munmap(m1)
	f, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", b.FD), os.O_RDWR, 0)
	mustOK(t, err)
	defer f.Close()
	m2, err := unix.Mmap(int(f.Fd()), 0, len(b.Mem), unix.PROT_READ, unix.MAP_SHARED)
	mustOK(t, err)
	defer unix.Munmap(m2)
	if !bytes.Equal(m1, b.Mem) || !bytes.Equal(m2, b.Mem) {
		t.Fatal("re-mapped memfd shows different bytes")
	}
	m1[PageSize+5] ^= 0xaa
	if b.Mem[PageSize+5] != m1[PageSize+5] || m2[PageSize+5] != m1[PageSize+5] {
		t.Fatal("a write through one mapping is not visible in the others")
	}
	m1[PageSize+5] ^= 0xaa
	mustOK(t, g.Verify())
	if err := unix.Ftruncate(b.FD, int64(len(b.Mem))/2); err == nil {
		t.Fatal("the memfd could be shrunk: it should be sealed")
	}
}

func resident(t *testing.T, mem []byte) int {
	vec := make([]byte, (len(mem)+PageSize-1)/PageSize)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

func TestPopulate(t *testing.T) {
	for _, backing := range []string{BackingAnon, BackingMemfd} {
		t.Run(backing, func(t *testing.T) { testPopulate(t, backing) })
	}
}

func testPopulate(t *testing.T, backing string) {
	cfg := Config{Size: 16 * mib, Seed: 4, Backing: backing}
	src := newGuest(t, cfg)
	dst := newDest(t, cfg)
	ram := dst.Blocks()[0]
	if n := resident(t, ram.Mem); n != 0 {
		t.Fatalf("fresh destination has %d resident pages, want 0", n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := dst.Populate(ctx, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("Populate with a cancelled context = %v", err)
	}
	if err := dst.Populate(context.Background(), 5); err == nil {
		t.Fatal("Populate of a block that does not exist succeeded")
	}
	// Receive while populating, as the loader does.
	done := make(chan error, 1)
	go func() { done <- dst.Populate(context.Background(), 0) }()
	for i, b := range src.Blocks() {
		for p := b.Pages() - 1; p >= 0; p-- { // from the end, to cross the populator
			copy(dst.Blocks()[i].Page(p), b.Page(p))
		}
	}
	err := <-done
	if errors.Is(err, ErrPopulateUnsupported) {
		t.Skip("kernel lacks MADV_POPULATE_WRITE (Linux 5.14+)")
	}
	mustOK(t, err)
	if n := resident(t, ram.Mem); n != ram.Pages() {
		t.Fatalf("%d of %d pages resident after Populate", n, ram.Pages())
	}
	mustOK(t, dst.Verify())
	for i, b := range src.Blocks() {
		if !bytes.Equal(b.Mem, dst.Blocks()[i].Mem) {
			t.Fatalf("block %s changed by populating concurrently with writes", b.Name)
		}
	}
}

func TestValidateBlocks(t *testing.T) {
	ok := func() *Block { return &Block{Name: "a", PageSize: 4096, Mem: make([]byte, 8192), FD: -1} }
	mustOK(t, ValidateBlocks([]*Block{ok()}))
	bad := map[string][]*Block{
		"none":       nil,
		"nil":        {nil},
		"empty name": {{Name: "", PageSize: 4096, Mem: make([]byte, 4096)}},
		"long name":  {{Name: strings.Repeat("x", 256), PageSize: 4096, Mem: make([]byte, 4096)}},
		"duplicate":  {ok(), ok()},
		"page size":  {{Name: "a", PageSize: 3000, Mem: make([]byte, 6000)}},
		"odd size":   {{Name: "a", PageSize: 4096, Mem: make([]byte, 5000)}},
		"empty":      {{Name: "a", PageSize: 4096}},
	}
	for name, bl := range bad {
		if err := ValidateBlocks(bl); !errors.Is(err, ErrLayout) {
			t.Errorf("%s: ValidateBlocks = %v, want ErrLayout", name, err)
		}
	}
}

// TestVerifyReportsLowestPage: with damage in several 4 MiB chunks checked
// in parallel, Verify names the lowest one.
func TestVerifyReportsLowestPage(t *testing.T) {
	g := newGuest(t, Config{Size: 16 * mib, Seed: 21, VRAM: -1})
	ram := g.Blocks()[0]
	for _, p := range []int{3*chunkPages + 5, chunkPages + 7, 2*chunkPages + 1} {
		ram.Page(p)[200] ^= 1
	}
	var ve *VerifyError
	if err := g.Verify(); !errors.As(err, &ve) || ve.Page != chunkPages+7 || ve.At != 200 {
		t.Fatalf("Verify = %v, want page %d byte 200", err, chunkPages+7)
	}
}
