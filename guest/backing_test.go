package guest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/migctl/migctl/host"
	"golang.org/x/sys/unix"
)

// statusBytes reads one "Key: N kB" line of /proc/self/status, in bytes.
// (Its own parser, so that a bug in the package's cannot hide here.)
func statusBytes(t *testing.T, key string) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	mustOK(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var kb int64
		if _, err := fmt.Sscanf(sc.Text(), key+": %d kB", &kb); err == nil {
			return kb * 1024
		}
	}
	t.Fatalf("/proc/self/status has no %s line", key)
	return 0
}

// backingTable is what each Config.Backing must give: the package doc's
// promise (anonymous memory has no descriptor; a memfd is one another
// process can open, whose /proc/self/fd link names "memfd:").
var backingTable = []struct {
	backing   string // Config.Backing
	want      string // Preparation().Backing
	fd        bool   // Block.FD >= 0
	rssCount  string // the /proc/self/status counter its pages are charged to
	linkStart string // readlink(/proc/self/fd/FD) prefix, when fd
}{
	{"", "anon", false, "RssAnon", ""},
	{"anon", "anon", false, "RssAnon", ""},
	{"memfd", "memfd", true, "RssShmem", "/memfd:migctl-guest:"},
}

// TestBackingsMigrate: a guest on each backing migrates into a guest on
// each backing, with and without Prealloc: the same ID, blocks copied page
// by page through Blocks/Page with the dirty log while the writers run,
// devices through Save/Load; the destination passes Verify and the
// checksums agree.
func TestBackingsMigrate(t *testing.T) {
	for _, src := range backingTable {
		for _, dst := range backingTable[1:] {
			for _, prealloc := range []bool{false, true} {
				name := fmt.Sprintf("%s-to-%s/prealloc=%v", src.want, dst.want, prealloc)
				if src.backing == "" {
					name = "default-to-" + dst.want + fmt.Sprintf("/prealloc=%v", prealloc)
				}
				t.Run(name, func(t *testing.T) {
					cfg := Config{Size: 8 * mib, DirtyRate: 200 << 20, Writers: 2, Seed: 31, ZeroFraction: 0.2, Backing: src.backing, Prealloc: prealloc}
					s := newGuest(t, cfg)
					dcfg := cfg
					dcfg.Backing, dcfg.DirtyRate = dst.backing, 0
					d := newDest(t, dcfg)
					for _, c := range []struct {
						g    *Builtin
						want string
						fd   bool
						link string
					}{{s, src.want, src.fd, src.linkStart}, {d, dst.want, dst.fd, dst.linkStart}} {
						if got := c.g.Preparation().Backing; got != c.want {
							t.Fatalf("Preparation().Backing = %q, want %q", got, c.want)
						}
						for _, b := range c.g.Blocks() {
							if (b.FD >= 0) != c.fd {
								t.Fatalf("%s backing: block %s FD = %d", c.want, b.Name, b.FD)
							}
							if c.fd {
								link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", b.FD))
								mustOK(t, err)
								if !strings.HasPrefix(link, c.link+b.Name) {
									t.Fatalf("block %s FD links to %q, want a memfd %q", b.Name, link, c.link+b.Name)
								}
							}
						}
					}
					if s.ID() != d.ID() {
						t.Fatalf("backing changed the identity:\n source %s\n dest   %s", s.ID(), d.ID())
					}
					wait := batches(t, s)
					dirty := NewBitmaps(s.Blocks())
					mustOK(t, s.Start())
					s.StartDirtyLog()
					for i, b := range s.Blocks() {
						copy(d.Blocks()[i].Mem, b.Mem)
					}
					copyDirty := func() {
						s.SyncDirty(dirty)
						for i, b := range s.Blocks() {
							bm := Bitmap(dirty[i])
							for p := bm.Next(0); p >= 0; p = bm.Next(p + 1) {
								copy(d.Blocks()[i].Page(p), b.Page(p))
							}
							bm.Reset()
						}
					}
					for range 3 {
						if wait(2) == 0 {
							t.Fatal("writers wrote nothing")
						}
						copyDirty()
					}
					mustOK(t, s.Stop())
					copyDirty()
					for i, dev := range s.Devices() {
						st, err := dev.Save()
						mustOK(t, err)
						mustOK(t, d.Devices()[i].Load(st))
					}
					mustOK(t, d.Verify())
					sc, err := s.Checksum()
					mustOK(t, err)
					dc, err := d.Checksum()
					mustOK(t, err)
					if sc != dc {
						t.Fatalf("checksums differ: source %#x, destination %#x", sc, dc)
					}
				})
			}
		}
	}
}

// TestPreallocFaultsIn: with Prealloc, NewDestination returns with every
// page of RAM resident (mincore), charged to the process (RssAnon for
// anonymous memory, RssShmem for a memfd) and the time recorded; without
// it, nothing is resident. Not parallel: it measures the process's RSS.
func TestPreallocFaultsIn(t *testing.T) {
	const size = 64 * mib
	for _, bt := range backingTable[1:] {
		for _, prealloc := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/prealloc=%v", bt.want, prealloc), func(t *testing.T) {
				before := statusBytes(t, bt.rssCount)
				vmBefore := statusBytes(t, "VmRSS")
				g := newDest(t, Config{Size: size, Seed: 1, VRAM: -1, Backing: bt.backing, Prealloc: prealloc})
				grew := statusBytes(t, bt.rssCount) - before
				vmGrew := statusBytes(t, "VmRSS") - vmBefore
				ram := g.Blocks()[0]
				res := resident(t, ram.Mem)
				p := g.Preparation()
				st := g.Stats()
				t.Logf("%s grew by %d MiB, VmRSS by %d MiB; %d of %d pages resident; preparation %+v", bt.rssCount, grew>>20, vmGrew>>20, res, ram.Pages(), p)
				if !prealloc {
					if res != 0 || grew > size/10 || p.Prealloc || g.PrepareTime() != 0 || st.PrepareTime != 0 || st.HugeBytes != -1 {
						t.Fatalf("without Prealloc: %d pages resident, %s grew %d, preparation %+v, stats %+v", res, bt.rssCount, grew, p, st)
					}
					return
				}
				if res != ram.Pages() {
					t.Fatalf("after Prealloc %d of %d pages resident", res, ram.Pages())
				}
				if grew < size*95/100 || vmGrew < size*95/100 {
					t.Fatalf("after Prealloc of %d MiB, %s grew by %d MiB and VmRSS by %d MiB", size>>20, bt.rssCount, grew>>20, vmGrew>>20)
				}
				if !p.Prealloc || p.Bytes != size || p.Time <= 0 || g.PrepareTime() != p.Time || st.PrepareTime != p.Time || st.HugeBytes != p.HugeBytes {
					t.Fatalf("preparation %+v, PrepareTime %v, stats %+v", p, g.PrepareTime(), st)
				}
				if p.Method != PrepareMadvise {
					t.Logf("kernel lacks MADV_POPULATE_WRITE: prealloc touched every page instead (%s)", p.Method)
				}
				zero := make([]byte, PageSize)
				for pg := range ram.Pages() {
					if !bytes.Equal(ram.Page(pg), zero) {
						t.Fatalf("preallocated destination RAM is not zero at page %d", pg)
					}
				}
			})
		}
	}
}

// TestPreallocWithoutPopulateWrite: on a kernel without
// MADV_POPULATE_WRITE (simulated: the advice fails with EINVAL, as Linux
// before 5.14 answers), Prealloc still faults in every page, by touching
// them as QEMU does, and the source's content is intact; Populate reports
// ErrPopulateUnsupported.
func TestPreallocWithoutPopulateWrite(t *testing.T) {
	saved := populateAdvice
	t.Cleanup(func() { populateAdvice = saved })
	populateAdvice = func([]byte) error { return unix.EINVAL }
	for _, bt := range backingTable[1:] {
		t.Run(bt.want, func(t *testing.T) {
			d := newDest(t, Config{Size: 8 * mib, Seed: 2, Backing: bt.backing, Prealloc: true})
			for _, b := range d.Blocks() {
				if n := resident(t, b.Mem); n != b.Pages() {
					t.Fatalf("block %s: %d of %d pages resident", b.Name, n, b.Pages())
				}
			}
			if m := d.Preparation().Method; m != PrepareTouch {
				t.Fatalf("Method = %q, want %q", m, PrepareTouch)
			}
			if err := d.Populate(t.Context(), 0); !errors.Is(err, ErrPopulateUnsupported) {
				t.Fatalf("Populate = %v, want ErrPopulateUnsupported", err)
			}
			s := newGuest(t, Config{Size: 8 * mib, Seed: 2, Backing: bt.backing, Prealloc: true})
			mustOK(t, s.Verify())
		})
	}
}

// TestAnonHugePages: anonymous RAM is 2 MiB aligned and, where the host's
// policy lets MADV_HUGEPAGE memory have huge pages, both Prealloc and
// Populate give it huge pages; a memfd gets them only if shmem may.
func TestAnonHugePages(t *testing.T) {
	thp, err := host.TransparentHugePages()
	if err != nil {
		t.Skipf("no transparent huge pages on this host: %v", err)
	}
	const size = 64 * mib
	for _, prealloc := range []bool{true, false} {
		t.Run(fmt.Sprintf("prealloc=%v", prealloc), func(t *testing.T) {
			g := newDest(t, Config{Size: size, Seed: 3, Prealloc: prealloc})
			ram := g.Blocks()[0]
			if addr := uintptr(unsafe.Pointer(&ram.Mem[0])); addr%(2<<20) != 0 {
				t.Fatalf("anonymous pc.ram at %#x is not 2 MiB aligned", addr)
			}
			if !thp.AnonAdvised() {
				t.Skipf("host gives anonymous memory no huge pages: %s (want always or madvise)", thp)
			}
			if !prealloc {
				mustOK(t, g.Populate(t.Context(), 0))
			}
			huge, err := g.HugePageBytes()
			mustOK(t, err)
			t.Logf("%s; %d of %d MiB of RAM in huge pages; preparation %+v", thp, huge>>20, (size+DefaultVRAM)>>20, g.Preparation())
			// The kernel may fail to find a free 2 MiB page when memory is
			// fragmented (then it falls back to 4 KiB pages for that range):
			// ask for three quarters, not all.
			if huge < size*3/4 {
				t.Fatalf("only %d of %d MiB of anonymous RAM in huge pages (%s)", huge>>20, size>>20, thp)
			}
			if prealloc && g.Preparation().HugeBytes != huge {
				t.Fatalf("Preparation().HugeBytes = %d, HugePageBytes() = %d", g.Preparation().HugeBytes, huge)
			}
		})
	}
	t.Run("memfd", func(t *testing.T) {
		g := newDest(t, Config{Size: size, Seed: 3, Prealloc: true, Backing: BackingMemfd})
		huge := g.Preparation().HugeBytes
		t.Logf("%s; memfd RAM in huge pages: %d MiB", thp, huge>>20)
		if !thp.ShmemAdvised() && huge != 0 {
			t.Fatalf("memfd has %d bytes in huge pages though shmem may have none (%s)", huge, thp)
		}
		if huge < 0 {
			t.Fatalf("HugeBytes = %d after Prealloc: smaps unreadable?", huge)
		}
	})
}

// TestAnonAligned: anonymous blocks of 2 MiB or more start on a 2 MiB
// boundary, whatever their size (recent kernels align anonymous mappings
// whose length is a multiple of 2 MiB by themselves, older ones and other
// lengths not), so that their memory can be mapped by huge pages.
func TestAnonAligned(t *testing.T) {
	for _, size := range []int64{2 * mib, 8 * mib, 8*mib + PageSize, 3*mib + 3*PageSize} {
		g, err := NewDestination(Config{Size: size, VRAM: -1})
		mustOK(t, err)
		ram := g.Blocks()[0]
		addr := uint64(uintptr(unsafe.Pointer(&ram.Mem[0])))
		if addr%(2<<20) != 0 {
			t.Errorf("anonymous pc.ram of %d bytes at %#x is not 2 MiB aligned", size, addr)
		}
		// Every byte is usable (the trimmed mapping still covers the block).
		ram.Mem[0], ram.Mem[len(ram.Mem)-1] = 1, 2
		// The over-sized mapping's tail is gone: the page after the block
		// is unmapped (mincore fails with ENOMEM). (Its head, when there is
		// one, cannot be told apart from a neighbouring mapping this way.)
		vec := make([]byte, 1)
		after := uintptr(addr) + uintptr(size)
		if _, _, e := unix.Syscall(unix.SYS_MINCORE, after, PageSize, uintptr(unsafe.Pointer(&vec[0]))); e != unix.ENOMEM {
			t.Errorf("block of %d bytes at %#x: the page after it is mapped (mincore: %v): the mapping was not trimmed", size, addr, e)
		}
		mustOK(t, g.Close())
	}
}

// TestCheckMemory: a size beyond the host's memory fails naming both
// numbers; a small one passes; a guest whose Prealloc would not fit is
// refused before it is built.
func TestCheckMemory(t *testing.T) {
	mustOK(t, CheckMemory(4096))
	const huge = int64(1) << 60
	err := CheckMemory(huge)
	var me *MemoryError
	if !errors.Is(err, ErrNoMemory) || !errors.As(err, &me) {
		t.Fatalf("CheckMemory(1 EiB) = %v, want a *MemoryError wrapping ErrNoMemory", err)
	}
	if me.Need != huge || me.Available <= 0 || me.Available >= huge {
		t.Fatalf("MemoryError = %+v", me)
	}
	for _, want := range []string{strconv.FormatInt(huge, 10), strconv.FormatInt(me.Available, 10), "MemAvailable"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if err := CheckMemory(-1); !errors.Is(err, ErrConfig) {
		t.Errorf("CheckMemory(-1) = %v, want ErrConfig", err)
	}

	fake := filepath.Join(t.TempDir(), "meminfo")
	mustOK(t, os.WriteFile(fake, []byte("MemTotal:  8192 kB\nMemFree:  4096 kB\nMemAvailable:    2048 kB\n"), 0o600))
	saved := meminfoPath
	t.Cleanup(func() { meminfoPath = saved })
	meminfoPath = fake
	if err := CheckMemory(2048 << 10); err != nil {
		t.Errorf("CheckMemory of exactly MemAvailable = %v", err)
	}
	if err := CheckMemory(2048<<10 + 1); !errors.As(err, &me) || me.Available != 2048<<10 {
		t.Errorf("CheckMemory one byte over = %v", err)
	}
	if _, err := NewDestination(Config{Size: 4 * mib, Prealloc: true}); !errors.Is(err, ErrNoMemory) {
		t.Errorf("NewDestination with Prealloc of more than MemAvailable = %v, want ErrNoMemory", err)
	}
	g := newDest(t, Config{Size: 4 * mib}) // without Prealloc, no check
	_ = g
	mustOK(t, os.WriteFile(fake, []byte("MemTotal: 8192 kB\n"), 0o600))
	if err := CheckMemory(1); err == nil || errors.Is(err, ErrNoMemory) {
		t.Errorf("CheckMemory with no MemAvailable line = %v, want a parse error", err)
	}
}

func TestParseMemAvailable(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64 // -1: error
	}{
		{"MemTotal: 1 kB\nMemAvailable:   23456 kB\n", 23456 << 10},
		{"MemAvailable: 0 kB", 0},
		{"MemAvailable: 12 MB\n", -1},
		{"MemAvailable: -5 kB\n", -1},
		{"MemAvailable: 99999999999999999999 kB\n", -1},
		{"MemAvailableX: 5 kB\n", -1},
		{"", -1},
	} {
		got, err := parseMemAvailable([]byte(c.in))
		if c.want < 0 {
			if err == nil {
				t.Errorf("%q: got %d, want an error", c.in, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: got %d, %v; want %d", c.in, got, err, c.want)
		}
	}
}

func TestParseSmapsHuge(t *testing.T) {
	const smaps = `7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
AnonHugePages:      4096 kB
ShmemPmdMapped:        0 kB
VmFlags: rd wr mr mw me ac hg
7f0000800000-7f0000a00000 rw-s 00000000 00:01 7   /memfd:migctl-guest:vga.vram (deleted)
AnonHugePages:         0 kB
ShmemPmdMapped:     2048 kB
7f0001000000-7f0002000000 rw-p 00000000 00:00 0
AnonHugePages:     16384 kB
garbage line
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
AnonHugePages:         0 kB
`
	for _, c := range []struct {
		r    addrRange
		want int64
	}{
		{addrRange{0x7f0000000000, 0x7f0000800000}, 4 << 20},   // the first mapping exactly
		{addrRange{0x7f0000800000, 0x7f0000a00000}, 2 << 20},   // shmem PMD-mapped
		{addrRange{0x7f0000000000, 0x7f0000a00000}, 6 << 20},   // both
		{addrRange{0x7f0001000000, 0x7f0001200000}, 2 << 20},   // part of a merged mapping: capped at the overlap
		{addrRange{0x7f0000a00000, 0x7f0001000000}, 0},         // a gap
		{addrRange{0xffffffffff600000, 0xffffffffff601000}, 0}, // no huge pages
	} {
		got := parseSmapsHuge([]byte(smaps), []addrRange{c.r})
		if got[0] != c.want {
			t.Errorf("range %#x-%#x: %d bytes, want %d", c.r.lo, c.r.hi, got[0], c.want)
		}
	}
}

func FuzzParseMemAvailable(f *testing.F) {
	f.Add([]byte("MemTotal: 1 kB\nMemAvailable: 23456 kB\n"))
	f.Add([]byte("MemAvailable: 99999999999999999 kB"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, err := parseMemAvailable(b); err == nil && n < 0 {
			t.Fatalf("negative MemAvailable %d from %q", n, b)
		}
	})
}

func FuzzParseSmapsHuge(f *testing.F) {
	f.Add([]byte("7f0000000000-7f0000800000 rw-p 00000000 00:00 0\nAnonHugePages: 4096 kB\nShmemPmdMapped: 2048 kB\n"), uint64(0x7f0000000000), uint64(0x200000))
	f.Add([]byte("0-ffffffffffffffff r\nAnonHugePages: 9007199254740991 kB\nAnonHugePages: 9007199254740991 kB\n"), uint64(0), uint64(1<<63))
	f.Fuzz(func(t *testing.T, b []byte, lo, n uint64) {
		r := addrRange{lo, lo + n}
		if r.hi < r.lo {
			r.hi = ^uint64(0)
		}
		got := parseSmapsHuge(b, []addrRange{r})
		if got[0] < 0 || uint64(got[0]) > r.hi-r.lo {
			t.Fatalf("%d huge bytes in a range of %d", got[0], r.hi-r.lo)
		}
	})
}

// TestStepEnd: populate steps end on multiples of the step in the address
// space, so that a 512 KiB step never straddles two huge pages, whatever
// the offset at which a block (or a chunk of one) starts.
func TestStepEnd(t *testing.T) {
	g := newDest(t, Config{Size: 8 * mib, VRAM: -1}) // anonymous: 2 MiB aligned
	mem := g.Blocks()[0].Mem
	for _, c := range []struct {
		start, off, step, want int
	}{
		{0, 0, 512 << 10, 512 << 10},
		{0, 512 << 10, 512 << 10, 1 << 20},
		{4096, 0, 512 << 10, 512<<10 - 4096},
		{4096, 512<<10 - 4096, 512 << 10, 1<<20 - 4096},
		{3 * 4096, 0, 2 << 20, 2<<20 - 3*4096},
		{0, 4096, 2 << 20, 2 << 20},
	} {
		if got := stepEnd(mem[c.start:], c.off, c.step); got != c.want {
			t.Errorf("block+%#x: stepEnd(off %#x, step %#x) = %#x, want %#x", c.start, c.off, c.step, got, c.want)
		}
	}
}

// TestHugePageBytesDuringClose: HugePageBytes may run while the guest is
// closed (it reads the blocks' addresses under the guest's lock, the
// kernel's counters outside it); under -race this proves it does not read a
// block's Mem while Close clears it, and it ends with ErrClosed.
func TestHugePageBytesDuringClose(t *testing.T) {
	g, err := NewDestination(Config{Size: 4 * mib})
	mustOK(t, err)
	done := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			if i == 1 {
				close(started)
			}
			if _, err := g.HugePageBytes(); err != nil {
				done <- err
				return
			}
		}
	}()
	<-started
	mustOK(t, g.Close())
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("HugePageBytes after Close = %v, want ErrClosed", err)
	}
}
