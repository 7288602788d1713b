package main

import (
	"net"
	"strings"
	"testing"

	"github.com/migctl/migctl/stream"
)

// Issue 12, "what is wrong" 4: a source's 900 KB guest ID with terminal
// escapes reached `migctl status` raw and made a 900 KB error-desc that
// go-qemu cannot read. Against a `migctl serve --destination`, go-qemu
// reads query-migrate and `migctl status` prints the reason bounded, with
// the escapes written out.
func TestServeHostilePeerText(t *testing.T) {
	dst := startServe(t, "dst", "--guest=size=8M,dirty-rate=0,seed=1", "--destination")
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	port := listenPort(t, dst.info())
	conn, err := net.Dial("tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	enc := stream.NewEncoder(conn)
	id := "\x1b]0;pwned\x07\x1b[2J" + strings.Repeat("G", 900<<10)
	if err := enc.WriteHeader("x"); err != nil {
		t.Fatal(err)
	}
	if err := enc.WriteHandshake(&stream.Handshake{PageSize: 4096, GuestID: id, Capabilities: map[string]bool{},
		Parameters: map[string]string{}, RAMBlocks: map[string]uint64{}}); err != nil {
		t.Fatal(err)
	}
	if err := enc.Flush(); err != nil {
		t.Fatal(err)
	}
	dst.waitStatus("failed")
	desc, _ := dst.info()["error-desc"].(string) // go-qemu read the reply
	if !strings.Contains(desc, "guest differs") || len(desc) > 8<<10 {
		t.Fatalf("error-desc (%d bytes): %.300q", len(desc), desc)
	}
	out, errOut, code := run(t, "status", "-s", dst.sock)
	if code != 0 || !strings.Contains(out, `\x1b]0;pwned\a`) && !strings.Contains(out, `\x1b]0;pwned\x07`) {
		t.Fatalf("status: exit %d, %.400q %q", code, out, errOut)
	}
	if strings.ContainsRune(out, 0x1b) || strings.ContainsRune(out, 0x07) || len(out) > 16<<10 {
		t.Fatalf("status printed raw control characters or %d bytes: %.300q", len(out), out)
	}
}
