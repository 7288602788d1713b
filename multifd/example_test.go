package multifd_test

import (
	"bytes"
	"fmt"
	"io"

	"github.com/migctl/migctl/multifd"
)

// One zstd channel: the source writes the initial packet, a packet of two
// pages (one of them listed as a zero page) and its sync packet; the
// destination routes the connection by its initial packet and reads the
// pages straight into guest memory.
func Example() {
	blocks := map[string]uint64{"pc.ram": 1 << 20}
	guest := make([]byte, 1<<20)
	copy(guest[0x2000:], "hello from the source")

	var conn bytes.Buffer // a TCP connection in real life
	w, _ := multifd.NewWriter(&conn, multifd.WriterOptions{Blocks: blocks, Compression: multifd.CompressionZstd, Level: 1})
	defer w.Close()
	_ = w.WriteInit(multifd.Init{Channel: 0})
	offs := []uint64{0x1000, 0x2000}
	pages := [][]byte{guest[0x1000:0x2000], guest[0x2000:0x3000]}
	n := multifd.Partition(offs, pages, multifd.IsZero) // zero-page-detection=multifd
	_ = w.Write(&multifd.Batch{Num: 0, Block: "pc.ram", Normal: offs[:n], Pages: pages[:n], Zero: offs[n:]})
	_ = w.WriteSync(1)

	in, _ := multifd.ReadInit(&conn)
	fmt.Println("channel", in.Channel, in.Check([16]byte{}, 2))
	dest := make([]byte, 1<<20)
	r, _ := multifd.NewReader(&conn, int(in.Channel), multifd.Limits{Blocks: blocks, Compression: multifd.CompressionZstd})
	defer r.Close()
	for {
		h, err := r.Next()
		if err == io.EOF {
			break
		}
		fmt.Printf("packet %d sync=%v normal=%x zero=%x\n", h.PacketNum, h.Sync(), h.Normal, h.Zero)
		if len(h.Normal) > 0 {
			_ = r.ReadPages(func(_ int, off uint64) []byte { return dest[off : off+4096] })
		}
	}
	fmt.Printf("%s\n", dest[0x2000:0x2015])
	// Output:
	// channel 0 <nil>
	// packet 0 sync=false normal=[2000] zero=[1000]
	// packet 1 sync=true normal=[] zero=[]
	// hello from the source
}
