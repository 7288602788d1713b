package rdma

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

const benchSize = 256 << 20

// BenchmarkSoftWrite moves 256 MiB of non-zero guest RAM from a source to a
// destination over the soft provider on loopback, one WriteRAM per 1 MiB
// chunk, on demand (a REGISTER_REQUEST round trip per chunk) and with
// pin-all. Both blocks are mmap'd and pre-faulted before the clock starts;
// the connection (and, with pin-all, the up-front registration) is made
// before it too. The clock starts at the first WriteRAM and stops when Sync
// returns, i.e. when every byte has landed in the destination's memory.
// Compare with BenchmarkTCPBaseline, run in the same invocation.
func BenchmarkSoftWrite(b *testing.B) {
	for _, pinAll := range []bool{false, true} {
		b.Run(map[bool]string{false: "on-demand", true: "pin-all"}[pinAll], func(b *testing.B) {
			b.StopTimer()
			ctx := context.Background()
			src, dst := mapMem(b, benchSize), mapMem(b, benchSize)
			dense(src)
			fill(dst, 1) // pre-fault
			p := softProvider()
			b.SetBytes(benchSize)
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				l, err := Listen(ctx, p, "127.0.0.1:0", Options{})
				if err != nil {
					b.Fatal(err)
				}
				dch := make(chan *Dest, 1)
				go func() {
					d, err := l.Accept(ctx, []Block{{Name: "ram", Mem: dst}})
					if err != nil {
						b.Error(err)
					}
					dch <- d
				}()
				s, err := Dial(ctx, p, l.Addr().String(), Options{PinAll: pinAll, Blocks: []Block{{Name: "ram", Mem: src}}})
				d := <-dch
				_ = l.Close()
				if err != nil || d == nil {
					b.Fatal(err)
				}
				b.StartTimer()
				for off := 0; off < benchSize; off += chunkSize {
					if err := s.WriteRAM(ctx, "ram", uint64(off), src[off:off+chunkSize]); err != nil {
						b.Fatal(err)
					}
				}
				if err := s.Sync(ctx); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				st := s.Stats()
				_ = s.Close()
				_ = d.Close()
				b.ReportMetric(float64(st.Registrations), "registrations/op")
				b.StartTimer()
			}
		})
	}
}

// BenchmarkTCPBaseline is the plain-TCP ceiling for the same bytes: one
// loopback TCP stream written in 1 MiB pieces and read straight into
// pre-faulted mmap'd memory with no framing. The clock starts before the
// first write and stops when the reader has the last byte.
func BenchmarkTCPBaseline(b *testing.B) {
	b.StopTimer()
	src, dst := mapMem(b, benchSize), mapMem(b, benchSize)
	dense(src)
	fill(dst, 1)
	b.SetBytes(benchSize)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				done <- err
				return
			}
			defer c.Close()
			_, err = io.ReadFull(c, dst)
			done <- err
		}()
		c, err := net.Dial("tcp4", l.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		for off := 0; off < benchSize; off += chunkSize {
			if _, err := c.Write(src[off : off+chunkSize]); err != nil {
				b.Fatal(err)
			}
		}
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		_ = c.Close()
		_ = l.Close()
		b.StartTimer()
	}
}

func ExampleDial() {
	ctx := context.Background()
	p, err := Open(ctx, "soft") // the provider is chosen by name: "soft" or "verbs"
	if err != nil {
		fmt.Println(err)
		return
	}
	guest := make([]byte, 2<<20) // the destination's RAM (mmap'd in real use)
	l, err := Listen(ctx, p, "127.0.0.1:0", Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		d, err := l.Accept(ctx, []Block{{Name: "pc.ram", Mem: guest}})
		if err != nil {
			got <- err.Error()
			return
		}
		defer d.Close()
		buf := make([]byte, 3)
		_, err = io.ReadFull(d, buf) // stream bytes; RAM written before them has landed
		got <- fmt.Sprintf("%s %q %v", buf, guest[1<<20:1<<20+5], err)
	}()

	ram := make([]byte, 2<<20) // the source's RAM
	copy(ram[1<<20:], "hello")
	s, err := Dial(ctx, p, l.Addr().String(), Options{Blocks: []Block{{Name: "pc.ram", Mem: ram}}})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close()
	_ = s.WriteRAM(ctx, "pc.ram", 1<<20, ram[1<<20:2<<20]) // one RDMA WRITE into the destination's memory
	_, _ = s.Write([]byte("EOS"))
	_ = s.Sync(ctx)
	fmt.Println(<-got)
	fmt.Println("chunks registered:", s.Stats().Registrations)
	// Output:
	// EOS "hello" <nil>
	// chunks registered: 1
}

// benchBytes is MIGCTL_BENCH_SIZE (e.g. 1G, 256M) or def.
func benchBytes(b *testing.B, def int) int {
	s := os.Getenv("MIGCTL_BENCH_SIZE")
	if s == "" {
		return def
	}
	mult := 1
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 || n*mult%chunkSize != 0 {
		b.Fatalf("MIGCTL_BENCH_SIZE=%q: want a whole number of MiB (e.g. 256M, 1G)", os.Getenv("MIGCTL_BENCH_SIZE"))
	}
	return n * mult
}

// BenchmarkRegistration is what it costs to make all of guest RAM
// (MIGCTL_BENCH_SIZE, default 256 MiB) writable by the source, pin-all
// against on demand, over the soft provider on loopback. Memory is mmap'd
// and pre-faulted, and the destination listens, before the clock starts.
// The clock starts at Dial — with pin-all it registers the source's block,
// and the destination registers its block while answering the block table
// request — and stops when Sync returns after one 4 KiB WriteRAM into
// every 1 MiB chunk: on demand each of those first writes costs a local
// chunk registration and a REGISTER_REQUEST round trip to the destination,
// which registers the chunk; with pin-all none does. ns/op over the chunk
// count is the registration cost per MiB (plus a 4 KiB write each).
//
// The soft provider's registration is bookkeeping: it pins nothing. A real
// device's ibv_reg_mr pins and maps every page (pin-all pays it for all of
// RAM up front, on demand spreads it over the first pass); those figures
// need hardware.
func BenchmarkRegistration(b *testing.B) {
	size := benchBytes(b, 256<<20)
	for _, pinAll := range []bool{false, true} {
		b.Run(map[bool]string{false: "on-demand", true: "pin-all"}[pinAll], func(b *testing.B) {
			ctx := context.Background()
			src, dst := mapMem(b, size), mapMem(b, size)
			dense(src)
			fill(dst, 1) // pre-fault
			p := softProvider()
			var regs uint64
			var elapsed time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				l, err := Listen(ctx, p, "127.0.0.1:0", Options{})
				if err != nil {
					b.Fatal(err)
				}
				dch := make(chan *Dest, 1)
				go func() {
					d, err := l.Accept(ctx, []Block{{Name: "ram", Mem: dst}})
					if err != nil {
						b.Error(err)
					}
					dch <- d
				}()
				b.StartTimer()
				t0 := time.Now()
				s, err := Dial(ctx, p, l.Addr().String(), Options{PinAll: pinAll, Blocks: []Block{{Name: "ram", Mem: src}}})
				if err == nil {
					for off := 0; off < size && err == nil; off += chunkSize {
						err = s.WriteRAM(ctx, "ram", uint64(off), src[off:off+4096])
					}
				}
				if err == nil {
					err = s.Sync(ctx)
				}
				elapsed += time.Since(t0)
				b.StopTimer()
				d := <-dch
				_ = l.Close()
				if err != nil || d == nil {
					b.Fatal(err)
				}
				regs += d.Stats().Registrations
				_ = s.Close()
				_ = d.Close()
				b.StartTimer()
			}
			chunks := float64(size / chunkSize)
			b.ReportMetric(float64(elapsed.Microseconds())/float64(b.N)/chunks, "µs/MiB")
			b.ReportMetric(float64(regs)/float64(b.N), "dest-registrations/op")
		})
	}
}
