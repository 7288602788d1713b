package creds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

func TestKindOf(t *testing.T) {
	cases := []struct {
		head []byte
		want Kind
	}{
		{[]byte{0x16, 0x03, 0x01, 0x02}, KindTLS}, // TLS 1.3 ClientHellos use record version 0x0301
		{[]byte{0x16, 0x03, 0x03, 0x00}, KindTLS},
		{[]byte{0x16, 0x03, 0x05, 0x00}, KindUnknown},
		{[]byte{0x15, 0x03, 0x01, 0x00}, KindUnknown}, // an alert is not a ClientHello
		{[]byte("QEVM"), KindStream},
		{[]byte{0x11, 0x22, 0x33, 0x44}, KindMultifd},
		{[]byte("GET "), KindUnknown},
		{[]byte("QEV"), KindUnknown},
		{nil, KindUnknown},
	}
	for _, tc := range cases {
		if got := KindOf(tc.head); got != tc.want {
			t.Errorf("KindOf(% x) = %v, want %v", tc.head, got, tc.want)
		}
	}
}

// TestSniffReplays: the sniffed bytes are read again, then the rest.
func TestSniffReplays(t *testing.T) {
	a, b := socketPair(t)
	go func() { a.Write([]byte("QEVM\x00\x00\x00\x03rest")); a.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	kind, rc, err := Sniff(ctx, b)
	if err != nil || kind != KindStream {
		t.Fatalf("Sniff: %v, %v", kind, err)
	}
	all, err := io.ReadAll(rc)
	if err != nil || string(all) != "QEVM\x00\x00\x00\x03rest" {
		t.Fatalf("replayed %q, %v", all, err)
	}
	if err := Expect(kind, all[:4], false); err != nil {
		t.Fatalf("plaintext stream refused by a plaintext side: %v", err)
	}
	if err := rc.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite through the replaying conn: %v", err)
	}
}

// TestSniffShortAndCancelled: a peer that hangs up early, and one that
// says nothing until the context is cancelled.
func TestSniffShortAndCancelled(t *testing.T) {
	a, b := socketPair(t)
	a.Write([]byte{0x16, 0x03})
	a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	_, _, err := Sniff(ctx, b)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short: %v", err)
	}

	c, d := socketPair(t)
	defer c.Close()
	ctx2, cancel2 := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, _, err := Sniff(ctx2, d); errc <- err }()
	cancel2()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	// The deadline was cleared: the conn is usable afterwards.
	c.Write([]byte("x"))
	_ = d.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := d.Read(make([]byte, 1)); err != nil {
		t.Fatalf("read after a cancelled Sniff: %v", err)
	}
	_ = d.SetReadDeadline(time.Time{})
}

func TestExpect(t *testing.T) {
	for _, tc := range []struct {
		kind    Kind
		head    string
		wantTLS bool
		ok      bool
		words   string
	}{
		{KindTLS, "\x16\x03\x01\x00", true, true, ""},
		{KindStream, "QEVM", false, true, ""},
		{KindMultifd, "\x11\x22\x33\x44", false, true, ""},
		{KindStream, "QEVM", true, false, "TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext; set tls-creds on the source as well, or clear it here"},
		{KindMultifd, "\x11\x22\x33\x44", true, false, "TLS required: tls-creds is set here but the peer sent a multifd channel (MULTIFD magic 0x11223344) in plaintext; set tls-creds on the source as well, or clear it here"},
		{KindTLS, "\x16\x03\x01\x00", false, false, "TLS not configured: the peer started a TLS handshake (a TLS ClientHello) but tls-creds is not set here; set tls-creds here as well, or clear it on the source"},
		{KindUnknown, "GET ", false, false, `the peer sent neither a TLS ClientHello nor a migration stream (first bytes 47 45 54 20 "GET ")`},
		{KindUnknown, "\x1b[2J", true, false, "TLS required: tls-creds is set here but the peer sent no TLS ClientHello (first bytes 1b 5b 32 4a)"},
	} {
		err := Expect(tc.kind, []byte(tc.head), tc.wantTLS)
		var me *MismatchError
		switch {
		case tc.ok && err != nil:
			t.Errorf("%v want TLS %v: %v", tc.kind, tc.wantTLS, err)
		case !tc.ok && (!errors.As(err, &me) || err.Error() != tc.words):
			t.Errorf("%v want TLS %v:\n got %v\nwant %s", tc.kind, tc.wantTLS, err, tc.words)
		}
	}
}

// socketPair returns two connected unix sockets, closed at the end.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	p := t.TempDir() + "/s"
	ln, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	defer os.Remove(p)
	a, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// A TLS destination refuses a source that sends the plaintext stream.
func ExampleExpect() {
	src, dst := net.Pipe()
	go func() { src.Write([]byte("QEVM\x00\x00\x00\x03")); src.Close() }()
	kind, conn, err := Sniff(context.Background(), dst)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close()
	fmt.Println(Expect(kind, nil, true))
	// Output: TLS required: tls-creds is set here but the peer sent a migration stream (QEVM magic) in plaintext; set tls-creds on the source as well, or clear it here
}
