package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxStreams bounds -streams (QEMU's multifd-channels is a uint8).
const maxStreams = 255

// pageSize is the unit a stream's chunk is aligned to.
const pageSize = 4096

// headerLen is a stream's header: offset and length, little-endian uint64s.
const headerLen = 16

// header is the start of one stream: where its bytes land in the region.
type header struct {
	Offset, Length uint64
}

func (h header) marshal() []byte {
	b := make([]byte, headerLen)
	binary.LittleEndian.PutUint64(b, h.Offset)
	binary.LittleEndian.PutUint64(b[8:], h.Length)
	return b
}

// errHeader is returned for a header that does not fit the region.
var errHeader = errors.New("stream header out of the region")

// parseHeader decodes a header and checks it against a region of size
// bytes: the peer's numbers never reach a slice expression unchecked.
func parseHeader(b []byte, size int) (header, error) {
	if len(b) != headerLen {
		return header{}, fmt.Errorf("%w: %d header bytes, want %d", errHeader, len(b), headerLen)
	}
	h := header{Offset: binary.LittleEndian.Uint64(b), Length: binary.LittleEndian.Uint64(b[8:])}
	if h.Offset > uint64(size) || h.Length > uint64(size)-h.Offset {
		return header{}, fmt.Errorf("%w: offset %d + length %d, region %d bytes", errHeader, h.Offset, h.Length, size)
	}
	return h, nil
}

// chunks splits n bytes into exactly streams pieces laid end to end from
// offset 0, each starting on a page boundary; the last one ends at n (a
// piece is empty when n is too small to give every stream a page).
func chunks(n int64, streams int) []header {
	per := ((n+int64(streams)-1)/int64(streams) + pageSize - 1) / pageSize * pageSize
	hs := make([]header, streams)
	for i := range hs {
		off := min(int64(i)*per, n)
		end := min(off+per, n) // streams·per ≥ n: the last piece ends at n
		hs[i] = header{Offset: uint64(off), Length: uint64(end - off)}
	}
	return hs
}

// filledBuffer returns n bytes of pseudo-random data (ChaCha8, a fixed
// seed: incompressible, as the guest's random pages) in anonymous memory
// advised MADV_HUGEPAGE, as a source's guest RAM is; every page is written
// here, so it is resident before any clock starts. Close unmaps it.
func filledBuffer(n int64) (*region, error) {
	if n <= 0 || n > 1<<40 {
		return nil, fmt.Errorf("buffer of %d bytes: want 1 byte to 1 TiB", n)
	}
	r, err := mapRegion((n+pageSize-1)/pageSize*pageSize, backingAnon)
	if err != nil {
		return nil, err
	}
	r.Mem = r.Mem[:n]
	rng := rand.NewChaCha8([32]byte{'m', 'i', 'g', 'c', 't', 'l'})
	_, _ = rng.Read(r.Mem)
	return r, nil
}

// listenLoopback opens a TCP listener on 127.0.0.1, any port.
func listenLoopback(ctx context.Context) (net.Listener, error) {
	var lc net.ListenConfig
	return lc.Listen(ctx, "tcp", "127.0.0.1:0")
}

// receive accepts streams connections on ln and reads each one's bytes
// straight into region at its header's offset; it returns the bytes
// received. Every connection ends when ctx does (its deadline included).
func receive(ctx context.Context, ln net.Listener, region []byte, streams int) (int64, error) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	type res struct {
		n   int64
		err error
	}
	results := make(chan res, streams)
	var wg sync.WaitGroup
	defer wg.Wait()
	// An accept that fails ends the streams already accepted.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(errors.New("the receiver ended"))
	for i := 0; i < streams; i++ {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				err = fmt.Errorf("accept stream %d of %d: %w", i+1, streams, context.Cause(ctx))
			}
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := receiveOne(ctx, conn, region)
			results <- res{n, err}
		}()
	}
	var total int64
	var errs []error
	for i := 0; i < streams; i++ {
		r := <-results
		total += r.n
		errs = append(errs, r.err)
	}
	return total, errors.Join(errs...)
}

// receiveOne reads one stream into region: header, bytes, then the one-
// byte answer.
func receiveOne(ctx context.Context, conn net.Conn, region []byte) (int64, error) {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	hb := make([]byte, headerLen)
	if _, err := io.ReadFull(conn, hb); err != nil {
		return 0, fmt.Errorf("read a stream header: %w", err)
	}
	h, err := parseHeader(hb, len(region))
	if err != nil {
		return 0, err
	}
	// One copy: each read(2) lands in the region itself.
	dst := region[h.Offset : h.Offset+h.Length]
	if _, err := io.ReadFull(conn, dst); err != nil {
		return 0, fmt.Errorf("read %d bytes at offset %d: %w", h.Length, h.Offset, err)
	}
	if _, err := conn.Write([]byte{0}); err != nil {
		return int64(h.Length), fmt.Errorf("answer the stream at offset %d: %w", h.Offset, err)
	}
	return int64(h.Length), nil
}

// send moves data to the receiver at addr over streams connections and
// returns the time from just before the first dial to the last answer.
func send(ctx context.Context, addr string, data []byte, streams int) (time.Duration, error) {
	hs := chunks(int64(len(data)), streams)
	errs := make([]error, len(hs))
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, h := range hs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = sendOne(ctx, addr, h, data[h.Offset:h.Offset+h.Length])
		}()
	}
	wg.Wait()
	took := time.Since(t0)
	return took, errors.Join(errs...)
}

// sendOne dials, sends one header and its bytes, and waits for the
// answer.
func sendOne(ctx context.Context, addr string, h header, b []byte) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := conn.Write(h.marshal()); err != nil {
		return fmt.Errorf("send the header of offset %d: %w", h.Offset, err)
	}
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("send %d bytes at offset %d: %w", len(b), h.Offset, err)
	}
	ack := make([]byte, 1)
	if _, err := io.ReadFull(conn, ack); err != nil {
		return fmt.Errorf("wait for the receiver's answer (offset %d): %w", h.Offset, err)
	}
	return nil
}

// writeChunk is the size of one write(2) of writeFile.
const writeChunk = 4 << 20

// writeFile writes data to a new file at path and returns the time from
// before open to after close. The file is left for the caller.
func writeFile(ctx context.Context, path string, data []byte) (time.Duration, error) {
	t0 := time.Now()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	for off := 0; off < len(data); off += writeChunk {
		if err := ctx.Err(); err != nil {
			f.Close()
			return 0, fmt.Errorf("write %s: %w", path, context.Cause(ctx))
		}
		if _, err := f.Write(data[off:min(off+writeChunk, len(data))]); err != nil {
			f.Close()
			return 0, err
		}
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// peakRSS returns this process's peak resident set (VmHWM), or 0.
func peakRSS() uint64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}
