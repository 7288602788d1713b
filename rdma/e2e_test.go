package rdma

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
)

// transfer migrates two patterned blocks (64 MiB in all) from a source to a
// destination whose memory starts as 0xAA garbage: pages by WriteRAM
// (copy-free from the source's blocks, plus one range through the staging
// copy), zero pages by WriteZero; stream bytes both ways. The destination
// checks its memory right after reading the marker that follows the RAM
// writes in the stream — the ordering guarantee — without waiting for Sync.
func transfer(t *testing.T, network string, pinAll bool) (SourceStats, DestStats) {
	ctx := testCtx(t)
	p := softProvider()
	sizes := map[string]int{"pc.ram": 48 << 20, "vga": 16<<20 - 4096*3} // vga ends inside a chunk
	names := []string{"pc.ram", "vga"}
	zeroChunks := map[string]map[int]bool{"pc.ram": {2: true, 3: true, 40: true}, "vga": {0: true}}
	var src, dst []Block
	for i, n := range names {
		s, d := mapMem(t, sizes[n]), mapMem(t, sizes[n])
		pattern(s, byte(i+1), zeroChunks[n])
		fill(d, 0xAA)
		src = append(src, Block{Name: n, Mem: s})
		dst = append(dst, Block{Name: n, Mem: d})
	}
	// The destination lists its blocks in the other order: RAM_BLOCKS_REQUEST
	// carries the source's order.
	dst[0], dst[1] = dst[1], dst[0]

	l, err := Listen(ctx, p, loopback(t, network), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	header := bytes.Repeat([]byte("QEVM-device-state-"), 6000) // ~105 KiB: several QEMU_FILE messages
	marker := []byte("RAM-DONE")
	type result struct {
		stats DestStats
		err   error
	}
	done := make(chan result, 1)
	go func() {
		d, err := l.Accept(ctx, dst)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer d.Close()
		if d.PinAll() != pinAll {
			done <- result{err: fmt.Errorf("destination pin-all %v, source asked %v", d.PinAll(), pinAll)}
			return
		}
		got := make([]byte, len(header)+len(marker))
		if _, err := io.ReadFull(d, got); err != nil {
			done <- result{err: fmt.Errorf("destination read: %w", err)}
			return
		}
		if !bytes.Equal(got[:len(header)], header) || !bytes.Equal(got[len(header):], marker) {
			done <- result{err: errors.New("destination: stream bytes differ")}
			return
		}
		for _, b := range dst {
			var want []byte
			for _, s := range src {
				if s.Name == b.Name {
					want = s.Mem
				}
			}
			if i := firstDiff(b.Mem, want); i >= 0 {
				done <- result{err: fmt.Errorf("destination block %s differs at %#x: %#x, want %#x (RAM writes had not landed when the marker was read)", b.Name, i, b.Mem[i], want[i])}
				return
			}
		}
		if _, err := d.Write([]byte("SHUT(0)")); err != nil {
			done <- result{err: err}
			return
		}
		if err := d.Flush(); err != nil {
			done <- result{err: err}
			return
		}
		// The source closes after reading SHUT: an orderly EOF here.
		if n, err := d.Read(make([]byte, 1)); err != io.EOF {
			done <- result{err: fmt.Errorf("destination: after the source closed, Read = %d, %v; want io.EOF", n, err)}
			return
		}
		done <- result{stats: d.Stats()}
	}()

	s, err := Dial(ctx, p, l.Addr().String(), Options{PinAll: pinAll, Blocks: src})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.PinAll() != pinAll {
		t.Fatalf("source pin-all %v, want %v", s.PinAll(), pinAll)
	}
	if _, err := s.Write(header); err != nil {
		t.Fatal(err)
	}
	for _, b := range src {
		for off := 0; off < len(b.Mem); off += 4096 {
			page := b.Mem[off:min(off+4096, len(b.Mem))]
			switch {
			case isZero(page):
				err = s.WriteZero(ctx, b.Name, uint64(off), uint64(len(page)))
			case b.Name == "vga" && off >= 4<<20 && off < 6<<20:
				err = s.WriteRAM(ctx, b.Name, uint64(off), bytes.Clone(page)) // not in a source block: staged
			default:
				err = s.WriteRAM(ctx, b.Name, uint64(off), page)
			}
			if err != nil {
				t.Fatalf("%s at %#x: %v", b.Name, off, err)
			}
		}
	}
	// End of pass one; then one late page in the middle of a chunk: it stays
	// pending (merged writes are posted at a chunk's end) until the stream
	// bytes after it are sent, which must post it first.
	if err := s.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	late := src[0].Mem[0x2000:0x3000]
	fill(late, 0x5A)
	if err := s.WriteRAM(ctx, "pc.ram", 0x2000, late); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write(marker); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	shut := make([]byte, 7)
	if _, err := io.ReadFull(s, shut); err != nil || string(shut) != "SHUT(0)" {
		_ = s.Close()
		t.Fatalf("return path: %q, %v; the destination: %v", shut, err, (<-done).err)
	}
	st := s.Stats()
	if err := s.Close(); err != nil {
		t.Fatalf("source close: %v", err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	return st, r.stats
}

func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return 0
	}
	for i := 0; i < len(a); i += 4096 {
		end := min(i+4096, len(a))
		if !bytes.Equal(a[i:end], b[i:end]) {
			for j := i; j < end; j++ {
				if a[j] != b[j] {
					return j
				}
			}
		}
	}
	return -1
}

func TestTransfer(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6"} {
		for _, pinAll := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/pin-all=%v", network, pinAll), func(t *testing.T) {
				ss, ds := transfer(t, network, pinAll)
				t.Logf("source %+v; destination %+v", ss, ds)
				// 64 MiB in 1 MiB chunks: pc.ram 48, vga 16 (last partial).
				const chunks, zeroChunks = 64, 4
				if pinAll {
					if ss.Registrations != 0 || ss.Compressed != 0 || ds.Registrations != 2 {
						t.Errorf("pin-all: %d register round trips, %d COMPRESS, %d destination registrations; want 0, 0, 2 (one per block)",
							ss.Registrations, ss.Compressed, ds.Registrations)
					}
				} else {
					if ss.Registrations != chunks-zeroChunks || ds.Registrations != chunks-zeroChunks {
						t.Errorf("on demand: %d/%d registrations, want %d (one per chunk holding data)", ss.Registrations, ds.Registrations, chunks-zeroChunks)
					}
					if ss.Compressed == 0 || ds.Compressed != ss.Compressed {
						t.Errorf("on demand: %d COMPRESS sent, %d applied; want the zero chunks compressed", ss.Compressed, ds.Compressed)
					}
				}
				// The staged range is vga [4 MiB, 6 MiB): pages 1024..1535, of
				// which pattern leaves those with page%5 == 3 zero.
				var staged uint64
				for page := 1024; page < 1536; page++ {
					if page%5 != 3 {
						staged += 4096
					}
				}
				if ss.Copied != staged {
					t.Errorf("%d bytes staged, want %d (the non-zero pages written from outside the source's blocks)", ss.Copied, staged)
				}
				if ds.Finished != 2 {
					t.Errorf("destination saw %d REGISTER_FINISHED, want 2 (two Syncs)", ds.Finished)
				}
			})
		}
	}
}
