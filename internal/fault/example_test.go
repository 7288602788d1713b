package fault_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/migctl/migctl/internal/fault"
)

// A proxy between a client and an upstream server: bytes pass, a stall
// holds them (the sockets stay open), Heal and Drain deliver them, a cut
// ends both sides' streams.
func Example() {
	up, _ := net.Listen("tcp", "127.0.0.1:0")
	defer up.Close()
	p, _ := fault.Listen("tcp", "127.0.0.1:0", fault.DialAddr("tcp", up.Addr().String()), fault.Options{})
	defer p.Close()

	client, _ := net.Dial("tcp", p.Addr().String())
	defer client.Close()
	server, _ := up.Accept()
	defer server.Close()
	_ = server.SetReadDeadline(time.Now().Add(10 * time.Second))

	buf := make([]byte, 5)
	client.Write([]byte("hello"))
	io.ReadFull(server, buf)
	fmt.Printf("forwarded %q\n", buf)

	p.Stall()
	client.Write([]byte("later"))
	p.Heal()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p.Drain(ctx)
	io.ReadFull(server, buf)
	fmt.Printf("after the stall %q, %d bytes forwarded\n", buf, p.Forwarded(fault.Forward))

	p.Cut()
	_, err := server.Read(buf)
	fmt.Println("after the cut the server's stream ended:", err != nil)
	// Output:
	// forwarded "hello"
	// after the stall "later", 10 bytes forwarded
	// after the cut the server's stream ended: true
}
