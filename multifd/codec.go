package multifd

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zlib"
	"github.com/klauspost/compress/zstd"
)

// QEMU's compressed framing (multifd-zlib.c, multifd-zstd.c, 7.2 and
// current): each channel holds ONE compression stream for its whole life.
// zlib: deflateInit (zlib-wrapped: the 2-byte header opens the first packet
// that has pages), every page of a packet deflated in order, the last with
// Z_SYNC_FLUSH, so the packet's bytes end on a byte boundary and decode
// together with the channel's earlier packets. zstd: one frame per channel,
// never ended; each packet's pages compressed with ZSTD_e_continue, the last
// with ZSTD_e_flush. next_packet_size is the packet's compressed byte count;
// a packet without normal pages carries no payload.
//
// So a decoder keeps one decompressor per channel and feeds it the packets
// in order; a packet cannot be decoded alone.

// compressor turns a packet's pages into its payload.
type compressor interface {
	// compress returns the payload for pages (each one page); the slice is
	// valid until the next call.
	compress(pages [][]byte) ([]byte, error)
	close() error
}

// decompressor reads a packet's pages out of its payload.
type decompressor interface {
	// decompress decodes len(dst) pages from payload into dst.
	decompress(payload []byte, dst func(i int) []byte, n int) error
	close()
}

// maxLeftover bounds the compressed bytes a packet may carry beyond the ones
// its pages needed: the tail of a sync flush (the end-of-block code and an
// empty stored block) that the decompressor consumes with the next packet.
// More than that means the packet carries data its header does not list.
const maxLeftover = 16

// packetSource feeds a decompressor the channel's compressed bytes packet
// by packet. It never reports io.EOF: running out of a packet's bytes while
// a page is incomplete is errShortPayload, which the decompressors keep.
type packetSource struct {
	buf []byte
	pos int
}

var errShortPayload = errors.New("compressed payload ends before its pages")

func (s *packetSource) feed(p []byte) {
	rest := len(s.buf) - s.pos
	copy(s.buf, s.buf[s.pos:])
	s.buf = append(s.buf[:rest], p...)
	s.pos = 0
}

func (s *packetSource) left() int { return len(s.buf) - s.pos }

func (s *packetSource) Read(p []byte) (int, error) {
	if s.pos == len(s.buf) {
		return 0, errShortPayload
	}
	n := copy(p, s.buf[s.pos:])
	s.pos += n
	return n, nil
}

func (s *packetSource) ReadByte() (byte, error) {
	if s.pos == len(s.buf) {
		return 0, errShortPayload
	}
	c := s.buf[s.pos]
	s.pos++
	return c, nil
}

func newCompressor(c Compression, level int, pageSize uint64) (compressor, error) {
	if err := CheckLevel(c, level); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	switch c {
	case CompressionZlib:
		z := &zlibCompressor{scratch: make([]byte, pageSize)}
		w, err := zlib.NewWriterLevel(&z.out, level)
		if err != nil {
			return nil, fmt.Errorf("%w: zlib level %d: %v", ErrInvalid, level, err)
		}
		z.w = w
		return z, nil
	case CompressionZstd:
		z := &zstdCompressor{scratch: make([]byte, pageSize)}
		w, err := zstd.NewWriter(&z.out,
			zstd.WithEncoderLevel(zstdLevel(level)),
			zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(false), // the frame never ends: a checksum would never be sent
			zstd.WithWindowSize(1<<20),
			zstd.WithZeroFrames(true))
		if err != nil {
			return nil, fmt.Errorf("%w: zstd level %d: %v", ErrInvalid, level, err)
		}
		z.w = w
		return z, nil
	}
	return nil, nil
}

type zlibCompressor struct {
	w       *zlib.Writer
	out     bytes.Buffer
	scratch []byte
}

func (z *zlibCompressor) compress(pages [][]byte) ([]byte, error) {
	z.out.Reset()
	for _, p := range pages {
		// Guest pages may change while they are compressed; like QEMU,
		// compress a private copy so the compressor sees stable bytes.
		copy(z.scratch, p)
		if _, err := z.w.Write(z.scratch); err != nil {
			return nil, err
		}
	}
	if err := z.w.Flush(); err != nil { // Z_SYNC_FLUSH
		return nil, err
	}
	return z.out.Bytes(), nil
}

func (z *zlibCompressor) close() error { return nil } // the stream is never ended on the wire

type zstdCompressor struct {
	w       *zstd.Encoder
	out     bytes.Buffer
	scratch []byte
}

func (z *zstdCompressor) compress(pages [][]byte) ([]byte, error) {
	z.out.Reset()
	for _, p := range pages {
		copy(z.scratch, p)
		if _, err := z.w.Write(z.scratch); err != nil {
			return nil, err
		}
	}
	if err := z.w.Flush(); err != nil { // ZSTD_e_flush: the block ends, the frame goes on
		return nil, err
	}
	return z.out.Bytes(), nil
}

// close releases the encoder without ending the frame on the wire.
func (z *zstdCompressor) close() error {
	z.w.Reset(io.Discard)
	return nil
}

func newDecompressor(c Compression, maxWindow uint64) decompressor {
	switch c {
	case CompressionZlib:
		return &zlibDecompressor{}
	case CompressionZstd:
		return &zstdDecompressor{maxWindow: maxWindow}
	}
	return nil
}

type zlibDecompressor struct {
	src packetSource
	r   io.ReadCloser
}

func (z *zlibDecompressor) decompress(payload []byte, dst func(int) []byte, n int) error {
	z.src.feed(payload)
	if z.r == nil {
		r, err := zlib.NewReader(&z.src) // reads the zlib header
		if err != nil {
			return fmt.Errorf("zlib stream header: %w", err)
		}
		z.r = r
	}
	for i := range n {
		if _, err := io.ReadFull(z.r, dst(i)); err != nil {
			return fmt.Errorf("inflating page %d of %d: %w", i+1, n, err)
		}
	}
	if l := z.src.left(); l > maxLeftover {
		return fmt.Errorf("%d compressed bytes left after the packet's %d pages", l, n)
	}
	return nil
}

func (z *zlibDecompressor) close() {}

type zstdDecompressor struct {
	src       packetSource
	d         *zstd.Decoder
	maxWindow uint64
}

func (z *zstdDecompressor) decompress(payload []byte, dst func(int) []byte, n int) error {
	z.src.feed(payload)
	if z.d == nil {
		d, err := zstd.NewReader(&z.src,
			zstd.WithDecoderConcurrency(1), // synchronous: reads exactly the blocks it decodes
			zstd.WithDecoderMaxWindow(z.maxWindow),
			zstd.WithDecoderMaxMemory(z.maxWindow),
			zstd.WithDecoderLowmem(true))
		if err != nil {
			return fmt.Errorf("zstd decoder: %w", err)
		}
		z.d = d
	}
	for i := range n {
		if _, err := io.ReadFull(z.d, dst(i)); err != nil {
			return fmt.Errorf("decompressing page %d of %d: %w", i+1, n, err)
		}
	}
	if l := z.src.left(); l > maxLeftover {
		return fmt.Errorf("%d compressed bytes left after the packet's %d pages", l, n)
	}
	return nil
}

func (z *zstdDecompressor) close() {
	if z.d != nil {
		z.d.Close()
	}
}

// zstdLevel maps QEMU's multifd-zstd-level to the encoder's speed: level 0
// is zstd's default, 3.
func zstdLevel(level int) zstd.EncoderLevel {
	if level == 0 {
		level = 3
	}
	return zstd.EncoderLevelFromZstd(level)
}
