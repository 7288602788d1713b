package stream

import (
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketPair returns the two ends of a unix stream socketpair as
// *net.UnixConn, with SO_SNDBUF and SO_RCVBUF set to buf bytes (0: the
// kernel's default).
func socketPair(tb testing.TB, buf int) (a, b *net.UnixConn) {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	must(tb, err)
	conns := [2]*net.UnixConn{}
	for i, fd := range fds {
		if buf > 0 {
			must(tb, unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, buf))
			must(tb, unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, buf))
		}
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		must(tb, err)
		conns[i] = c.(*net.UnixConn)
	}
	tb.Cleanup(func() { conns[0].Close(); conns[1].Close() })
	return conns[0], conns[1]
}

// threadCPU returns the CPU time (user and system) of the calling OS thread.
func threadCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// sockRAM is the guest RAM BenchmarkUnixSocket moves.
const sockRAM = 512 << 20

// sockEncode writes every page of src as PAGE records (a PART section per
// 64 MiB) with PutPageRef (or PutPage when ref is false), and closes the
// stream. It runs locked to its OS thread and returns that thread's CPU time.
func sockEncode(tb testing.TB, e *Encoder, src []byte, ref bool) time.Duration {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	t0 := threadCPU()
	must(tb, e.WriteHeader(guestName))
	must(tb, e.StartRAM(testPS, []Block{{"pc.ram", uint64(len(src))}}))
	put := e.PutPage
	if ref {
		put = e.PutPageRef
	}
	for off := uint64(0); off < uint64(len(src)); off += testPS {
		if off%(64<<20) == 0 {
			if off > 0 {
				must(tb, e.CloseRAMSection())
			}
			must(tb, e.BeginRAMPart())
		}
		must(tb, put("pc.ram", off, src[off:off+testPS]))
	}
	must(tb, e.CloseRAMSection())
	must(tb, e.Close())
	return threadCPU() - t0
}

// sockDecode reads the stream into dst, locked to its OS thread, and
// returns that thread's CPU time.
func sockDecode(tb testing.TB, d *Decoder, dst []byte) time.Duration {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	t0 := threadCPU()
	for {
		rec, err := d.Next()
		if err == io.EOF {
			return threadCPU() - t0
		}
		must(tb, err)
		if rec.Kind == KindPage {
			must(tb, d.ReadPage(dst[rec.Offset:rec.Offset+testPS]))
		}
	}
}

// guestMem maps size bytes of guest RAM and writes every page from user
// space with a pattern (seed 0: zeros), so it is faulted in but only user
// space has touched it. thp false maps a memfd shared, as guest.Builtin backs
// guest RAM; true maps anonymous memory with MADV_HUGEPAGE, the backing
// issue 8 plans (QEMU's).
func guestMem(tb testing.TB, size int, thp bool, seed byte) []byte {
	tb.Helper()
	var m []byte
	var err error
	if thp {
		m, err = unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		must(tb, err)
		must(tb, unix.Madvise(m, unix.MADV_HUGEPAGE))
	} else {
		fd, err := unix.MemfdCreate("stream-bench", unix.MFD_CLOEXEC)
		must(tb, err)
		defer unix.Close(fd)
		must(tb, unix.Ftruncate(fd, int64(size)))
		m, err = unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		must(tb, err)
	}
	tb.Cleanup(func() { unix.Munmap(m) })
	pat := make([]byte, 1<<20)
	if seed != 0 {
		for i := range pat {
			pat[i] = byte(i*31>>7) ^ seed | 1
		}
	}
	for off := 0; off < size; off += len(pat) {
		copy(m[off:], pat)
	}
	return m
}

// kernelTouch has the kernel read every page of src and write every page of
// dst once (src through a socketpair into dst, 1 MiB at a time).
func kernelTouch(tb testing.TB, src, dst []byte) {
	a, c := socketPair(tb, 4<<20)
	done := make(chan error, 1)
	go func() {
		_, err := a.Write(src)
		done <- err
	}()
	for off := 0; off < len(dst); off += 1 << 20 {
		_, err := io.ReadFull(c, dst[off:min(len(dst), off+1<<20)])
		must(tb, err)
	}
	must(tb, <-done)
	a.Close()
	c.Close()
}

// BenchmarkUnixSocket moves 512 MiB of guest RAM (4 KiB data pages, no zero
// pages) from an Encoder in one goroutine through a unix socketpair (4 MiB
// socket buffers, transport's default for unix:) to a Decoder in another,
// which reads every page into the destination's guest RAM. Both RAMs are
// shared memfd mappings, as guest.Builtin's, faulted in from user space
// before the clock starts. Each variant sets one side's path:
//
//	enc=copy     PutPage through a bufio.Writer and write(2): main's path
//	enc=writev   PutPageRef: pages written from the source RAM by writev
//	dec=twocopy  every page byte through the read buffer: main's path
//	dec=direct   the part of a page the buffer lacks read with Read calls
//	             straight into the destination
//	dec=readv    the same with one readv (page, then buffer): the default
//
// and the guest RAM: mem=cold, fresh memfd memory only user space has
// touched (guest.Builtin's backing, in a migration's first pass); mem=warm,
// the same after the kernel has read (src) or written (dst) every page once,
// untimed (later passes); mem=thp, fresh anonymous memory with
// MADV_HUGEPAGE. On this project's machines (a PVM guest) the kernel's first
// access to each 4 KiB page of a user mapping costs 6 to 9 µs, and only the
// paths where the kernel reads or writes guest RAM itself (writev, readv)
// pay it; with transparent huge pages it is gone.
//
// The clock starts when the socketpair is open and the memory prepared, and
// stops when the Decoder has returned io.EOF after the vmdesc and the Encoder
// has returned from Close. Besides MB/s (of guest RAM) each side reports the
// CPU time of its own OS thread per MiB of guest RAM, user and system (the
// kernel's copy included), which does not depend on the other side's speed:
// enc-cpu-ns/MiB, dec-cpu-ns/MiB; and dec-copies/B, the page bytes the
// Decoder copied out of its buffer per page byte (1: all of them; the
// kernel's copy is not counted). Run it with -benchtime 1x: one 512 MiB
// transfer per variant.
func BenchmarkUnixSocket(b *testing.B) {
	for _, mem := range []string{"cold", "warm", "thp"} {
		for _, v := range []struct {
			name           string
			vector, ref    bool
			direct, useRaw bool
		}{
			{"enc=copy/dec=twocopy", false, false, false, false},
			{"enc=writev/dec=twocopy", true, true, false, false},
			{"enc=writev/dec=direct", true, true, true, false},
			{"enc=writev/dec=readv", true, true, true, true},
		} {
			b.Run("mem="+mem+"/"+v.name, func(b *testing.B) {
				var encCPU, decCPU time.Duration
				var copied, total uint64
				var src, dst []byte
				for b.Loop() {
					b.StopTimer()
					if src == nil || mem != "warm" {
						src = guestMem(b, sockRAM, mem == "thp", 0x5a)
						dst = guestMem(b, sockRAM, mem == "thp", 0)
						if mem == "warm" {
							kernelTouch(b, src, dst)
						}
					}
					a, c := socketPair(b, 4<<20)
					e := newEncoder(a, v.vector)
					if e.ZeroCopy() != v.vector {
						b.Fatalf("ZeroCopy() = %v, want %v", e.ZeroCopy(), v.vector)
					}
					d := NewDecoder(c, Limits{PageSize: testPS, Blocks: map[string]uint64{"pc.ram": sockRAM}})
					d.rb.direct = v.direct
					if !v.useRaw {
						d.rb.raw = nil
					} else if d.rb.raw == nil {
						b.Fatal("the Decoder did not find the socket")
					}
					b.StartTimer()
					done := make(chan time.Duration, 1)
					go func() { done <- sockEncode(b, e, src, v.ref) }()
					decCPU += sockDecode(b, d, dst)
					encCPU += <-done
					b.StopTimer()
					a.Close()
					c.Close()
					copied += d.rb.copied
					total += d.rb.copied + d.rb.straight
					for off := 0; off < sockRAM; off += 1 << 20 {
						if src[off+4095] != dst[off+4095] || src[off] != dst[off] {
							b.Fatalf("destination differs at %#x", off)
						}
					}
					b.StartTimer()
				}
				b.SetBytes(sockRAM)
				mib := float64(b.N) * sockRAM / (1 << 20)
				b.ReportMetric(float64(encCPU.Nanoseconds())/mib, "enc-cpu-ns/MiB")
				b.ReportMetric(float64(decCPU.Nanoseconds())/mib, "dec-cpu-ns/MiB")
				b.ReportMetric(float64(copied)/float64(total), "dec-copies/B")
			})
		}
	}
}
