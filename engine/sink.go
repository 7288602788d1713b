package engine

import (
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/stream"
)

// A ramSink is where the page scanner (sender.sendDirty) puts the pages of
// a pass. The frozen configuration chooses it when the migration starts:
// RAM records on the main stream (streamSink, plain precopy), multifd
// packets on N channels (multifdSink), and later pages at fixed file
// offsets (mapped-ram) or one-sided writes (RDMA). The scanner finds the
// dirty pages, decides which are zero where the main channel detects them
// (multifd.Classify), paces the pass and publishes statistics; a sink only
// moves pages. A sink belongs to the migration goroutine.
//
// A pass is begin, then put for every dirty page with a boundary every
// SectionBytes (where the scanner paces and checks for cancellation), then
// end. The final pass (final true) runs with the guest stopped and is
// followed by the device state on the main stream.
type ramSink interface {
	// begin opens a pass (or, after a boundary, continues it).
	begin(final bool) error
	// put sends page p of block b; zero means the scanner found it all
	// zero and the main channel must say so (a ZERO record). It returns
	// about how many bytes it queued, for pacing.
	put(b *guest.Block, p int, zero bool) (int, error)
	// boundary ends a chunk of the pass: the scanner paces and checks for
	// cancellation next, then calls begin again.
	boundary() error
	// end ends the pass: every page put is on its way, in order with what
	// the main stream carries next (multifd: every channel synced, then the
	// FLUSH record).
	end(final bool) error
	// sent returns the bytes the sink moved outside the main stream so far
	// (the main stream's are the encoder's).
	sent() uint64
	// zeros returns the pages the sink itself found zero (multifd's
	// zero-page detection), beyond those the scanner classified.
	zeros() uint64
	// close stops the sink's goroutines and releases its channels; it is
	// called once, on success or failure.
	close() error
}

// streamSink puts pages on the main stream as QEMU's RAM records: PAGE and
// ZERO records in RAM section parts (END for the final pass).
type streamSink struct {
	enc *stream.Encoder
}

func (k *streamSink) begin(final bool) error {
	if final {
		return k.enc.BeginRAMEnd()
	}
	return k.enc.BeginRAMPart()
}

func (k *streamSink) put(b *guest.Block, p int, zero bool) (int, error) {
	off := uint64(p) * uint64(b.PageSize)
	if zero {
		return 9, k.enc.PutZero(b.Name, off)
	}
	return b.PageSize + 8, k.enc.PutPage(b.Name, off, b.Page(p))
}

func (k *streamSink) boundary() error { return k.enc.CloseRAMSection() }

func (k *streamSink) end(bool) error {
	if err := k.enc.CloseRAMSection(); err != nil {
		return err
	}
	return k.enc.Flush()
}

func (k *streamSink) sent() uint64  { return 0 }
func (k *streamSink) zeros() uint64 { return 0 }
func (k *streamSink) close() error  { return nil }
