// Command rawcopy measures the ceilings migctl's data plane is compared
// with in bench/: bytes moved with nothing but the kernel's copy.
//
//	rawcopy recv  -region BYTES -streams N [-backing anon|memfd] [-timeout D]
//	rawcopy send  -addr HOST:PORT -bytes BYTES -streams N [-timeout D]
//	rawcopy write -path FILE -bytes BYTES [-timeout D]
//
// recv maps a region of -region bytes as a migctl destination holds guest
// RAM (anonymous memory advised with MADV_HUGEPAGE, or a shared memfd),
// pre-faults all of it with MADV_POPULATE_WRITE, listens on 127.0.0.1:0
// and prints {"event":"ready","addr":…,"prepare_ms":…}. It then accepts
// -streams connections; each one carries a 16-byte header (offset and
// length, little-endian uint64s, bounded by the region) and then that many
// bytes, which are read(2) straight into the region: one copy, kernel to
// region. After the last byte of a stream it answers one byte. When every
// stream is in it prints {"event":"done","bytes":…,"peak_rss":…}.
//
// send fills -bytes of memory (anonymous, MADV_HUGEPAGE, as guest RAM)
// with pseudo-random bytes before its clock, then splits them into
// -streams page-aligned chunks, one TCP connection each, the chunk i
// landing at offset i×chunk of the receiver's region. Its
// clock starts just before the first connection is dialled and stops when
// the last stream's one-byte answer has arrived (so after the receiver has
// read every byte); it prints {"bytes":…,"seconds":…}.
//
// write fills -bytes of memory the same way, then writes them to a new
// file in 4 MiB write(2) calls. Its clock starts before open(O_CREAT|
// O_TRUNC) and stops when close returns; there is no fsync (the bytes end
// in the page cache, as a save to file: leaves them). It prints
// {"bytes":…,"seconds":…} and leaves the file for its caller to remove.
//
// Every wait is bounded by -timeout (default 5m) and by SIGINT/SIGTERM.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "rawcopy:", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// usageError is a mistake in the command line (exit status 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func run(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return usageError{"want a mode: recv, send or write (see the package doc)"}
	}
	fs := flag.NewFlagSet("rawcopy "+args[0], flag.ContinueOnError)
	region := fs.Int64("region", 0, "recv: bytes of the pre-faulted region")
	backing := fs.String("backing", backingAnon, "recv: anon (MADV_HUGEPAGE) or memfd")
	streams := fs.Int("streams", 1, "recv, send: TCP connections")
	addr := fs.String("addr", "", "send: the receiver's HOST:PORT")
	nbytes := fs.Int64("bytes", 0, "send, write: bytes to move")
	path := fs.String("path", "", "write: the file to create")
	timeout := fs.Duration("timeout", 5*time.Minute, "bound of every wait")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError{err.Error()}
	}
	if *timeout <= 0 {
		return usageError{"-timeout: want a positive duration"}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	enc := json.NewEncoder(out)
	switch args[0] {
	case "recv":
		if *region <= 0 || *streams < 1 || *streams > maxStreams {
			return usageError{fmt.Sprintf("recv: want -region > 0 and -streams in 1..%d", maxStreams)}
		}
		return recvMain(ctx, *region, *backing, *streams, enc)
	case "send":
		if *addr == "" || *nbytes <= 0 || *streams < 1 || *streams > maxStreams {
			return usageError{fmt.Sprintf("send: want -addr, -bytes > 0 and -streams in 1..%d", maxStreams)}
		}
		data, err := filledBuffer(*nbytes)
		if err != nil {
			return err
		}
		defer data.Close()
		took, err := send(ctx, *addr, data.Mem, *streams)
		if err != nil {
			return err
		}
		return enc.Encode(result{Bytes: *nbytes, Seconds: took.Seconds()})
	case "write":
		if *path == "" || *nbytes <= 0 {
			return usageError{"write: want -path and -bytes > 0"}
		}
		data, err := filledBuffer(*nbytes)
		if err != nil {
			return err
		}
		defer data.Close()
		took, err := writeFile(ctx, *path, data.Mem)
		if err != nil {
			return err
		}
		return enc.Encode(result{Bytes: *nbytes, Seconds: took.Seconds()})
	default:
		return usageError{fmt.Sprintf("unknown mode %q: want recv, send or write", args[0])}
	}
}

// result is what send and write print.
type result struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

// event is a line recv prints.
type event struct {
	Event     string  `json:"event"` // ready | done
	Addr      string  `json:"addr,omitempty"`
	PrepareMS float64 `json:"prepare_ms,omitempty"`
	Bytes     int64   `json:"bytes,omitempty"`
	PeakRSS   uint64  `json:"peak_rss,omitempty"`
}

func recvMain(ctx context.Context, size int64, backing string, streams int, enc *json.Encoder) error {
	t0 := time.Now()
	reg, err := mapRegion(size, backing)
	if err != nil {
		return err
	}
	defer reg.Close()
	if err := prefault(ctx, reg.Mem); err != nil {
		return err
	}
	prep := time.Since(t0)
	ln, err := listenLoopback(ctx)
	if err != nil {
		return err
	}
	defer ln.Close()
	if err := enc.Encode(event{Event: "ready", Addr: ln.Addr().String(), PrepareMS: ms(prep)}); err != nil {
		return err
	}
	n, err := receive(ctx, ln, reg.Mem, streams)
	if err != nil {
		return err
	}
	return enc.Encode(event{Event: "done", Bytes: n, PeakRSS: peakRSS()})
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
