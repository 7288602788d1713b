package loaders

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/mappedram"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
	"github.com/migctl/migctl/transport"
)

// mappedRAM is the destination's half of capability mapped-ram (QEMU's
// mapped-ram load): it runs after connect and before anything is written
// into the guest. handled reports that it took the migration over (its
// error, or the rest of the load's); false leaves an ordinary stream to
// the ordinary loader.
//
// With mapped-ram on, the channel must be a regular file. mappedram.Open
// verifies the whole file first (completion marker, every header, bitmap
// and integrity record, the main stream's CRC-32C), then the main stream
// is decoded once without applying anything (no page record may be there,
// every device must be this guest's), and only then does the side fire
// load: Restore.Load reads the present pages straight into guest RAM
// (multifd-channels readers with multifd, O_DIRECT with direct-io and
// multifd), and the main stream is decoded again, this time applied, for
// the device state, ending in the ordinary completion. A file that fails
// any check leaves guest RAM untouched and the guest stopped.
//
// With mapped-ram off, a regular file whose main stream lays out
// mapped-ram blocks is refused before a page is written, naming the
// capability (the handshake's must-match check at connect normally
// catches this first: this covers a handshake that does not announce it).
func (l *loader) mappedRAM(cfg guards.Config, early []transport.Conn) (handled bool, err error) {
	f, start := l.regularFile()
	lim := l.limits()
	addr := l.conn.Addr()
	if !cfg.Caps["mapped-ram"] {
		if f != nil && savedMapped(f, start, lim.PageSize) {
			closeAll(early)
			return true, fmt.Errorf("%s was saved with capability mapped-ram (pages at fixed offsets of the file), which is off on this destination: switch mapped-ram on to load it", addr)
		}
		return false, nil
	}
	closeAll(early) // a file has no other channels
	if f == nil {
		return true, fmt.Errorf("capability mapped-ram reads pages at fixed offsets of a regular file, and %s is not one: use file:PATH, or fd: on a regular file, or switch mapped-ram off", addr)
	}
	multi := cfg.Caps["multifd"]
	channels := 1
	if multi {
		if channels, err = strconv.Atoi(cfg.Params["multifd-channels"]); err != nil || channels < 1 {
			return true, fmt.Errorf("multifd-channels %q: want a channel count of at least 1", cfg.Params["multifd-channels"])
		}
	}
	o := mappedram.Options{
		PageSize: lim.PageSize,
		Channels: channels,
		DirectIO: multi && cfg.Params["direct-io"] == "true", // QEMU's migrate_direct_io
		Limits:   lim,
	}
	// A descriptor of its own: a cancel closes the channel, and the
	// readers must never pread a descriptor number closed and reused
	// meanwhile.
	df, err := transport.DupFile(f)
	if err != nil {
		return true, fmt.Errorf("mapped-ram: %w", err)
	}
	defer df.Close()
	r, err := mappedram.Open(df, start, o)
	if err != nil {
		if !savedMapped(f, start, lim.PageSize) {
			return true, fmt.Errorf("capability mapped-ram is on, and %s was not saved with it (no mapped-ram block layout): switch mapped-ram off to load it: %w", addr, err)
		}
		return true, fmt.Errorf("capability mapped-ram: %s cannot be loaded, nothing was written into the guest: %w", addr, err)
	}
	defer r.Close()
	if err := l.checkMappedStream(r, lim); err != nil {
		return true, fmt.Errorf("capability mapped-ram: %s cannot be loaded, nothing was written into the guest: %w", addr, err)
	}
	in := l.in
	in.ln.Close()
	if _, err := in.c.Fire(in.ioCtx, spec.Incoming, machine.TriggerLoad, nil); err != nil {
		return true, err
	}
	l.loaded = true
	if err := r.Load(in.ioCtx, func(name string) []byte { return l.blocks[name].Mem }); err != nil {
		return true, err
	}
	var pages, bytes uint64
	for _, b := range r.Blocks() {
		pages += uint64(b.Present)
		bytes += uint64(b.Present) * lim.PageSize
	}
	if l.pageSums != nil {
		// Absent pages are zero in the fresh destination, and a zero page's
		// sum is what pageSums holds already; hashing every page is simpler
		// than walking the bitmap and gives the same sums.
		for name, b := range l.blocks {
			sums := l.pageSums[l.index[name]]
			for p := range sums {
				sums[p] = guest.PageSum(b.Page(p))
			}
		}
	}
	l.statsMu.Lock()
	l.wire.MappedPages, l.wire.MappedBytes = pages, bytes
	l.statsMu.Unlock()
	return true, l.loop(stream.NewDecoder(r.Stream(), lim))
}

// regularFile returns the main channel's file and the offset its stream
// starts at, or nil.
func (l *loader) regularFile() (*os.File, int64) {
	pc, ok := l.conn.(*peekedConn)
	if !ok || pc.start < 0 {
		return nil, -1
	}
	f, ok := transport.RegularFile(pc.Conn)
	if !ok {
		return nil, -1
	}
	return f, pc.start
}

// limits are the bounds this destination decodes a stream with: its own
// blocks and page size, a handshake required (as load's).
func (l *loader) limits() stream.Limits {
	lim := stream.Limits{Blocks: map[string]uint64{}, RequireHandshake: true, PageSize: l.stats.PageSize}
	for name, b := range l.blocks {
		lim.Blocks[name] = uint64(len(b.Mem))
	}
	return lim
}

// savedMapped reports whether the stream in f from start lays out its RAM
// blocks as mapped-ram does (stream.ScanMappedRAM accepts it), whatever
// the blocks and whether or not the save completed.
func savedMapped(f *os.File, start int64, pageSize uint64) bool {
	st, err := f.Stat()
	if err != nil || start < 0 || start > st.Size() {
		return false
	}
	_, err = stream.ScanMappedRAM(f, start, st.Size(), stream.Limits{PageSize: pageSize}, mappedram.RecordSize)
	return err == nil
}

// checkMappedStream decodes a verified file's main stream to its EOF
// marker without applying anything: a mapped-ram stream carries no page
// records (its pages are at their offsets), and every device it holds must
// be one of this guest's, at its version, so that no such mismatch is found
// after pages were written.
func (l *loader) checkMappedStream(r *mappedram.Restore, lim stream.Limits) error {
	devs := map[string]guest.Device{}
	for _, d := range l.in.g.Devices() {
		devs[d.Name()+"\x00"+strconv.FormatUint(uint64(d.Instance()), 10)] = d
	}
	dec := stream.NewDecoder(r.Stream(), lim)
	for {
		rec, err := dec.Next()
		if errors.Is(err, io.EOF) {
			return errors.New("the main stream ended before its EOF marker")
		}
		if err != nil {
			return err
		}
		switch rec.Kind {
		case stream.KindEOF:
			return nil
		case stream.KindPage, stream.KindZero, stream.KindFlush:
			return fmt.Errorf("the main stream carries a RAM record (%s@%#x): in a mapped-ram file pages are only at their offsets", rec.Block, rec.Offset)
		case stream.KindDevice:
			d, ok := devs[rec.Section.IDStr+"\x00"+strconv.FormatUint(uint64(rec.Section.Instance), 10)]
			if !ok {
				return fmt.Errorf("the stream carries device %s (instance %d), which this guest does not have", rec.Section.IDStr, rec.Section.Instance)
			}
			if rec.Section.Version != d.Version() {
				return fmt.Errorf("device %s: stream version %d, this guest speaks %d", d.Name(), rec.Section.Version, d.Version())
			}
		}
	}
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
