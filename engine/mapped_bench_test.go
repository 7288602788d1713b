package engine_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
)

// mappedVariants are the configurations the mapped-ram benchmarks run.
var mappedVariants = []struct {
	name     string
	channels int // 0: multifd off
}{{"single", 0}, {"multifd-4", 4}}

func mappedCaps(channels int) (map[string]bool, map[string]any) {
	caps := map[string]bool{"mapped-ram": true}
	params := map[string]any{"max-bandwidth": 0}
	if channels > 0 {
		caps["multifd"] = true
		params["multifd-channels"] = channels
	}
	return caps, params
}

// mappedSource is a fresh source controller (a completed save leaves the
// previous one's guest graph in postmigrate) for the guest g.
func mappedSource(b *testing.B, g *guest.Builtin, channels int) *end {
	c, err := machine.New(defaultSpec(b), machine.Options{})
	if err != nil {
		b.Fatal(err)
	}
	caps, params := mappedCaps(channels)
	if err := c.SetCapabilities(context.Background(), caps); err != nil {
		b.Fatal(err)
	}
	if err := c.SetParameters(context.Background(), params); err != nil {
		b.Fatal(err)
	}
	return &end{c: c, g: g}
}

// mappedSaveOnce saves src to path; it returns the time from engine.Start
// to the migration's end (completed: the bitmaps, integrity records and
// completion marker written, both fdatasyncs returned, the file closed).
func mappedSaveOnce(b *testing.B, src *end, path string) time.Duration {
	ctx := context.Background()
	start := time.Now()
	m, err := engine.Start(ctx, src.c, src.g, "file:"+path, engine.Options{})
	if err != nil {
		b.Fatal(err)
	}
	sr, _ := m.Wait(ctx)
	took := time.Since(start)
	if sr.Err != nil {
		b.Fatalf("save ended %s: %v", sr.State, sr.Err)
	}
	return took
}

// rawWrite writes mem to a new file at path from one goroutine in 1 MiB
// pwrites; it returns the time of the writes alone (page cache) and with
// the fdatasync that follows.
func rawWrite(b *testing.B, path string, mem []byte) (cached, synced time.Duration) {
	_ = os.Remove(path)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	for off := 0; off < len(mem); off += 1 << 20 {
		if _, err := f.WriteAt(mem[off:min(off+1<<20, len(mem))], int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	cached = time.Since(start)
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		b.Fatal(err)
	}
	return cached, time.Since(start)
}

// BenchmarkMappedRAMSave saves an idle guest of random pages (default 256
// MiB, MIGCTL_BENCH_SIZE=2G for the figure) to a mapped-ram file,
// single channel and with four multifd channels, and in the same run
// writes the same bytes to a new file of the same file system with plain
// 1 MiB pwrites from one goroutine.
//
// Clocks: the save's starts before engine.Start and stops when the
// migration has ended completed (every page written, bitmaps, records and
// the completion marker written, the file fdatasynced twice and closed);
// the raw write's starts before its first pwrite and stops after its
// fdatasync returns ("raw-synced"), with the time of the pwrites alone also
// reported ("raw-cached": what the page cache absorbs). Between iterations
// both files are removed and rewritten from scratch. Reports medians and
// ratio = raw-synced time / save time (1 = as fast as the raw write).
func BenchmarkMappedRAMSave(b *testing.B) {
	size := benchSize(b, 256<<20)
	cfg := guest.Config{Size: size, Seed: 5, Random: true, VRAM: -1}
	g, err := guest.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	dir := b.TempDir()
	for _, v := range mappedVariants {
		b.Run(v.name, func(b *testing.B) {
			var saves, cached, synced []time.Duration
			for b.Loop() {
				path := filepath.Join(dir, "save.mig")
				_ = os.Remove(path)
				src := mappedSource(b, g, v.channels)
				saves = append(saves, mappedSaveOnce(b, src, path))
				src.c.Close()
				c, s := rawWrite(b, filepath.Join(dir, "raw.bin"), g.Blocks()[0].Mem)
				cached, synced = append(cached, c), append(synced, s)
			}
			save, c, s := median(saves), median(cached), median(synced)
			b.ReportMetric(float64(size)/save.Seconds()/1e9, "save-GB/s")
			b.ReportMetric(float64(size)/s.Seconds()/1e9, "raw-synced-GB/s")
			b.ReportMetric(float64(size)/c.Seconds()/1e9, "raw-cached-GB/s")
			b.ReportMetric(s.Seconds()/save.Seconds(), "ratio")
			fmt.Fprintf(os.Stderr, "mapped-ram save/%s size=%d MiB: save %.2f GB/s, raw write+fdatasync %.2f GB/s (page cache alone %.2f GB/s), ratio %.2f (medians of %d)\n",
				v.name, size>>20, float64(size)/save.Seconds()/1e9, float64(size)/s.Seconds()/1e9, float64(size)/c.Seconds()/1e9, s.Seconds()/save.Seconds(), len(saves))
		})
	}
}

// rawRead reads len(dst) bytes of path from one goroutine in 1 MiB preads
// into dst; it returns the time from the first pread to the last.
func rawRead(b *testing.B, path string, dst []byte) time.Duration {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	for off := 0; off < len(dst); off += 1 << 20 {
		if _, err := f.ReadAt(dst[off:min(off+1<<20, len(dst))], int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start)
}

// BenchmarkMappedRAMRestore restores the file BenchmarkMappedRAMSave's
// save writes (idle random guest, default 256 MiB) into a fresh
// destination, single channel and with four multifd channels, and in the
// same run reads the same number of bytes of a plain file with 1 MiB
// preads from one goroutine into fresh anonymous memory. Both files are
// written before the timed loop and are in the page cache.
//
// Clocks: the restore's starts before loaders.Listen and stops when the
// incoming migration has ended completed (the whole file verified — marker,
// headers, bitmaps, records, the main stream's CRC — every page read into
// guest RAM, the device state applied); the destination does not pre-fault
// (loaders.Options.NoPrefault), so its first touches are in the clock as
// they are in the raw read's. The raw read's starts before its first pread
// and stops after its last. Building the destination guest and mapping the
// raw read's memory are outside both. Reports medians and ratio = raw time
// / restore time.
func BenchmarkMappedRAMRestore(b *testing.B) {
	size := benchSize(b, 256<<20)
	cfg := guest.Config{Size: size, Seed: 5, Random: true, VRAM: -1}
	g, err := guest.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	dir := b.TempDir()
	raw := filepath.Join(dir, "raw.bin")
	rawWrite(b, raw, g.Blocks()[0].Mem)
	for _, v := range mappedVariants {
		b.Run(v.name, func(b *testing.B) {
			path := filepath.Join(dir, v.name+".mig")
			src := mappedSource(b, g, v.channels)
			mappedSaveOnce(b, src, path)
			src.c.Close()
			var restores, reads []time.Duration
			for b.Loop() {
				dst := newEndB(b, true, cfg)
				caps, params := mappedCaps(v.channels)
				if err := dst.c.SetCapabilities(context.Background(), caps); err != nil {
					b.Fatal(err)
				}
				if err := dst.c.SetParameters(context.Background(), params); err != nil {
					b.Fatal(err)
				}
				ctx := context.Background()
				start := time.Now()
				in, err := loaders.Listen(ctx, dst.c, dst.g, "file:"+path, loaders.Options{NoPrefault: true})
				if err != nil {
					b.Fatal(err)
				}
				dr, _ := in.Wait(ctx)
				restores = append(restores, time.Since(start))
				if dr.Err != nil {
					b.Fatalf("restore ended %s: %v", dr.State, dr.Err)
				}
				dst.c.Close()
				dst.g.Close()

				mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
				if err != nil {
					b.Fatal(err)
				}
				_ = unix.Madvise(mem, unix.MADV_HUGEPAGE) // as the guest's default backing
				reads = append(reads, rawRead(b, raw, mem))
				_ = unix.Munmap(mem)
			}
			rs, rd := median(restores), median(reads)
			b.ReportMetric(float64(size)/rs.Seconds()/1e9, "restore-GB/s")
			b.ReportMetric(float64(size)/rd.Seconds()/1e9, "raw-read-GB/s")
			b.ReportMetric(rd.Seconds()/rs.Seconds(), "ratio")
			fmt.Fprintf(os.Stderr, "mapped-ram restore/%s size=%d MiB: restore %.2f GB/s, raw read %.2f GB/s, ratio %.2f (medians of %d)\n",
				v.name, size>>20, float64(size)/rs.Seconds()/1e9, float64(size)/rd.Seconds()/1e9, rd.Seconds()/rs.Seconds(), len(restores))
		})
	}
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
