package loaders_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/mappedram"
	"github.com/migctl/migctl/stream"
)

// fileOpts says how to build a file for the destination guest g.
type fileOpts struct {
	mapped   bool   // lay RAM out as mapped-ram
	announce bool   // the handshake says mapped-ram (on when mapped)
	device   string // a device section to add ("" none)
	pageRec  bool   // put a PAGE record on the main stream too
}

// buildFile writes a complete migration file of g's blocks, every page
// filled with 0x5a, by hand (stream.Encoder, and a mappedram.Saver for
// mapped-ram), so the handshake can say what a migctl source never would.
func buildFile(t *testing.T, g *guest.Builtin, o fileOpts) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	path := filepath.Join(t.TempDir(), "built.mig")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	enc := stream.NewEncoder(f)
	must(enc.WriteHeader(g.ID()))
	caps := map[string]bool{}
	if o.announce {
		caps["mapped-ram"] = o.mapped
	}
	blocks := map[string]uint64{}
	var sb []stream.Block
	for _, b := range g.Blocks() {
		blocks[b.Name] = uint64(len(b.Mem))
		sb = append(sb, stream.Block{Name: b.Name, Size: uint64(len(b.Mem))})
	}
	must(enc.WriteHandshake(&stream.Handshake{Protocol: stream.HandshakeProtocol, Side: stream.SideSource, PageSize: 4096, GuestID: g.ID(),
		Capabilities: caps, Parameters: map[string]string{}, RAMBlocks: blocks}))
	full := page(0x5a)
	var sv *mappedram.Saver
	if o.mapped {
		layout, err := enc.StartRAMMapped(4096, sb, f, mappedram.RecordSize)
		must(err)
		sv, err = mappedram.NewSaver(f, layout, mappedram.Options{})
		must(err)
		defer sv.Close()
		for _, b := range sb {
			for off := uint64(0); off < b.Size; off += 4096 {
				must(sv.WritePages(b.Name, []uint64{off}, [][]byte{full}))
			}
		}
		must(enc.BeginRAMEnd())
		if o.pageRec {
			must(enc.PutPage(sb[0].Name, 0, page(0x66)))
		}
		must(enc.CloseRAMSection())
		must(sv.Finish(ctx))
	} else {
		must(enc.StartRAM(4096, sb))
		must(enc.BeginRAMEnd())
		for _, b := range sb {
			for off := uint64(0); off < b.Size; off += 4096 {
				must(enc.PutPage(b.Name, off, full))
			}
		}
		must(enc.CloseRAMSection())
	}
	if o.device != "" {
		must(enc.WriteDevice(o.device, 0, 1, []byte("state")))
	}
	must(enc.Close())
	if sv != nil {
		must(sv.Complete(0))
	}
	return path
}

// loadFile loads path into a fresh destination with mapped-ram set as
// given; the destination's guest would run on success.
func loadFile(t *testing.T, path string, mappedRAM bool) (loaders.Result, *machine.Controller, *guest.Builtin) {
	t.Helper()
	c, g := newDest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.SetCapabilities(ctx, map[string]bool{"mapped-ram": mappedRAM}); err != nil {
		t.Fatal(err)
	}
	in, err := loaders.Listen(ctx, c, g, "file:"+path, loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := in.Wait(ctx)
	if err != nil {
		in.Abort("test timed out")
		<-in.Done()
		t.Fatal(err)
	}
	return r, c, g
}

// untouched fails unless g's RAM is all zero and its guest never ran.
func untouched(t *testing.T, g *guest.Builtin) {
	t.Helper()
	for _, b := range g.Blocks() {
		if i := bytes.IndexFunc(b.Mem, func(r rune) bool { return r != 0 }); i >= 0 {
			t.Fatalf("block %s: byte %#x written although the load failed", b.Name, i)
		}
	}
	if g.Running() || g.Stats().RunTime != 0 {
		t.Fatal("the destination's guest ran")
	}
}

// What only the file can tell, when the handshake does not say it (the
// must-match check at connect then has nothing to compare): a file laid
// out as mapped-ram loaded with mapped-ram off, and a plain stream loaded
// with it on, fail before a page is written, naming the capability. A
// mapped-ram file whose main stream carries a page record, or a device
// this guest lacks, fails before its pages are read too. The intact
// files (controls) load.
func TestMappedRAMFileChecks(t *testing.T) {
	_, g := newDest(t)
	for _, tc := range []struct {
		name      string
		file      fileOpts
		mappedRAM bool   // the destination's capability
		want      string // "" loads
	}{
		{name: "mapped-ram file, mapped-ram on", file: fileOpts{mapped: true}, mappedRAM: true},
		{name: "plain file, mapped-ram off", file: fileOpts{}, mappedRAM: false},
		{name: "mapped-ram file, mapped-ram off", file: fileOpts{mapped: true}, mappedRAM: false, want: "saved with capability mapped-ram"},
		{name: "plain file, mapped-ram on", file: fileOpts{}, mappedRAM: true, want: "capability mapped-ram is on, and file:"},
		{name: "page record on the main stream", file: fileOpts{mapped: true, pageRec: true}, mappedRAM: true, want: "RAM record"},
		{name: "unknown device", file: fileOpts{mapped: true, device: "gpu"}, mappedRAM: true, want: "device gpu"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := buildFile(t, g, tc.file)
			r, _, dg := loadFile(t, path, tc.mappedRAM)
			if tc.want == "" {
				if r.Err != nil || !dg.Running() {
					t.Fatalf("the control file: %v, guest running %v", r.Err, dg.Running())
				}
				return
			}
			if r.Err == nil || r.State != "failed" || !strings.Contains(r.Err.Error(), tc.want) {
				t.Fatalf("ended %s: %v; want failed saying %q", r.State, r.Err, tc.want)
			}
			untouched(t, dg)
		})
	}
}
