package engine_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/mappedram"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/stream"
)

// mappedCfg is a 32 MiB guest (plus its 1 MiB vga.vram) that dirties
// memory throughout a save.
func mappedCfg() guest.Config {
	return guest.Config{Size: 32 << 20, DirtyRate: 8 << 20, Seed: 77, ZeroFraction: 0.1}
}

// save migrates src to uri (a file: or fd: on a regular file) and returns
// the source's result. With pause it stops in pre-switchover until the
// guest has written more pages (so the final pass rewrites pages the first
// one wrote), runs atPause if set, then continues.
func save(t *testing.T, src *end, uri string, opts engine.Options, pause bool, atPause ...func()) engine.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	if pause {
		if err := src.c.SetCapabilities(ctx, map[string]bool{"pause-before-switchover": true}); err != nil {
			t.Fatal(err)
		}
	}
	m, err := engine.Start(ctx, src.c, src.g, uri, opts)
	if err != nil {
		t.Fatalf("migrate to %s: %v", uri, err)
	}
	if pause {
		waitState(t, sub, machine.StatePreSwitchover)
		w0 := src.g.Stats().PagesWritten
		waitFor(t, "the guest to write a page while paused before switchover", func() bool { return src.g.Stats().PagesWritten > w0 })
		for _, f := range atPause {
			f()
		}
		if err := m.Continue(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		_ = m.Cancel(context.Background())
		<-m.Done()
		t.Fatalf("the save did not end in time: %v", err)
	}
	return sr
}

// waitFor polls cond until it holds, failing the test after 20 s: for a
// condition the code under test offers no event for (the guest's write
// counter).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	deadline := time.After(20 * time.Second)
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// restore loads uri into dst, a fresh destination, and returns its result;
// beforeStart, if given, runs once everything is loaded.
func restore(t *testing.T, dst *end, uri string, beforeStart ...func()) loaders.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	opts := loaders.Options{PageSums: true}
	if len(beforeStart) > 0 {
		opts.BeforeStart = func([][]uint32) error { beforeStart[0](); return nil }
	}
	in, err := loaders.Listen(ctx, dst.c, dst.g, uri, opts)
	if err != nil {
		t.Fatalf("listen on %s: %v", uri, err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		in.Abort("test timed out")
		<-in.Done()
		t.Fatalf("the restore did not end in time: %v", err)
	}
	return dr
}

// mappedFileBound is the size a mapped-ram file of the test guest may
// have: per block, the header and bitmap area rounded up to the 1 MiB
// page alignment, then the block; plus the main stream's device state and
// vmdesc, and the 64-byte marker (docs/mapped-ram.md). Written out here,
// not taken from the code: 2 MiB of slack covers the header area of the
// two blocks and the small stream after them.
func mappedFileBound(cfg guest.Config) int64 {
	return cfg.Size + guest.DefaultVRAM + 2<<20 + 64<<10
}

// mapped-ram save and restore, the guest dirtying memory throughout the
// save, single channel and with multifd (its channels write the file,
// several at once), and with direct-io: the destination, a fresh process's
// worth of state, equals the source. Pages went to their offsets (none as
// main-stream records), a page written in the first pass and dirtied again
// was written again in place (more pages written than the guest has, the
// file still the size of one copy).
func TestMappedRAM(t *testing.T) {
	for _, tc := range []struct {
		name     string
		channels int // 0: multifd off
		directIO bool
		zero     string
	}{
		{name: "single"},
		{name: "multifd-1", channels: 1},
		{name: "multifd-2", channels: 2},
		{name: "multifd-4", channels: 4},
		{name: "multifd-2-legacy-zero", channels: 2, zero: "legacy"},
		{name: "multifd-2-direct-io", channels: 2, directIO: true},
		// QEMU's migrate_direct_io: without multifd, direct-io does nothing.
		{name: "single-direct-io-no-effect", directIO: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.directIO {
				skipWithoutODirect(t, dir)
			}
			src, dst := newEnd(t, false, mappedCfg()), newEnd(t, true, mappedCfg())
			caps := map[string]bool{"mapped-ram": true}
			params := map[string]any{"downtime-limit": 2000}
			if tc.channels > 0 {
				caps["multifd"] = true
				params["multifd-channels"] = tc.channels
			}
			if tc.directIO {
				params["direct-io"] = true
			}
			if tc.zero != "" {
				params["zero-page-detection"] = tc.zero
			}
			setBoth(t, caps, params, src, dst)
			path := filepath.Join(dir, "guest.mig")
			// While the save is paused, and before the destination starts
			// its guest, is the file open with O_DIRECT? Only with
			// direct-io and multifd.
			wantDirect := tc.directIO && tc.channels > 0
			checkDirect := func(side string) func() {
				return func() {
					if got := openedODirect(t, path); got != wantDirect {
						t.Errorf("%s: %s open with O_DIRECT: %v, want %v", side, path, got, wantDirect)
					}
				}
			}
			sr := save(t, src, "file:"+path, engine.Options{}, true, checkDirect("source"))
			if sr.Err != nil || sr.State != "completed" {
				t.Fatalf("save ended %s: %v", sr.State, sr.Err)
			}
			pages := uint64(0)
			for _, b := range src.g.Blocks() {
				pages += uint64(b.Pages())
			}
			if put := sr.Stats.Normal + sr.Stats.Duplicate; put <= pages {
				t.Fatalf("the scanner handed %d pages for a guest of %d: no page was rewritten", put, pages)
			}
			if written := sr.Stats.Normal * sr.Stats.PageSize; written == 0 || sr.Stats.Transferred < written {
				t.Fatalf("%d bytes transferred for %d pages written", sr.Stats.Transferred, sr.Stats.Normal)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() > mappedFileBound(mappedCfg()) {
				t.Fatalf("the file is %d bytes, more than one copy of the guest (%d): pages were not rewritten in place", st.Size(), mappedFileBound(mappedCfg()))
			}
			dr := restore(t, dst, "file:"+path, checkDirect("destination"))
			if dr.Err != nil || dr.State != "completed" {
				t.Fatalf("restore ended %s: %v", dr.State, dr.Err)
			}
			if dr.Wire.MappedPages == 0 || dr.Wire.MainPages != 0 || dr.Wire.MainZeros != 0 || dr.Wire.MultifdPages != 0 {
				t.Fatalf("pages did not come from their offsets: %+v", dr.Wire)
			}
			if checksum(t, src.g) != checksum(t, dst.g) {
				t.Fatal("checksums differ")
			}
		})
	}
}

// openedODirect reports whether this process has path open with O_DIRECT
// (/proc/self/fdinfo's flags, octal): path itself (a destination reading
// it) or the temporary file an atomic save to path writes
// (.NAME.migctl-*.tmp next to it, transport's saveFile).
func openedODirect(t *testing.T, path string) bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue
		}
		tmp, _ := filepath.Match(filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".migctl-*.tmp"), target)
		if target != path && !tmp {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				fl, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
				if err != nil {
					t.Fatalf("fdinfo %s: %q", e.Name(), line)
				}
				if fl&unix.O_DIRECT != 0 {
					return true
				}
			}
		}
	}
	return false
}

// skipWithoutODirect skips the test when dir's file system refuses
// O_DIRECT (tmpfs does).
func skipWithoutODirect(t *testing.T, dir string) {
	t.Helper()
	fd, err := unix.Open(filepath.Join(dir, "odirect-probe"), unix.O_CREAT|unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Skipf("%s refuses O_DIRECT (%v): direct-io cannot be tested here", dir, err)
	}
	unix.Close(fd)
}

// An fd: on a regular file is a mapped-ram endpoint (probed seekable), for
// the save and for the restore; an fd: on a pipe is refused when the
// migration starts, by the rule that wants a seekable transport.
func TestMappedRAMOverFD(t *testing.T) {
	cfg := mappedCfg()
	cfg.DirtyRate = 0
	src, dst := newEnd(t, false, cfg), newEnd(t, true, cfg)
	setBoth(t, map[string]bool{"mapped-ram": true, "multifd": true}, map[string]any{"multifd-channels": 2}, src, dst)
	path := filepath.Join(t.TempDir(), "fd.mig")
	// An earlier, longer file: the save cuts it at the descriptor's offset.
	if err := os.WriteFile(path, bytes.Repeat([]byte{0xee}, 64<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	wfd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sr := save(t, src, "fd:"+strconv.Itoa(wfd), engine.Options{}, false) // the transport takes wfd
	if sr.Err != nil {
		t.Fatalf("save over fd: %v", sr.Err)
	}
	rfd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	dr := restore(t, dst, "fd:"+strconv.Itoa(rfd))
	if dr.Err != nil || dr.Wire.MappedPages == 0 {
		t.Fatalf("restore over fd: %v (%+v)", dr.Err, dr.Wire)
	}
	if checksum(t, src.g) != checksum(t, dst.g) {
		t.Fatal("checksums differ")
	}

	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	src2 := newEnd(t, false, cfg)
	setBoth(t, map[string]bool{"mapped-ram": true}, nil, src2)
	_, err = engine.Start(context.Background(), src2.c, src2.g, "fd:"+strconv.Itoa(p[1]), engine.Options{})
	if err == nil || !strings.Contains(err.Error(), "mapped-ram needs a seekable transport") {
		t.Fatalf("mapped-ram over fd: on a pipe: %v; want the seekable rule's refusal", err)
	}
}

// file:PATH,offset=N: the stream (and every offset of the layout) starts
// at N, the bytes before it are kept, and the restore from the same
// address finds it there.
func TestMappedRAMFileOffset(t *testing.T) {
	cfg := mappedCfg()
	cfg.DirtyRate = 0
	src, dst := newEnd(t, false, cfg), newEnd(t, true, cfg)
	setBoth(t, map[string]bool{"mapped-ram": true}, nil, src, dst)
	path := filepath.Join(t.TempDir(), "offset.mig")
	prefix := bytes.Repeat([]byte("keep me "), 8192/8)
	if err := os.WriteFile(path, prefix, 0o600); err != nil {
		t.Fatal(err)
	}
	uri := "file:" + path + ",offset=8192"
	if sr := save(t, src, uri, engine.Options{}, false); sr.Err != nil {
		t.Fatal(sr.Err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:8192], prefix) || string(b[8192:8196]) != "QEVM" {
		t.Fatalf("the file starts %q, then %q at the offset", b[:16], b[8192:8196])
	}
	if dr := restore(t, dst, uri); dr.Err != nil {
		t.Fatal(dr.Err)
	}
	if checksum(t, src.g) != checksum(t, dst.g) {
		t.Fatal("checksums differ")
	}
}

// newRunningDest is a destination whose guest runs once its migration
// completes (no stop requested), to show the ones that fail never start.
func newRunningDest(t *testing.T, cfg guest.Config) *end {
	t.Helper()
	g, err := guest.NewDestination(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c, err := machine.New(defaultSpec(t), machine.Options{Facts: map[string]string{"page-size": "4096", "guest": g.ID()}, Incoming: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); g.Close() })
	return &end{c: c, g: g}
}

// untouched fails unless every byte of dst's RAM is still zero (a fresh
// destination's memory) and its guest never ran.
func untouched(t *testing.T, dst *end) {
	t.Helper()
	for _, b := range dst.g.Blocks() {
		if i := bytes.IndexFunc(b.Mem, func(r rune) bool { return r != 0 }); i >= 0 {
			t.Fatalf("block %s: byte %#x was written although the load failed", b.Name, i)
		}
	}
	if dst.g.Running() {
		t.Fatal("the destination's guest runs")
	}
	if st, _ := dst.c.State(spec.Guest); st == machine.GuestRunning {
		t.Fatalf("the guest graph is %s", st)
	}
	if dst.g.Stats().RunTime != 0 {
		t.Fatal("the destination's guest ran")
	}
}

// The loader verifies the whole file before it writes a page: a flipped
// byte in a header or a bitmap, a missing completion marker, a truncated
// file all fail the destination with guest RAM still all zero, and its
// guest never starts; the intact file (the control) loads and starts.
func TestMappedRAMCorruptFiles(t *testing.T) {
	cfg := mappedCfg()
	cfg.DirtyRate = 0
	src := newEnd(t, false, cfg)
	setBoth(t, map[string]bool{"mapped-ram": true}, nil, src)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.mig")
	if sr := save(t, src, "file:"+good, engine.Options{}, false); sr.Err != nil {
		t.Fatal(sr.Err)
	}
	orig, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	// Where the blocks lie, from the format's own scanner (the marker is
	// the last 64 bytes).
	f, err := os.Open(good)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := stream.ScanMappedRAM(f, 0, int64(len(orig))-mappedram.TrailerSize, stream.Limits{PageSize: 4096}, mappedram.RecordSize)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	blk := idx.Blocks[0]
	flip := func(off uint64) func([]byte) []byte {
		return func(b []byte) []byte { b[off] ^= 0x01; return b }
	}
	for _, tc := range []struct {
		name   string
		damage func([]byte) []byte // nil: the intact file
		class  error               // the destination's error wraps it
		want   string              // and says this
	}{
		{name: "intact"},
		{name: "header byte flipped", damage: flip(blk.HeaderOffset + 13), class: stream.ErrCorrupt, want: "header"},
		{name: "bitmap byte flipped", damage: flip(blk.Header.BitmapOffset + 1), class: mappedram.ErrChecksum, want: "bitmap fails the CRC-32C"},
		{name: "marker missing", damage: func(b []byte) []byte { return b[:len(b)-mappedram.TrailerSize] }, class: mappedram.ErrIncomplete, want: "completion marker"},
		{name: "truncated", damage: func(b []byte) []byte { return b[:len(b)/2] }, class: mappedram.ErrIncomplete, want: "completion marker"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".mig")
			b := bytes.Clone(orig)
			if tc.damage != nil {
				b = tc.damage(b)
			}
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			dst := newRunningDest(t, cfg)
			setBoth(t, map[string]bool{"mapped-ram": true}, nil, dst)
			dr := restore(t, dst, "file:"+path)
			if tc.damage == nil {
				if dr.Err != nil || !dst.g.Running() {
					t.Fatalf("the intact file: %v, guest running %v", dr.Err, dst.g.Running())
				}
				return
			}
			if dr.Err == nil || dr.State != "failed" || !errors.Is(dr.Err, tc.class) || !strings.Contains(dr.Err.Error(), tc.want) {
				t.Fatalf("ended %s: %v; want failed with %v naming %q", dr.State, dr.Err, tc.class, tc.want)
			}
			if dr.Wire.MappedPages != 0 {
				t.Fatalf("%d pages loaded", dr.Wire.MappedPages)
			}
			untouched(t, dst)
		})
	}
}

// A file saved without mapped-ram, loaded with it on, and the reverse:
// the destination fails before it writes a page, naming the capability.
func TestMappedRAMMismatch(t *testing.T) {
	cfg := mappedCfg()
	cfg.DirtyRate = 0
	for _, savedWith := range []bool{false, true} {
		t.Run(fmt.Sprintf("saved-with-mapped-ram=%v", savedWith), func(t *testing.T) {
			src := newEnd(t, false, cfg)
			setBoth(t, map[string]bool{"mapped-ram": savedWith}, nil, src)
			path := filepath.Join(t.TempDir(), "guest.mig")
			if sr := save(t, src, "file:"+path, engine.Options{}, false); sr.Err != nil {
				t.Fatal(sr.Err)
			}
			dst := newRunningDest(t, cfg)
			setBoth(t, map[string]bool{"mapped-ram": !savedWith}, nil, dst)
			dr := restore(t, dst, "file:"+path)
			if dr.Err == nil || !strings.Contains(dr.Err.Error(), "capability mapped-ram") {
				t.Fatalf("ended %s: %v; want a failure naming capability mapped-ram", dr.State, dr.Err)
			}
			untouched(t, dst)
		})
	}
}

// A save cancelled half-way: the source ends cancelled with its guest
// running and its memory intact; the file it left has no completion
// marker, and loading it fails with guest RAM untouched.
func TestMappedRAMCancelled(t *testing.T) {
	cfg := mappedCfg()
	src := newEnd(t, false, cfg)
	setBoth(t, map[string]bool{"mapped-ram": true}, map[string]any{"max-bandwidth": "8M"}, src)
	// A save at an offset is written in place (a file: save without one
	// is atomic: cancelled, it leaves no file at all): what a cancel
	// leaves there must be refused as incomplete.
	path := filepath.Join(t.TempDir(), "cancelled.mig")
	if err := os.WriteFile(path, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	uri := "file:" + path + ",offset=4096"
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	m, err := engine.Start(ctx, src.c, src.g, uri, engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Half-way: a third of the guest written.
	for done := false; !done; {
		select {
		case ev := <-sub.C():
			done = ev.Kind == machine.EventStats && ev.Side == spec.Outgoing && ev.Stats.Transferred > uint64(cfg.Size)/3
		case <-ctx.Done():
			t.Fatal("the save never got a third of the way")
		}
	}
	if err := m.Cancel(ctx); err != nil {
		t.Fatal(err)
	}
	sr, _ := m.Wait(ctx)
	if sr.State != "cancelled" || !errors.Is(sr.Err, engine.ErrCancelled) {
		t.Fatalf("source ended %s: %v", sr.State, sr.Err)
	}
	if !src.g.Running() {
		t.Fatal("the source's guest does not run after the cancel")
	}
	src.g.Stop()
	if err := src.g.Verify(); err != nil {
		t.Fatalf("source memory after cancel: %v", err)
	}
	dst := newRunningDest(t, cfg)
	setBoth(t, map[string]bool{"mapped-ram": true}, nil, dst)
	dr := restore(t, dst, uri)
	if dr.Err == nil || !errors.Is(dr.Err, mappedram.ErrIncomplete) {
		t.Fatalf("loading the cancelled save: %v; want the completion marker missing (mappedram.ErrIncomplete)", dr.Err)
	}
	untouched(t, dst)
}
