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
	"sync/atomic"

	"github.com/migctl/migctl/stream"
	"golang.org/x/sys/unix"
)

// Options configure a Saver or a Restore.
type Options struct {
	// PageSize is the target page size (stream.DefaultPageSize if 0).
	PageSize uint64
	// Channels is the number of goroutines that write (Submit) or read
	// (Load) pages in parallel: multifd-channels (1 if 0).
	Channels int
	// DirectIO opens the page I/O with O_DIRECT (QEMU's direct-io
	// parameter): pages go at their 1 MiB-aligned region from page-aligned
	// buffers; a buffer that is not aligned is copied through an aligned
	// one. The main stream is never written with O_DIRECT.
	DirectIO bool
	// Limits bound the main stream when it is scanned (Complete, Open).
	// Limits.PageSize is overridden by PageSize; Limits.Blocks, if set, are
	// the destination's blocks.
	Limits stream.Limits
	// DetectZero makes the Saver's channel goroutines test each page they
	// are handed (Submit) and mark the zero ones absent instead of writing
	// them: QEMU's zero-page-detection multifd, done by the channels. Pages
	// given to WritePages directly are written as they are.
	DetectZero bool
}

func (o Options) normalize() (Options, error) {
	if o.PageSize == 0 {
		o.PageSize = stream.DefaultPageSize
	}
	if o.PageSize < stream.MinPageSize || o.PageSize > stream.MaxPageSize || o.PageSize&(o.PageSize-1) != 0 {
		return o, fmt.Errorf("%w: page size %d", ErrInvalid, o.PageSize)
	}
	if o.Channels <= 0 {
		o.Channels = 1
	}
	o.Limits.PageSize = o.PageSize
	return o, nil
}

// maxRun bounds the pages of one pwritev (IOV_MAX is 1024).
const maxRun = 256

type saveBlock struct {
	stream.MappedRAMBlock
	bits []atomic.Uint64 // page present in the file; set after its write
}

type job struct {
	b       *saveBlock
	offsets []uint64
	pages   [][]byte
}

// Saver writes the pages of a mapped-ram file. The main stream is written
// by a stream.Encoder on the same file (StartRAMMapped lays the blocks out);
// the Saver writes each page at pages_offset + offset (again in place when
// the page is dirtied again), keeps each block's bitmap (set when a page is
// written, cleared when it becomes a zero page), and at the end writes the
// bitmaps, migctl's integrity records and the completion marker.
//
// WritePages and MarkZero may be called from any number of goroutines at
// once (one per channel, as QEMU's multifd threads pwrite); Submit and Sync
// hand the same work to the Saver's own Options.Channels goroutines and are
// called from one goroutine, the page scanner. Between passes the scanner
// calls Sync: a page dirtied again in the next pass must not be written
// before its older copy (QEMU syncs its channel threads the same way, with
// nothing on the wire).
type Saver struct {
	main   *os.File
	pagesF *os.File // main, or a second O_DIRECT description of it
	o      Options
	align  int
	blocks map[string]*saveBlock
	order  []*saveBlock

	jobs chan job
	wg   sync.WaitGroup

	// reader reads the main stream back for its checksum (Complete): main
	// itself, or a read-only description of it when main is write-only
	// (a file: stream is opened O_WRONLY, as QEMU opens it).
	reader *os.File

	mu       sync.Mutex // guards inflight, drained, err, records
	inflight int
	drained  chan struct{}
	err      error
	records  [][]byte
	finished bool
	closed   atomic.Bool

	written, zeros, bytes atomic.Uint64 // Stats
}

// SaverStats counts what a Saver did with the pages it was given.
type SaverStats struct {
	// Pages written (a page written again counts again) and their bytes.
	Pages, Bytes uint64
	// Zero pages the channel goroutines found (Options.DetectZero).
	Zeros uint64
}

// Stats returns the counts so far; safe from any goroutine.
func (s *Saver) Stats() SaverStats {
	return SaverStats{Pages: s.written.Load(), Bytes: s.bytes.Load(), Zeros: s.zeros.Load()}
}

// NewSaver prepares the page writes for the layout StartRAMMapped returned.
// main is the file the stream is written to; the caller keeps owning it.
func NewSaver(main *os.File, layout []stream.MappedRAMBlock, o Options) (*Saver, error) {
	o, err := o.normalize()
	if err != nil {
		return nil, err
	}
	s := &Saver{main: main, pagesF: main, reader: main, o: o, align: 1, blocks: map[string]*saveBlock{},
		jobs: make(chan job), drained: make(chan struct{})}
	close(s.drained)
	for _, l := range layout {
		if l.Header.PageSize != o.PageSize {
			return nil, fmt.Errorf("%w: block %q laid out for %d-byte pages, Options.PageSize is %d", ErrInvalid, l.Name, l.Header.PageSize, o.PageSize)
		}
		b := &saveBlock{MappedRAMBlock: l, bits: make([]atomic.Uint64, stream.MappedRAMBitmapSize(l.Size, o.PageSize)/8)}
		s.blocks[l.Name] = b
		s.order = append(s.order, b)
	}
	fl, err := unix.FcntlInt(main.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("mapped-ram: %s: %w", main.Name(), err)
	}
	if fl&unix.O_ACCMODE == unix.O_WRONLY {
		r, err := reopen(main, unix.O_RDONLY)
		if err != nil {
			return nil, fmt.Errorf("mapped-ram: the completion marker needs the main stream read back, and %s is open write-only and cannot be opened for reading: %w", main.Name(), err)
		}
		s.reader = r
	}
	if o.DirectIO {
		f, err := reopen(main, unix.O_WRONLY|unix.O_DIRECT)
		if err != nil {
			s.closeFiles()
			return nil, err
		}
		s.pagesF = f
		s.align = dioAlignment(f)
	}
	for range o.Channels {
		s.wg.Go(s.worker)
	}
	return s, nil
}

// Alignment is the buffer alignment page writes need (1 without direct I/O).
func (s *Saver) Alignment() int { return s.align }

func (s *Saver) worker() {
	for j := range s.jobs {
		var err error
		if s.o.DetectZero {
			err = s.writeOrZero(j)
		} else {
			err = s.WritePages(j.b.Name, j.offsets, j.pages)
		}
		s.mu.Lock()
		if err != nil && s.err == nil {
			s.err = err
		}
		s.inflight--
		if s.inflight == 0 {
			close(s.drained)
		}
		s.mu.Unlock()
	}
}

// writeOrZero is a channel's work under DetectZero: the zero pages of the
// batch are marked absent, the others written (in their order, so runs of
// consecutive pages stay one pwritev).
func (s *Saver) writeOrZero(j job) error {
	var zero, offs []uint64
	var pages [][]byte
	for i, p := range j.pages {
		if isZeroPage(p) {
			zero = append(zero, j.offsets[i])
			continue
		}
		offs = append(offs, j.offsets[i])
		pages = append(pages, p)
	}
	if len(zero) > 0 {
		if err := s.MarkZero(j.b.Name, zero); err != nil {
			return err
		}
		s.zeros.Add(uint64(len(zero)))
	}
	if len(offs) == 0 {
		return nil
	}
	return s.WritePages(j.b.Name, offs, pages)
}

// isZeroPage reports whether p is all zero bytes, eight at a time.
func isZeroPage(p []byte) bool {
	for len(p) >= 8 {
		if binary.NativeEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

func (s *Saver) block(name string, offsets []uint64) (*saveBlock, error) {
	b := s.blocks[name]
	if b == nil {
		return nil, fmt.Errorf("%w: unknown RAM block %q", ErrInvalid, name)
	}
	ps := s.o.PageSize
	for _, o := range offsets {
		if o%ps != 0 || o >= b.Size || b.Size-o < ps {
			return nil, fmt.Errorf("%w: offset %#x is not a page inside block %q (size %#x)", ErrInvalid, o, name, b.Size)
		}
	}
	return b, nil
}

// WritePages writes pages[i] at offsets[i] of block and marks them present.
// Runs of consecutive offsets go out in one pwritev.
func (s *Saver) WritePages(block string, offsets []uint64, pages [][]byte) error {
	if s.closed.Load() {
		return fmt.Errorf("%w: Saver closed", ErrInvalid)
	}
	b, err := s.block(block, offsets)
	if err != nil {
		return err
	}
	if len(pages) != len(offsets) {
		return fmt.Errorf("%w: %d pages for %d offsets", ErrInvalid, len(pages), len(offsets))
	}
	ps := s.o.PageSize
	for i, p := range pages {
		if uint64(len(p)) != ps {
			return fmt.Errorf("%w: page %d is %d bytes, want %d", ErrInvalid, i, len(p), ps)
		}
	}
	var bounce []byte
	for i := 0; i < len(offsets); {
		j := i + 1
		for j < len(offsets) && j-i < maxRun && offsets[j] == offsets[j-1]+ps {
			j++
		}
		iov := pages[i:j]
		if s.align > 1 {
			for _, p := range iov {
				if !aligned(p, s.align) {
					if bounce == nil {
						bounce = alignedBuf(maxRun*int(ps), s.align)
					}
					for k, q := range iov {
						copy(bounce[k*int(ps):], q)
					}
					iov = [][]byte{bounce[:len(iov)*int(ps)]}
					break
				}
			}
		}
		if err := pwritevAll(s.pagesF, iov, int64(b.Header.PagesOffset+offsets[i])); err != nil {
			return fmt.Errorf("mapped-ram: writing %d pages of %q at %#x: %w", j-i, block, offsets[i], err)
		}
		for _, o := range offsets[i:j] {
			n := o / ps
			b.bits[n/64].Or(1 << (n % 64))
		}
		s.written.Add(uint64(j - i))
		s.bytes.Add(uint64(j-i) * ps)
		i = j
	}
	return nil
}

func pwritevAll(f *os.File, iov [][]byte, off int64) error {
	total := 0
	for _, p := range iov {
		total += len(p)
	}
	for total > 0 {
		n, err := unix.Pwritev(int(f.Fd()), iov, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		total -= n
		off += int64(n)
		for n > 0 {
			if n >= len(iov[0]) {
				n -= len(iov[0])
				iov = iov[1:]
			} else {
				iov[0] = iov[0][n:]
				n = 0
			}
		}
	}
	return nil
}

// MarkZero records that the pages at offsets are zero: their bits are
// cleared, nothing is written (a page that was written earlier and became
// zero is marked absent, as QEMU does).
func (s *Saver) MarkZero(block string, offsets []uint64) error {
	b, err := s.block(block, offsets)
	if err != nil {
		return err
	}
	for _, o := range offsets {
		n := o / s.o.PageSize
		b.bits[n/64].And(^(uint64(1) << (n % 64)))
	}
	return nil
}

// Submit hands a batch to the next idle channel goroutine. The Saver owns
// offsets and pages until the next Sync returns (the page bytes are read at
// write time: the scanner must not hand a page of the next pass before
// Sync). It blocks while every channel is busy, up to ctx.
func (s *Saver) Submit(ctx context.Context, block string, offsets []uint64, pages [][]byte) error {
	if s.closed.Load() {
		return fmt.Errorf("%w: Saver closed", ErrInvalid)
	}
	b, err := s.block(block, offsets)
	if err != nil {
		return err
	}
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	if s.inflight == 0 {
		s.drained = make(chan struct{})
	}
	s.inflight++
	s.mu.Unlock()
	select {
	case s.jobs <- job{b: b, offsets: offsets, pages: pages}:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		s.inflight--
		if s.inflight == 0 {
			close(s.drained)
		}
		s.mu.Unlock()
		return fmt.Errorf("mapped-ram: submitting pages of %q: %w", block, context.Cause(ctx))
	}
}

// Sync returns once every batch submitted before it is written: the
// per-pass sync point. It returns the first write error, if any.
func (s *Saver) Sync(ctx context.Context) error {
	s.mu.Lock()
	ch := s.drained
	s.mu.Unlock()
	select {
	case <-ch:
	case <-ctx.Done():
		return fmt.Errorf("mapped-ram: waiting for the channels to drain: %w", context.Cause(ctx))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Finish ends the page writes (Sync), writes each block's bitmap
// (little-endian 64-bit words, bit n%64 of word n/64 for page n, as QEMU
// writes its unsigned longs on x86) and its integrity record, and flushes
// them to the disk. Call it after the last pass (the RAM END section), before
// the device state.
func (s *Saver) Finish(ctx context.Context) error {
	if err := s.Sync(ctx); err != nil {
		return err
	}
	var records [][]byte
	for _, b := range s.order {
		bm := make([]byte, 8*len(b.bits))
		present := 0
		for i := range b.bits {
			w := b.bits[i].Load()
			present += bits.OnesCount64(w)
			binary.LittleEndian.PutUint64(bm[8*i:], w)
		}
		hb, _ := b.Header.AppendBinary(nil)
		rec, _ := Record{HeaderCRC: crc(hb), BitmapCRC: crc(bm), Size: b.Size, Present: uint32(present)}.AppendBinary(nil)
		if _, err := s.main.WriteAt(bm, int64(b.Header.BitmapOffset)); err != nil {
			return fmt.Errorf("mapped-ram: writing the bitmap of %q: %w", b.Name, err)
		}
		if _, err := s.main.WriteAt(rec, int64(b.ReservedOffset)); err != nil {
			return fmt.Errorf("mapped-ram: writing the integrity record of %q: %w", b.Name, err)
		}
		records = append(records, rec)
	}
	if err := unix.Fdatasync(int(s.main.Fd())); err != nil {
		return fmt.Errorf("mapped-ram: fdatasync: %w", err)
	}
	s.mu.Lock()
	s.records, s.finished = records, true
	s.mu.Unlock()
	return nil
}

// Complete writes the completion marker. Call it after Finish and after the
// stream's Encoder has closed (EOF and vmdesc written, flushed): the stream
// ends at main's current offset. start is the file offset where the stream
// began (0, or file:'s offset=). It re-reads the main stream to checksum it,
// writes the trailer, cuts the file after it and flushes. Until Complete
// returns, the file is refused by Open.
func (s *Saver) Complete(start int64) error {
	s.mu.Lock()
	records, finished := s.records, s.finished
	s.mu.Unlock()
	if !finished {
		return errors.New("mapped-ram: Complete before Finish: the bitmaps are not written")
	}
	end, err := s.main.Seek(0, io.SeekCurrent)
	if err != nil {
		return fmt.Errorf("mapped-ram: %w", err)
	}
	idx, err := stream.ScanMappedRAM(s.reader, start, end, s.o.Limits, RecordSize)
	if err != nil {
		return fmt.Errorf("mapped-ram: the stream just written does not scan: %w", err)
	}
	if len(idx.Blocks) != len(s.order) {
		return fmt.Errorf("mapped-ram: the stream lists %d blocks, the Saver laid out %d", len(idx.Blocks), len(s.order))
	}
	streamCRC, err := streamChecksum(s.reader, idx)
	if err != nil {
		return err
	}
	var all []byte
	for _, r := range records {
		all = append(all, r...)
	}
	t, _ := Trailer{Blocks: uint32(len(records)), StreamStart: uint64(start), StreamEnd: uint64(end),
		RecordsCRC: crc(all), StreamCRC: streamCRC}.AppendBinary(nil)
	if _, err := s.main.WriteAt(t, end); err != nil {
		return fmt.Errorf("mapped-ram: writing the completion marker: %w", err)
	}
	if err := s.main.Truncate(end + TrailerSize); err != nil {
		return fmt.Errorf("mapped-ram: %w", err)
	}
	if err := unix.Fdatasync(int(s.main.Fd())); err != nil {
		return fmt.Errorf("mapped-ram: fdatasync: %w", err)
	}
	return nil
}

// streamChecksum is the CRC-32C of every byte the main channel wrote.
func streamChecksum(f io.ReaderAt, idx *stream.MappedRAMIndex) (uint32, error) {
	var sum uint32
	buf := make([]byte, 256<<10)
	for _, seg := range idx.Segments {
		for off, left := seg.Offset, seg.Length; left > 0; {
			n := int(min(left, int64(len(buf))))
			if _, err := f.ReadAt(buf[:n], off); err != nil {
				return 0, fmt.Errorf("mapped-ram: reading the main stream at %d: %w", off, err)
			}
			sum = crc32Update(sum, buf[:n])
			off += int64(n)
			left -= int64(n)
		}
	}
	return sum, nil
}

// Close stops the channel goroutines and closes the descriptors the Saver
// opened (O_DIRECT, read-back). It does not close the main file.
func (s *Saver) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	close(s.jobs)
	s.wg.Wait()
	return s.closeFiles()
}

func (s *Saver) closeFiles() error {
	var errs []error
	if s.pagesF != s.main {
		errs = append(errs, s.pagesF.Close())
	}
	if s.reader != s.main {
		errs = append(errs, s.reader.Close())
	}
	return errors.Join(errs...)
}
