package guest

import (
	"errors"
	"fmt"
)

// Block is one RAM region of a guest.
//
// The engine reads and writes Mem directly: on the source it reads pages
// the dirty log reports; on the destination it writes received pages into
// Mem before the guest starts. Callers must not change the fields.
type Block struct {
	Name     string // e.g. "pc.ram"; <= 255 bytes
	PageSize int    // 4096 for the built-in guest
	Mem      []byte // the guest's bytes (mmap'd; len = size, a multiple of PageSize)
	FD       int    // memfd backing Mem, or -1
}

// Pages returns the number of pages in the block.
func (b *Block) Pages() int {
	if b.PageSize <= 0 {
		return 0
	}
	return len(b.Mem) / b.PageSize
}

// Page returns the bytes of page i (a sub-slice of Mem, not a copy).
func (b *Block) Page(i int) []byte {
	off := i * b.PageSize
	return b.Mem[off : off+b.PageSize : off+b.PageSize]
}

// MaxBlockName is the longest block name, in bytes, that the stream format
// can carry (a one-byte length prefix).
const MaxBlockName = 255

// ValidateBlocks checks the layout rules every Guest must follow: at least
// one block; names non-empty, at most [MaxBlockName] bytes and unique; page
// sizes a power of two of at least 512; each Mem a non-zero multiple of its
// page size. The engine calls it before migrating, so that a broken
// embedder fails early with a clear reason.
func ValidateBlocks(blocks []*Block) error {
	if len(blocks) == 0 {
		return fmt.Errorf("guest: no RAM blocks: a guest needs at least one: %w", ErrLayout)
	}
	seen := make(map[string]bool, len(blocks))
	for i, b := range blocks {
		switch {
		case b == nil:
			return fmt.Errorf("guest: block %d is nil: %w", i, ErrLayout)
		case b.Name == "":
			return fmt.Errorf("guest: block %d has an empty name: name every block: %w", i, ErrLayout)
		case len(b.Name) > MaxBlockName:
			return fmt.Errorf("guest: block name %.32q... is %d bytes: shorten it to at most %d: %w", b.Name, len(b.Name), MaxBlockName, ErrLayout)
		case seen[b.Name]:
			return fmt.Errorf("guest: block name %q is used twice: names must be unique: %w", b.Name, ErrLayout)
		case b.PageSize < 512 || b.PageSize&(b.PageSize-1) != 0:
			return fmt.Errorf("guest: block %q has page size %d: use a power of two >= 512: %w", b.Name, b.PageSize, ErrLayout)
		case len(b.Mem) == 0 || len(b.Mem)%b.PageSize != 0:
			return fmt.Errorf("guest: block %q is %d bytes: its size must be a non-zero multiple of its page size %d: %w", b.Name, len(b.Mem), b.PageSize, ErrLayout)
		}
		seen[b.Name] = true
	}
	return nil
}

// NewBitmaps returns one zeroed dirty bitmap per block, each with one bit
// per page: the dst argument [Guest.SyncDirty] expects. Convert an entry
// with Bitmap(dst[i]) to use the [Bitmap] methods.
func NewBitmaps(blocks []*Block) [][]uint64 {
	dst := make([][]uint64, len(blocks))
	for i, b := range blocks {
		dst[i] = NewBitmap(b.Pages())
	}
	return dst
}

// Device is a piece of device state migrated as one opaque blob.
type Device interface {
	Name() string            // idstr in the stream, e.g. "timer"
	Instance() uint32        // instance number, to tell apart devices with the same Name
	Version() uint32         // version of the Save format; the loader refuses a mismatch
	Save() ([]byte, error)   // called with the guest stopped
	Load(state []byte) error // on the destination, before Start
	NeedsLock() bool         // Load touches state shared with the control plane: the loader takes the controller lock around it
}

// Guest is what an embedder implements so that migctl can migrate it.
//
// The engine calls the dirty-log methods (StartDirtyLog, SyncDirty,
// StopDirtyLog) from one goroutine at a time; Stop, Start and Running may be
// called from any goroutine.
type Guest interface {
	// ID is checked at connect: two guests with the same ID have the same
	// layout (block names, sizes, page size, device set).
	ID() string
	// Blocks returns the RAM blocks, always the same ones in the same order.
	Blocks() []*Block
	// Devices returns the devices, always the same ones in the same order.
	Devices() []Device
	// SyncDirty ORs into dst[i] (one bit per page of Blocks()[i],
	// little-endian bit order within uint64 words: page p is bit p%64 of
	// word p/64) every page written since the previous SyncDirty (or since
	// StartDirtyLog), and clears the guest's own record. It may report a
	// page that was written just before, never miss one written since (see
	// the dirty-log rule in the package documentation). dst must come from
	// [NewBitmaps] or have the same shape. Outside StartDirtyLog ...
	// StopDirtyLog the result is unspecified.
	SyncDirty(dst [][]uint64)
	// StartDirtyLog begins tracking; the first SyncDirty after it reports
	// only pages written since.
	StartDirtyLog()
	// StopDirtyLog ends tracking and drops the record.
	StopDirtyLog()
	// Stop pauses every writer/vCPU and returns when none is running
	// (switchover). Stopping a stopped guest does nothing.
	Stop() error
	// Start resumes (or starts for the first time). Starting a running
	// guest does nothing.
	Start() error
	// Running reports whether the guest runs (between Start and Stop).
	Running() bool
}

// Throttler is optional: a guest that can slow its writers (auto-converge).
// Throttle(p) makes the writers do (100-p)% of their normal work; p is
// clamped to 0..100, and 0 removes the throttle.
type Throttler interface{ Throttle(percent int) }

// Errors callers branch on; the returned errors wrap them with the details.
var (
	// ErrLayout: a guest's blocks break the rules of [ValidateBlocks].
	ErrLayout = errors.New("invalid guest layout")
	// ErrConfig: a [Config] field is out of range.
	ErrConfig = errors.New("invalid guest configuration")
	// ErrRunning: the operation needs a stopped guest.
	ErrRunning = errors.New("guest is running: stop it first")
	// ErrClosed: the guest has been closed.
	ErrClosed = errors.New("guest is closed")
	// ErrDeviceState: a device refused the state given to Load.
	ErrDeviceState = errors.New("malformed device state")
	// ErrPopulateUnsupported: the kernel has no MADV_POPULATE_WRITE (Linux
	// 5.14+), so memory cannot be pre-faulted; first touches cost a fault.
	ErrPopulateUnsupported = errors.New("MADV_POPULATE_WRITE not supported by this kernel")
)
