package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/mappedram"
	"github.com/migctl/migctl/multifd"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// mappedSink writes pages as QEMU's mapped-ram does (capability
// mapped-ram, on file: or an fd: naming a regular file): each page at its
// fixed offset of the file, through a mappedram.Saver, again in place when
// the page is dirtied again. Without multifd one goroutine writes while
// the scanner goes on; with multifd the Saver's multifd-channels
// goroutines pwrite in parallel (QEMU's channel threads, which for a file
// write no multifd packets). The main stream carries only the RAM
// sections' framing (EOS); no MULTIFD_FLUSH record. Zero pages the scanner
// found are marked absent (MarkZero); under zero-page-detection multifd
// with multifd the channels find them (mappedram.Options.DetectZero).
//
// The end sequence is the format's (package mappedram): the final pass's
// END section (EOS only), then Finish (bitmaps, integrity records,
// fdatasync) in end; the engine then writes the devices and closes the
// encoder (EOF, vmdesc), and complete writes the completion marker, the
// file's last bytes. A save that stops anywhere before leaves no marker,
// and the file is refused on restore.
//
// The sink belongs to the migration goroutine; the Saver's goroutines
// only read guest memory and write the file.
type mappedSink struct {
	main streamSink // the RAM sections' framing: EOS only
	ctx  context.Context
	// f is a duplicate of the channel's file descriptor (the same open
	// file description, so the same offset the encoder writes at): the
	// engine's cancel closes the channel under a blocked write, and the
	// Saver's goroutines must never write to a descriptor number that was
	// closed and reused meanwhile.
	f     *os.File
	start int64 // file offset of the stream's first byte
	o     mappedram.Options
	sv    *mappedram.Saver
	per   int // pages per batch handed to a channel

	// the batch being filled (owned by the migration goroutine; the Saver
	// owns a batch once submitted, until the pass's Sync)
	block *guest.Block
	offs  []uint64
	pages [][]byte
}

// prepareMapped checks that conn is a regular file and takes what the
// sink needs from it before the first byte of the stream is written: the
// stream's start (file:'s offset=, or an fd:'s current offset) and a
// descriptor of its own. An fd: is cut at its start, as file: is by
// opening: nothing of an earlier, longer file survives past the stream.
func prepareMapped(ctx context.Context, conn transport.Conn, cfg guards.Config, pageSize uint64) (*mappedSink, error) {
	cf, ok := transport.RegularFile(conn)
	if !ok {
		return nil, fmt.Errorf("capability mapped-ram writes pages at fixed offsets of a regular file, and %s is not one: use file:PATH, or fd: on a regular file, or switch mapped-ram off", conn.Addr())
	}
	f, err := transport.DupFile(cf)
	if err != nil {
		return nil, fmt.Errorf("mapped-ram: %w", err)
	}
	k := &mappedSink{ctx: ctx, f: f}
	if err := k.prepare(conn.Addr(), cfg, pageSize); err != nil {
		f.Close()
		return nil, err
	}
	return k, nil
}

func (k *mappedSink) prepare(a transport.Addr, cfg guards.Config, pageSize uint64) error {
	fl, err := unix.FcntlInt(k.f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("mapped-ram: %s: %w", a, err)
	}
	if fl&unix.O_APPEND != 0 {
		return fmt.Errorf("capability mapped-ram writes at fixed offsets, and %s is open with O_APPEND (every write goes to the end): open it without O_APPEND", a)
	}
	if k.start, err = k.f.Seek(0, io.SeekCurrent); err != nil {
		return fmt.Errorf("mapped-ram: %s: %w", a, err)
	}
	if a.Scheme == transport.SchemeFD {
		if err := k.f.Truncate(k.start); err != nil {
			return fmt.Errorf("mapped-ram: cutting %s at its offset %d: %w", a, k.start, err)
		}
	}
	multi := cfg.Caps["multifd"]
	channels := 1
	if multi {
		if channels, err = strconv.Atoi(cfg.Params["multifd-channels"]); err != nil || channels < 1 {
			return fmt.Errorf("multifd-channels %q: want a channel count of at least 1", cfg.Params["multifd-channels"])
		}
	}
	zero, err := multifd.ParseZeroPageDetection(cfg.Params["zero-page-detection"])
	if err != nil {
		return err
	}
	k.o = mappedram.Options{
		PageSize: pageSize,
		Channels: channels,
		// QEMU's migrate_direct_io: direct-io takes effect with mapped-ram
		// and multifd only.
		DirectIO: multi && cfg.Params["direct-io"] == "true",
		// The channels detect zero pages only under multifd's own mode;
		// legacy (or any mode without multifd) is the scanner's
		// (multifd.Classify), none writes every page.
		DetectZero: multi && zero == multifd.ZeroMultifd,
	}
	k.per = multifd.PagesPerPacket(pageSize)
	return nil
}

// startRAM writes the RAM SECTION_START with the mapped-ram block list and
// headers (the regions are left as holes) and starts the Saver.
func (k *mappedSink) startRAM(enc *stream.Encoder, pageSize uint64, blocks []stream.Block) error {
	k.main.enc = enc
	layout, err := enc.StartRAMMapped(pageSize, blocks, k.f, mappedram.RecordSize)
	if err != nil {
		return err
	}
	k.sv, err = mappedram.NewSaver(k.f, layout, k.o)
	return err
}

func (k *mappedSink) begin(final bool) error { return k.main.begin(final) }

func (k *mappedSink) put(b *guest.Block, p int, zero bool) (int, error) {
	off := uint64(p) * uint64(b.PageSize)
	if zero {
		// Nothing is written; the page's bit is cleared (a page that was
		// written earlier and became zero reads as zero).
		return 8, k.sv.MarkZero(b.Name, []uint64{off})
	}
	if k.block != b || len(k.offs) == k.per {
		if err := k.dispatch(); err != nil {
			return 0, err
		}
		k.block = b
	}
	k.offs = append(k.offs, off)
	k.pages = append(k.pages, b.Page(p))
	return b.PageSize, nil
}

// dispatch hands the batch being filled to the next idle channel. The
// Saver reads the pages when it writes them: a page the guest dirties
// meanwhile is in the next pass too (its dirty bit is set after the
// write), and the pass's Sync keeps the older copy from landing last.
func (k *mappedSink) dispatch() error {
	if len(k.offs) == 0 {
		return nil
	}
	offs, pages := k.offs, k.pages
	k.offs = make([]uint64, 0, k.per)
	k.pages = make([][]byte, 0, k.per)
	return k.sv.Submit(k.ctx, k.block.Name, offs, pages)
}

func (k *mappedSink) boundary() error {
	if err := k.dispatch(); err != nil {
		return err
	}
	return k.main.boundary()
}

// end waits for every channel to write the pass (the per-pass sync, with
// nothing on the wire), ends the RAM section, and after the final pass
// writes the bitmaps and integrity records (Finish).
func (k *mappedSink) end(final bool) error {
	if err := k.dispatch(); err != nil {
		return err
	}
	if err := k.sv.Sync(k.ctx); err != nil {
		return err
	}
	if err := k.main.end(final); err != nil {
		return err
	}
	if final {
		return k.sv.Finish(k.ctx)
	}
	return nil
}

// complete writes the completion marker; the engine calls it after the
// encoder's Close (device state, EOF and vmdesc on the disk's way).
func (k *mappedSink) complete() error {
	if err := k.sv.Complete(k.start); err != nil {
		return fmt.Errorf("finish the mapped-ram file: %w", err)
	}
	return nil
}

func (k *mappedSink) sent() uint64 {
	if k.sv == nil {
		return 0
	}
	return k.sv.Stats().Bytes
}

func (k *mappedSink) zeros() uint64 {
	if k.sv == nil {
		return 0
	}
	return k.sv.Stats().Zeros
}

// close stops the Saver's goroutines (a write in progress finishes; none
// blocks on a peer) and closes the sink's descriptors. Safe to call twice.
func (k *mappedSink) close() error {
	var errs []error
	if k.sv != nil {
		errs = append(errs, k.sv.Close())
	}
	if k.f != nil {
		errs = append(errs, k.f.Close())
		k.f = nil
	}
	return errors.Join(errs...)
}

// probeProps returns a's probed properties for the rules
// (guards.Endpoint.Props), or nil when the spec's declaration applies:
// for schemes the probe does not answer, and when it fails (opening the
// address then reports why).
func probeProps(probe func(transport.Addr) (transport.Props, bool, error), a transport.Addr) map[string]bool {
	if probe == nil {
		probe = transport.Probe
	}
	p, ok, err := probe(a)
	if err != nil || !ok {
		return nil
	}
	return p.Map()
}
