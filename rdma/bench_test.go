package rdma

import (
	"context"
	"fmt"
	"io"
	"net"
	"testing"
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
