package guest

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// PageSize is the page size of the built-in guest's blocks.
const PageSize = 4096

// Limits of [Config].
const (
	// MaxWriters bounds Config.Writers.
	MaxWriters = 256
	// DefaultVRAM is the size of the "vga.vram" block when Config.VRAM is 0.
	DefaultVRAM = 1 << 20
	// maxBlockSize keeps page numbers within the 32 bits of a page header.
	maxBlockSize = int64(1<<32) * PageSize
)

// Config describes a built-in guest. The zero value is not valid: Size is
// required. Two guests built from Configs that differ only in DirtyRate or
// Writers have the same [Builtin.ID] and can migrate into each other.
type Config struct {
	// Size of the "pc.ram" block in bytes: a positive multiple of 4096.
	Size int64
	// DirtyRate is the total rate, in bytes per second, at which the
	// writers rewrite pages while the guest runs (whole pages, so the
	// granularity is 4096 bytes). 0 means an idle guest with no writers.
	DirtyRate int64
	// Seed determines the content, which pages are zero, and the MAC.
	Seed uint64
	// Writers is the number of writer goroutines ("vCPUs") sharing
	// DirtyRate; 0 means 1. Each owns a disjoint set of pages.
	Writers int
	// ZeroFraction of the pages (0..1, e.g. 0.1) are zero and stay zero:
	// writers never touch them. Which pages follows from Seed.
	ZeroFraction float64
	// Random fills pages with incompressible pseudo-random bytes (for
	// benchmarks). Otherwise pages are compressible (about half their bytes
	// are zero) and a rewrite changes only one word in eight, as an
	// XBZRLE-style delta encoder would like.
	Random bool
	// VRAM is the size of the second block, "vga.vram": 0 means
	// [DefaultVRAM] (1 MiB), a negative value means no second block.
	VRAM int64
	// Backing chooses what holds the guest's RAM: [BackingAnon] (the
	// default, also for "") or [BackingMemfd]. It is not part of the
	// identity: a guest on one backing migrates into a guest on the other.
	// See "Memory backing" in the package documentation.
	Backing string `json:",omitempty"`
	// Prealloc makes New and NewDestination fault in all of RAM before they
	// return, as QEMU's -mem-prealloc does, and record how long it took
	// ([Builtin.PrepareTime]). Without it, RAM is faulted in as it is
	// first written (a source's fill pre-faults as it goes; a destination
	// is left to its loader's Populate). Not part of the identity.
	Prealloc bool `json:",omitempty"`
	// UUID is the guest's UUID (QEMU's -uuid); zero means none, as QEMU
	// without -uuid. It is not part of [Builtin.ID]: two guests with
	// different UUIDs have the same layout, and whether a migration
	// between them is refused is the capability validate-uuid's business.
	UUID UUID
	// RunLogFile, when set, is a file to which the guest appends a line
	// on every Start and Stop, on CLOCK_MONOTONIC, written so that it
	// survives the process being killed (see [ParseRunLog]): evidence, across
	// processes, of when each guest ran. Not part of the identity.
	RunLogFile string `json:",omitempty"`
}

// Values of [Config.Backing].
const (
	// BackingAnon: private anonymous memory advised with MADV_HUGEPAGE,
	// as QEMU allocates RAM without a memory-backend file. Faults come in
	// 2 MiB huge pages where the host's transparent huge pages allow it
	// (enabled = always or madvise). Only this process can map it:
	// Block.FD is -1.
	BackingAnon = "anon"
	// BackingMemfd: a sealed memfd mapped shared; Block.FD is the memfd,
	// which another process (the vCPU process of postcopy, package
	// guest/proc) maps to share the pages. It is shmem: it gets huge pages
	// only where /sys/kernel/mm/transparent_hugepage/shmem_enabled allows
	// (on this project's machines it is "never": 4 KiB faults only).
	BackingMemfd = "memfd"
)

func (c *Config) validate() error {
	if c.Size <= 0 || c.Size%PageSize != 0 {
		return fmt.Errorf("guest: Size %d: use a positive multiple of %d bytes: %w", c.Size, PageSize, ErrConfig)
	}
	if c.Size > maxBlockSize {
		return fmt.Errorf("guest: Size %d exceeds the %d-byte limit of one block: %w", c.Size, maxBlockSize, ErrConfig)
	}
	if c.VRAM > 0 && (c.VRAM%PageSize != 0 || c.VRAM > maxBlockSize) {
		return fmt.Errorf("guest: VRAM %d: use a multiple of %d bytes up to %d, 0 for the default, or -1 for none: %w", c.VRAM, PageSize, maxBlockSize, ErrConfig)
	}
	if c.DirtyRate < 0 {
		return fmt.Errorf("guest: DirtyRate %d is negative: use 0 for an idle guest: %w", c.DirtyRate, ErrConfig)
	}
	if c.Writers < 0 || c.Writers > MaxWriters {
		return fmt.Errorf("guest: Writers %d: use 0..%d: %w", c.Writers, MaxWriters, ErrConfig)
	}
	if c.Backing != "" && c.Backing != BackingAnon && c.Backing != BackingMemfd {
		return fmt.Errorf("guest: Backing %q: use %q (the default) or %q: %w", c.Backing, BackingAnon, BackingMemfd, ErrConfig)
	}
	if math.IsNaN(c.ZeroFraction) || c.ZeroFraction < 0 || c.ZeroFraction > 1 {
		return fmt.Errorf("guest: ZeroFraction %v: use a fraction in 0..1: %w", c.ZeroFraction, ErrConfig)
	}
	return nil
}

func (c *Config) writers() int {
	if c.Writers == 0 {
		return 1
	}
	return c.Writers
}

// backing returns Backing with the default applied.
func (c *Config) backing() string {
	if c.Backing == "" {
		return BackingAnon
	}
	return c.Backing
}

func (c *Config) vram() int64 {
	switch {
	case c.VRAM == 0:
		return DefaultVRAM
	case c.VRAM < 0:
		return 0
	}
	return c.VRAM
}

// id builds the identity string: layout plus the content rule, because
// Verify on a destination derives the expected content from it.
func (c *Config) id(blocks []*Block, devs []Device) string {
	var sb strings.Builder
	sb.WriteString("migctl-builtin/1 page=")
	sb.WriteString(strconv.Itoa(PageSize))
	sb.WriteString(" blocks=")
	for i, b := range blocks {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, "%s:%d", b.Name, len(b.Mem))
	}
	sb.WriteString(" devices=")
	for i, d := range devs {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, "%s.%d:v%d", d.Name(), d.Instance(), d.Version())
	}
	content := "compressible"
	if c.Random {
		content = "random"
	}
	fmt.Fprintf(&sb, " seed=%#x zero=%s content=%s", c.Seed, strconv.FormatFloat(c.ZeroFraction, 'g', -1, 64), content)
	return sb.String()
}
