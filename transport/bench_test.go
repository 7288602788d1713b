package transport

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// copySize is what one benchmark iteration moves.
const copySize = 256 << 20

// pump writes copySize bytes to w in 1 MiB writes while the caller reads
// them from r in 1 MiB reads, and returns the elapsed time.
func pump(b *testing.B, w io.Writer, r io.Reader) time.Duration {
	wbuf, rbuf := make([]byte, 1<<20), make([]byte, 1<<20)
	errc := make(chan error, 1)
	start := time.Now()
	go func() {
		for sent := 0; sent < copySize; sent += len(wbuf) {
			if _, err := w.Write(wbuf); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for got := 0; got < copySize; {
		n, err := r.Read(rbuf)
		if err != nil {
			b.Fatal(err)
		}
		got += n
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

// pairConns returns a connected pair for uri: through this package, or
// (raw) through the net package directly, the baseline.
func pairConns(b *testing.B, uri string, raw bool, cfg Config) (w io.WriteCloser, r io.ReadCloser, cleanup func()) {
	ctx := context.Background()
	if raw {
		a := mustParse(b, uri)
		network, address := "tcp", hostPort(a)
		if a.Scheme == SchemeUnix {
			network, address = "unix", a.Path
		}
		ln, err := net.Listen(network, address)
		if err != nil {
			b.Fatal(err)
		}
		c, err := net.Dial(network, ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		return c, s, func() { c.Close(); s.Close(); ln.Close() }
	}
	l, err := cfg.Listen(ctx, mustParse(b, uri))
	if err != nil {
		b.Fatal(err)
	}
	c, err := cfg.Dial(ctx, l.Addr())
	if err != nil {
		b.Fatal(err)
	}
	s, err := l.Accept(ctx)
	if err != nil {
		b.Fatal(err)
	}
	return c, s, func() { c.Close(); s.Close(); l.Close() }
}

// BenchmarkCopy moves 256 MiB per iteration over loopback tcp: and unix:,
// through the net package directly (raw-net, the baseline), and through this
// package with Config's default buffers, with the kernel's defaults
// (SocketBuffer -1) and with 4 MiB buffers. Each transport variant also
// reports its throughput relative to a raw copy made in the same run
// (ratio-vs-raw). Run it with -benchtime 3x: each iteration is 256 MiB.
func BenchmarkCopy(b *testing.B) {
	dir := b.TempDir()
	type variant struct {
		name string
		raw  bool
		cfg  Config
	}
	for _, scheme := range []string{"tcp:127.0.0.1:0", "unix:" + filepath.Join(dir, "bench.sock")} {
		variants := []variant{
			{"raw-net", true, Config{}},
			{"config-default", false, Config{}},
			{"4MiB-buffers", false, Config{SocketBuffer: 4 << 20}},
		}
		if scheme[:4] == "unix" { // for tcp: the kernel's defaults are the config default
			variants = append(variants, variant{"kernel-buffers", false, Config{SocketBuffer: -1}})
		}
		for _, v := range variants {
			b.Run(scheme[:strings.IndexByte(scheme, ':')]+"/"+v.name, func(b *testing.B) {
				var base time.Duration
				if !v.raw {
					w, r, done := pairConns(b, scheme, true, Config{})
					base = pump(b, w, r)
					done()
				}
				w, r, done := pairConns(b, scheme, v.raw, v.cfg)
				defer done()
				b.SetBytes(copySize)
				b.ResetTimer()
				var total time.Duration
				for b.Loop() {
					total += pump(b, w, r)
				}
				if !v.raw && b.N > 0 {
					b.ReportMetric(float64(base)/float64(total/time.Duration(b.N)), "ratio-vs-raw")
				}
			})
		}
	}
}
