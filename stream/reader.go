package stream

import (
	"errors"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// maxEmptyReads is how many (0, nil) reads in a row the reader accepts
// before it gives up with io.ErrNoProgress (bufio's limit).
const maxEmptyReads = 100

// errBadCount is a Read that returned a count outside 0..len(p).
var errBadCount = errors.New("stream: the reader returned an impossible byte count")

// reader is the Decoder's read buffer: what a bufio.Reader does, plus
// readPage, which reads the part of a page the buffer does not hold straight
// from the source into the caller's slice.
//
// A reader is owned by its Decoder's goroutine.
type reader struct {
	src  io.Reader
	buf  []byte
	r, w int   // buf[r:w] is unread
	err  error // the source's last error, returned once buf[r:w] is drained

	// raw, if not nil, is the socket behind src: readPage reads the rest
	// of a page and the next buffer's worth in one readv. readvFn (the
	// method value of readvOnce, made once) and its arguments and results
	// live here so that a readv allocates nothing.
	raw     syscall.RawConn
	readvFn func(fd uintptr) bool
	iov     [2][]byte
	got     int
	rerr    error
	// direct enables readPage's direct read (tests and benchmarks turn it
	// off to measure the two-copy path).
	direct bool

	// Page bytes ReadPage took from the buffer (one more copy) and read
	// straight into the caller's slice (the kernel's copy only).
	copied, straight uint64
}

func newReader(src io.Reader, size int) *reader {
	b := &reader{src: src, buf: make([]byte, size), direct: true}
	if s, ok := socketOf(src).(syscall.Conn); ok {
		if rc, err := s.SyscallConn(); err == nil {
			b.raw = rc
			b.readvFn = b.readvOnce
		}
	}
	return b
}

func (b *reader) buffered() int { return b.w - b.r }

func (b *reader) readErr() error {
	err := b.err
	b.err = nil
	return err
}

// fill reads once (retrying empty reads) into the buffer, which must be
// empty: every caller drains it first (page and blob bytes are copied out of
// it before more is read), so unread bytes never need to move.
func (b *reader) fill() {
	b.r, b.w = 0, 0
	for range maxEmptyReads {
		n, err := b.src.Read(b.buf)
		if n < 0 || n > len(b.buf) {
			b.err = errBadCount
			return
		}
		b.w = n
		if err != nil {
			b.err = err
			return
		}
		if n > 0 {
			return
		}
	}
	b.err = io.ErrNoProgress
}

// Read reads into p from the buffer, filling it if it is empty. Like
// bufio.Reader it reads a large p (at least the buffer's size) directly.
func (b *reader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		if b.buffered() > 0 {
			return 0, nil
		}
		return 0, b.readErr()
	}
	if b.r == b.w {
		if b.err != nil {
			return 0, b.readErr()
		}
		if len(p) >= len(b.buf) {
			n, err := b.src.Read(p)
			if n < 0 || n > len(p) {
				return 0, errBadCount
			}
			return n, err
		}
		b.fill()
		if b.r == b.w {
			return 0, b.readErr()
		}
	}
	n := copy(p, b.buf[b.r:b.w])
	b.r += n
	return n, nil
}

// discard skips n bytes.
func (b *reader) discard(n int) (int, error) {
	done := 0
	for done < n {
		if b.r == b.w {
			if b.err != nil {
				return done, b.readErr()
			}
			b.fill()
			continue
		}
		k := min(n-done, b.w-b.r)
		b.r += k
		done += k
	}
	return done, nil
}

// readPage fills p (a page): what the buffer holds is copied, and the rest
// is read straight from the source into p. On a socket one readv reads the
// rest into p and the following bytes into the buffer, so the direct read
// costs no extra system call; on other sources the rest is read with Read
// calls on the source and the buffer is filled at the next read. It returns
// io.ErrUnexpectedEOF if the source ends inside p.
func (b *reader) readPage(p []byte) (int, error) {
	n := copy(p, b.buf[b.r:b.w])
	b.r += n
	b.copied += uint64(n)
	if n == len(p) {
		return n, nil
	}
	if b.err != nil {
		return n, eofInside(b.readErr(), n)
	}
	b.r, b.w = 0, 0
	if b.raw != nil {
		return b.readv(p, n)
	}
	for empty := 0; n < len(p); {
		m, err := b.src.Read(p[n:])
		if m < 0 || m > len(p)-n {
			return n, errBadCount
		}
		n += m
		b.straight += uint64(m)
		if err != nil {
			if n == len(p) {
				b.err = err // the page is whole; the error comes next
				return n, nil
			}
			return n, eofInside(err, n)
		}
		if m == 0 {
			if empty++; empty >= maxEmptyReads {
				return n, io.ErrNoProgress
			}
		}
	}
	return n, nil
}

// readv reads p[n:] and then as much as fits into the (empty) buffer from
// the socket, one readv at a time, waiting through the runtime's poller (so
// the socket's deadline and Close apply).
func (b *reader) readv(p []byte, n int) (int, error) {
	defer func() { b.iov = [2][]byte{} }()
	b.iov[1] = b.buf
	for n < len(p) {
		b.iov[0] = p[n:]
		err := b.raw.Read(b.readvFn)
		if err == nil && b.rerr != nil {
			err = os.NewSyscallError("readv", b.rerr)
		}
		if err != nil {
			return n, err
		}
		got := b.got
		if got == 0 {
			return n, eofInside(io.EOF, n)
		}
		k := min(got, len(p)-n)
		n += k
		b.straight += uint64(k)
		b.w = got - k
	}
	return n, nil
}

// readvOnce is the syscall.RawConn.Read callback: one readv of b.iov, false
// (wait until readable) on EAGAIN.
func (b *reader) readvOnce(fd uintptr) bool {
	for {
		b.got, b.rerr = unix.Readv(int(fd), b.iov[:])
		if b.rerr != unix.EINTR {
			return b.rerr != unix.EAGAIN
		}
	}
}

// eofInside turns io.EOF after n > 0 bytes of a page into
// io.ErrUnexpectedEOF.
func eofInside(err error, n int) error {
	if err == io.EOF && n > 0 {
		return io.ErrUnexpectedEOF
	}
	return err
}
