package mappedram

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"sync"

	"github.com/migctl/migctl/stream"
	"golang.org/x/sys/unix"
)

// LoadChunk is the most one pread reads (QEMU's MAPPED_RAM_LOAD_BUF_SIZE).
const LoadChunk = 1 << 20

type loadBlock struct {
	stream.MappedRAMBlock
	bits    []uint64
	present int
}

// BlockInfo describes a block of an opened file.
type BlockInfo struct {
	Name    string
	Size    uint64
	Present int // pages stored in the file; the others are zero
}

// Restore is a verified mapped-ram file, ready to load. Open checks
// everything the file says about itself before it returns, so Load never
// writes a page of a file that fails a check.
type Restore struct {
	f      *os.File
	pagesF *os.File
	o      Options
	align  int
	idx    *stream.MappedRAMIndex
	blocks []*loadBlock
}

// Open verifies the mapped-ram file f whose stream starts at file offset
// start (0, or file:'s offset=) and returns it ready to Load. Nothing is
// written anywhere. In this order it checks:
//
//  1. the completion marker (the last 64 bytes): absent means the save did
//     not finish and the file is refused (ErrIncomplete), never loaded as
//     zero pages; its own CRC, its stream range [start, end);
//  2. the main stream's structure up to the RAM block list, every header
//     against migctl's layout and o.Limits (stream.ScanMappedRAM);
//  3. per block, its integrity record (present, own CRC), then the CRC of
//     its header and of its bitmap, the bitmap's population, and that no
//     bit lies beyond the block's last page;
//  4. the CRC of all the records, and of every byte of the main stream
//     (so the device state is checked too), against the marker.
//
// A failure is an *Error (or a *stream.DecodeError for the structure) whose
// class says what to do: ErrIncomplete, stream.ErrCorrupt (reason
// ErrChecksum or stream.ErrPageOutside), stream.ErrMismatch, ...
func Open(f *os.File, start int64, o Options) (*Restore, error) {
	o, err := o.normalize()
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("mapped-ram: %w", err)
	}
	size := st.Size()
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file: mapped-ram needs a seekable file", ErrInvalid, f.Name())
	}
	if size < start+TrailerSize {
		return nil, &Error{Offset: size, Class: ErrIncomplete, Detail: fmt.Sprintf("file of %d bytes has no completion marker: the save did not finish; refusing to load it", size)}
	}
	tb := make([]byte, TrailerSize)
	if _, err := f.ReadAt(tb, size-TrailerSize); err != nil {
		return nil, fmt.Errorf("mapped-ram: reading the completion marker: %w", err)
	}
	t, err := parseTrailer(tb)
	switch {
	case errors.Is(err, errIncomplete):
		return nil, &Error{Offset: size - TrailerSize, Class: ErrIncomplete, Detail: "the file does not end with migctl's completion marker: the save did not finish (or the file is not a migctl mapped-ram file); refusing to load it"}
	case err != nil:
		return nil, &Error{Offset: size - TrailerSize, Class: stream.ErrCorrupt, Reason: ErrChecksum, Detail: err.Error()}
	case t.StreamEnd != uint64(size-TrailerSize) || t.StreamStart != uint64(start):
		return nil, bad(size-TrailerSize, "", nil, "completion marker covers stream [%#x, %#x), the file holds [%#x, %#x)", t.StreamStart, t.StreamEnd, start, size-TrailerSize)
	}
	end := size - TrailerSize
	idx, err := stream.ScanMappedRAM(f, start, end, o.Limits, RecordSize)
	if err != nil {
		return nil, err
	}
	if uint32(len(idx.Blocks)) != t.Blocks {
		return nil, bad(end, "", nil, "the stream lists %d RAM blocks, the completion marker %d", len(idx.Blocks), t.Blocks)
	}
	r := &Restore{f: f, pagesF: f, o: o, align: 1, idx: idx}
	var records []byte
	rb := make([]byte, RecordSize)
	for _, mb := range idx.Blocks {
		if _, err := f.ReadAt(rb, int64(mb.ReservedOffset)); err != nil {
			return nil, fmt.Errorf("mapped-ram: reading the integrity record of %q: %w", mb.Name, err)
		}
		rec, why := parseRecord(rb)
		if why != "" {
			cls, reason := stream.ErrCorrupt, ErrChecksum
			if binary.BigEndian.Uint32(rb) != RecordMagic {
				cls, reason = ErrIncomplete, nil
			}
			return nil, &Error{Offset: int64(mb.ReservedOffset), Class: cls, Reason: reason, Block: mb.Name, Detail: fmt.Sprintf("block %q: %s", mb.Name, why)}
		}
		hb, _ := mb.Header.AppendBinary(nil)
		if crc(hb) != rec.HeaderCRC {
			return nil, bad(int64(mb.HeaderOffset), mb.Name, ErrChecksum, "block %q: its header fails the CRC-32C in its integrity record", mb.Name)
		}
		if rec.Size != mb.Size {
			return nil, bad(int64(mb.ReservedOffset), mb.Name, nil, "block %q is %#x bytes in the stream, %#x in its integrity record", mb.Name, mb.Size, rec.Size)
		}
		bm := make([]byte, stream.MappedRAMBitmapSize(mb.Size, o.PageSize))
		if _, err := f.ReadAt(bm, int64(mb.Header.BitmapOffset)); err != nil {
			return nil, fmt.Errorf("mapped-ram: reading the bitmap of %q: %w", mb.Name, err)
		}
		if crc(bm) != rec.BitmapCRC {
			return nil, bad(int64(mb.Header.BitmapOffset), mb.Name, ErrChecksum, "block %q: its bitmap fails the CRC-32C in its integrity record", mb.Name)
		}
		lb := &loadBlock{MappedRAMBlock: mb, bits: make([]uint64, len(bm)/8)}
		pages := mb.Size / o.PageSize
		for i := range lb.bits {
			w := binary.LittleEndian.Uint64(bm[8*i:])
			lb.bits[i] = w
			lb.present += bits.OnesCount64(w)
		}
		if rem := pages % 64; rem != 0 {
			if extra := lb.bits[len(lb.bits)-1] >> rem; extra != 0 {
				return nil, bad(int64(mb.Header.BitmapOffset), mb.Name, stream.ErrPageOutside,
					"block %q: its bitmap marks page %d present, the block has %d pages", mb.Name, uint64(len(lb.bits)-1)*64+rem+uint64(bits.TrailingZeros64(extra)), pages)
			}
		}
		if uint32(lb.present) != rec.Present {
			return nil, bad(int64(mb.Header.BitmapOffset), mb.Name, ErrChecksum, "block %q: bitmap has %d pages, its record says %d", mb.Name, lb.present, rec.Present)
		}
		records = append(records, rb...)
		r.blocks = append(r.blocks, lb)
	}
	if crc(records) != t.RecordsCRC {
		return nil, bad(end, "", ErrChecksum, "the integrity records fail the completion marker's CRC-32C")
	}
	sum, err := streamChecksum(f, idx)
	if err != nil {
		return nil, err
	}
	if sum != t.StreamCRC {
		return nil, bad(start, "", ErrChecksum, "the main stream fails the completion marker's CRC-32C")
	}
	if o.DirectIO {
		pf, err := reopen(f, unix.O_RDONLY|unix.O_DIRECT)
		if err != nil {
			return nil, err
		}
		r.pagesF = pf
		r.align = dioAlignment(pf)
	}
	return r, nil
}

// Blocks lists the file's RAM blocks in stream order.
func (r *Restore) Blocks() []BlockInfo {
	out := make([]BlockInfo, len(r.blocks))
	for i, b := range r.blocks {
		out[i] = BlockInfo{Name: b.Name, Size: b.Size, Present: b.present}
	}
	return out
}

// Stream returns the file's main stream without its mapped-ram parts, for a
// stream.Decoder (give it the same Limits): its MEM_SIZE lists the blocks,
// its RAM sections carry no pages (a page record there is corrupt), and the
// device state follows.
func (r *Restore) Stream() io.Reader { return r.idx.StreamReader(r.f) }

type loadJob struct {
	b        *loadBlock
	off, len uint64
	dst      []byte
}

// Load reads every present page into guest memory: mem(name) returns the
// whole block (at least its size; typically page-aligned guest RAM). Pages
// absent from the bitmap are not touched (zero in a fresh destination).
// Runs of present pages are read in chunks of at most LoadChunk by
// Options.Channels goroutines in parallel, each pread straight into mem.
func (r *Restore) Load(ctx context.Context, mem func(block string) []byte) error {
	dsts := make([][]byte, len(r.blocks))
	for i, b := range r.blocks {
		m := mem(b.Name)
		if uint64(len(m)) < b.Size {
			return fmt.Errorf("%w: memory for block %q is %d bytes, the block %d", ErrInvalid, b.Name, len(m), b.Size)
		}
		dsts[i] = m
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := make(chan loadJob)
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	fail := func(err error) {
		once.Do(func() { firstErr = err; cancel(err) })
	}
	for range r.o.Channels {
		wg.Go(func() {
			var bounce []byte
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				dst := j.dst
				direct := r.align == 1 || aligned(dst, r.align)
				if !direct {
					if bounce == nil {
						bounce = alignedBuf(LoadChunk, r.align)
					}
					dst = bounce[:len(dst)]
				}
				if err := preadAll(r.pagesF, dst, int64(j.b.Header.PagesOffset+j.off)); err != nil {
					fail(fmt.Errorf("mapped-ram: reading %d bytes of %q at %#x: %w", j.len, j.b.Name, j.off, err))
					continue
				}
				if !direct {
					copy(j.dst, dst)
				}
			}
		})
	}
	ps := r.o.PageSize
send:
	for i, b := range r.blocks {
		pages := b.Size / ps
		for p := uint64(0); p < pages; {
			if b.bits[p/64]&(1<<(p%64)) == 0 {
				p++
				continue
			}
			q := p
			for q < pages && b.bits[q/64]&(1<<(q%64)) != 0 && (q-p+1)*ps <= LoadChunk {
				q++
			}
			off, n := p*ps, (q-p)*ps
			select {
			case jobs <- loadJob{b: b, off: off, len: n, dst: dsts[i][off : off+n]}:
			case <-ctx.Done():
				break send
			}
			p = q
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mapped-ram: load: %w", context.Cause(ctx))
	}
	return nil
}

func preadAll(f *os.File, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(int(f.Fd()), p, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// Close releases the O_DIRECT descriptor; the caller keeps owning f.
func (r *Restore) Close() error {
	if r.pagesF != r.f {
		return r.pagesF.Close()
	}
	return nil
}
