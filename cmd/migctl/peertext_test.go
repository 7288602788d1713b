package main

import (
	"encoding/json"
	"net"
	"path/filepath"
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

// The client does not trust its server either: a QMP server (not
// necessarily migctl's) whose error-desc and error replies carry terminal
// escapes and megabytes gets them printed bounded and escaped by `migctl
// status` and by a failing command.
func TestClientSanitisesServerText(t *testing.T) {
	hostile := "\x1b]0;pwned\x07\x1b[2J" + strings.Repeat("E", 1<<20)
	sock := filepath.Join(t.TempDir(), "fake.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go fakeQMP(c, hostile)
		}
	}()
	defer func() { ln.Close(); <-done }()
	for _, args := range [][]string{{"status", "-s", sock}, {"stop", "-s", sock}} {
		out, errOut, _ := run(t, args...)
		all := out + errOut
		if strings.ContainsRune(all, 0x1b) || strings.ContainsRune(all, 0x07) || len(all) > 64<<10 {
			t.Fatalf("migctl %s printed raw control characters or %d bytes: %.200q", args[0], len(all), all)
		}
		if !strings.Contains(all, `\x1b]0;pwned`) {
			t.Fatalf("migctl %s lost the server's text: %.300q", args[0], all)
		}
	}
}

// fakeQMP answers a QMP client: the greeting, qmp_capabilities, and then
// text for everything else — query-migrate a failed status with text as
// its error-desc, query-status running, any other command an error whose
// desc is text.
func fakeQMP(c net.Conn, text string) {
	defer c.Close()
	enc := json.NewEncoder(c)
	_ = enc.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{"qemu": map[string]int{"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []string{}}})
	dec := json.NewDecoder(c)
	for {
		var req struct {
			Execute string          `json:"execute"`
			ID      json.RawMessage `json:"id,omitempty"`
		}
		if err := dec.Decode(&req); err != nil {
			return
		}
		var reply map[string]any
		switch req.Execute {
		case "qmp_capabilities":
			reply = map[string]any{"return": map[string]any{}}
		case "query-migrate":
			reply = map[string]any{"return": map[string]any{"status": "failed", "error-desc": text}}
		case "query-status":
			reply = map[string]any{"return": map[string]any{"status": "running", "running": true}}
		default:
			reply = map[string]any{"error": map[string]any{"class": "GenericError", "desc": text}}
		}
		if len(req.ID) > 0 {
			reply["id"] = req.ID
		}
		if err := enc.Encode(reply); err != nil {
			return
		}
	}
}
