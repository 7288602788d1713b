package mappedram_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/migctl/migctl/mappedram"
	"github.com/migctl/migctl/stream"
)

// A save of a 2 MiB guest to a mapped-ram file with two channels, then a
// verified restore into fresh memory and the device state from the stream.
func Example() {
	dir, _ := os.MkdirTemp("", "mappedram-example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "vm.mig")
	ctx := context.Background()
	blocks := []stream.Block{{Name: "pc.ram", Size: 2 << 20}}
	guest := make([]byte, 2<<20)
	copy(guest[0x3000:], "page three")

	f, _ := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	enc := stream.NewEncoder(f)
	_ = enc.WriteHeader("example-guest")
	layout, _ := enc.StartRAMMapped(4096, blocks, f, mappedram.RecordSize)
	sv, _ := mappedram.NewSaver(f, layout, mappedram.Options{Channels: 2})
	for off := uint64(0); off < 2<<20; off += 4096 { // one pass
		page := guest[off : off+4096]
		if off == 0x3000 {
			_ = sv.Submit(ctx, "pc.ram", []uint64{off}, [][]byte{page})
		} else {
			_ = sv.MarkZero("pc.ram", []uint64{off})
		}
	}
	_ = sv.Sync(ctx) // end of the pass
	_ = enc.BeginRAMEnd()
	_ = enc.CloseRAMSection()
	_ = sv.Finish(ctx)
	_ = enc.WriteDevice("timer", 0, 1, []byte("ticks"))
	_ = enc.Close()
	fmt.Println("complete:", sv.Complete(0))
	_ = sv.Close()
	f.Close()

	f, _ = os.Open(path)
	defer f.Close()
	r, err := mappedram.Open(f, 0, mappedram.Options{Channels: 2})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	mem := make([]byte, 2<<20)
	fmt.Println("load:", r.Load(ctx, func(string) []byte { return mem }), r.Blocks())
	fmt.Printf("%s\n", mem[0x3000:0x300a])
	d := stream.NewDecoder(r.Stream(), stream.Limits{Blocks: map[string]uint64{"pc.ram": 2 << 20}})
	for {
		rec, err := d.Next()
		if err == io.EOF {
			break
		}
		if rec.Kind == stream.KindDevice {
			fmt.Printf("device %s: %s\n", rec.Section.IDStr, rec.Data)
		}
	}
	// Output:
	// complete: <nil>
	// load: <nil> [{pc.ram 2097152 1}]
	// page three
	// device timer: ticks
}
